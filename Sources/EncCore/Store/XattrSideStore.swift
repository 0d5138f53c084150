import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// The store's `.xattrs/` directory: the side objects of format v3 (FORMAT.md 16), one file per
/// object generation, named by object ID so hard links share it and renames never touch it.
///
/// Invariant: a generation is written complete and made durable (file and directory entry)
/// before any header names it, and the generation a durable header names is never removed; so a
/// crash leaves the header's generation readable, and any other file is garbage nobody reads
/// (fsck reports it, `--repair` removes it).
enum XattrSideStore {
    static let directoryName: [UInt8] = Array(".xattrs".utf8)

    /// Opens `.xattrs` (O_PATH, through the store boundary); nil when it does not exist and
    /// `create` is false. Created durably (the root synced) before the first side object in it.
    /// Something else at the name (a symlink, a file) is an integrity failure: the xattr calls
    /// of objects with side objects answer EIO, not the ENOTDIR of a lookup no caller made.
    static func directory(storeFD: borrowing FileDescriptor, create: Bool) throws -> SharedDescriptor? {
        do {
            do {
                return SharedDescriptor(try storeFD.openEntry(directoryName, .directory, .path))
            } catch StoreError.system(ENOENT) where create {
                do { try storeFD.mkdirAt(directoryName, mode: 0o700) } catch StoreError.system(EEXIST) {}
                let root = try storeFD.listingDescriptor()
                try root.fsync()
                return SharedDescriptor(try storeFD.openEntry(directoryName, .directory, .path))
            }
        } catch StoreError.system(ENOENT) where !create {
            return nil
        } catch StoreError.system(let code) where code == ENOTDIR || code == ELOOP {
            throw StoreError.integrity(".xattrs is not a directory of the store (a link or a file was put there)")
        }
    }

    /// The file image of `generation` of `objectID`. Missing, not a regular file (a symlink,
    /// FIFO or device is never opened for reading), hard-linked or too large: an integrity
    /// failure of that object's xattrs.
    static func read(directoryFD: borrowing FileDescriptor, objectID: [UInt8], generation: UInt64) throws -> [UInt8] {
        let name = XattrSideObject.fileName(objectID: objectID, generation: generation)
        let opened: Sys.OpenedEntry
        do {
            opened = try directoryFD.openEntryStat(name, .regularFile, .readOnly)
        } catch StoreError.system(ENOENT) {
            throw StoreError.integrity("xattr side object \(String(decoding: name, as: UTF8.self)) is missing")
        }
        let st = opened.stat
        let fd = opened.descriptor
        guard st.st_nlink == 1 else { throw StoreError.integrity("xattr side object has other hard links") }
        guard st.st_size <= XattrSideObject.maximumFileBytes else { throw StoreError.integrity("xattr side object is too large") }
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
        let n = try bytes.withUnsafeMutableBytes { try fd.pread($0, offset: 0) }
        guard n == bytes.count else { throw StoreError.integrity("xattr side object is truncated") }
        return bytes
    }

    /// Writes `image` as `generation` of `objectID` and makes it durable, entry included. A file
    /// already under that name is a leftover of a write that no header came to name (the header
    /// names the generation before it): it is replaced.
    static func write(directoryFD: borrowing FileDescriptor, objectID: [UInt8], generation: UInt64, image: [UInt8]) throws {
        let name = XattrSideObject.fileName(objectID: objectID, generation: generation)
        let fd = try createReplacing(name, in: directoryFD)
        do {
            try image.withUnsafeBytes { try fd.pwrite($0, offset: 0) }
            try fd.fdatasync()
            let listing = try directoryFD.listingDescriptor()
            try listing.fsync()
        } catch {
            try? directoryFD.unlinkAt(name)
            throw error
        }
    }

    /// Creates `name`, replacing a leftover file of that name.
    private static func createReplacing(_ name: [UInt8], in directoryFD: borrowing FileDescriptor) throws -> FileDescriptor {
        do {
            return try directoryFD.createEntry(name, mode: 0o600)
        } catch StoreError.system(EEXIST) {
            try directoryFD.unlinkAt(name)
            return try directoryFD.createEntry(name, mode: 0o600)
        }
    }

    /// Removes a generation no durable header names any more (a lost unlink leaves garbage only).
    static func remove(directoryFD: borrowing FileDescriptor, objectID: [UInt8], generation: UInt64) {
        try? directoryFD.unlinkAt(XattrSideObject.fileName(objectID: objectID, generation: generation))
    }
}
