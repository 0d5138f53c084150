import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// encfsd's own hidden directories, and how they are deleted: `.mk-*` (a mkdir interrupted
/// before its rename into place), `.rm-*` (a directory taken out of the namespace by rmdir), and
/// a directory being removed.
///
/// What encfsd puts in them is a `.d` header and, at most, leftovers of the same kinds. Anything
/// else was planted (the store is hostile input): such a directory is not encfsd's to delete,
/// since deleting it as root would delete, for whoever moved a tree there, files they could not
/// delete themselves. Deletion acts through the descriptor that was checked, never by a name
/// that may have been exchanged meanwhile, and never recurses past what it checked.
enum Leftovers {
    static let mkdirPrefix: [UInt8] = Array(".mk-".utf8)
    static let rmdirPrefix: [UInt8] = Array(".rm-".utf8)
    /// A file being created on a backing without O_TMPFILE, before its rename into place.
    static let newFilePrefix: [UInt8] = Array(".nf-".utf8)
    /// Leftovers nest at most this deep (an interrupted mkdir inside a directory being removed).
    static let maximumDepth = 2

    static func isLeftoverName(_ name: [UInt8]) -> Bool {
        name.starts(with: mkdirPrefix) || name.starts(with: rmdirPrefix)
    }

    enum Contents {
        /// Only what encfsd itself puts in a directory it deletes.
        case removable
        /// Entries of the store: the directory is not empty.
        case entries
        /// Something encfsd never makes.
        case foreign
    }

    /// What `dir` holds, in one listing of it (and of each leftover inside).
    static func contents(of dir: borrowing FileDescriptor, depth: Int = 0) throws -> Contents {
        var foreignFound = false
        for entry in try dir.listDirectory() {
            if NameCodec.isEntryName(entry.name) { return .entries }
            if (entry.name == directoryHeaderName || entry.name.starts(with: newFilePrefix)) && !entry.isDirectory { continue }
            guard !foreignFound, entry.isDirectory, isLeftoverName(entry.name), depth < maximumDepth else {
                foreignFound = true
                continue
            }
            let sub = try dir.openEntry(entry.name, .directory, .path)
            if try contents(of: sub, depth: depth + 1) != .removable { foreignFound = true }
        }
        return foreignFound ? .foreign : .removable
    }

    static func isRemovable(_ dir: borrowing FileDescriptor) throws -> Bool { try contents(of: dir) == .removable }

    /// Damage, or a tree planted to be deleted as root: EIO for the directory that holds it.
    static let foreign = StoreError.integrity("the directory holds objects encfsd does not make; left alone")

    /// Deletes the contents of `dir` through it, then its entry `name` in `parent` if that entry
    /// is still `dir`. Throws `foreign` on anything encfsd did not put there (nothing of it is
    /// touched) and leaves the entry in place.
    static func remove(_ dir: borrowing FileDescriptor, named name: [UInt8], in parent: borrowing FileDescriptor, depth: Int = 0) throws {
        for entry in try dir.listDirectory() {
            if (entry.name == directoryHeaderName || entry.name.starts(with: newFilePrefix)) && !entry.isDirectory {
                try dir.unlinkAt(entry.name)
                continue
            }
            guard entry.isDirectory, isLeftoverName(entry.name), depth < maximumDepth else { throw foreign }
            let sub = try dir.openEntry(entry.name, .directory, .path)
            try remove(sub, named: entry.name, in: dir, depth: depth + 1)
        }
        let expected = dir.identity()
        let st = try dir.fstat()
        guard let now = try? parent.fstatAt(name), now.st_ino == st.st_ino,
              expected == nil || parent.identity(ofEntry: name) == expected else {
            throw StoreError.integrity("\(String(decoding: name, as: UTF8.self)) was replaced while it was being removed")
        }
        try parent.unlinkAt(name, directory: true)
    }
}
