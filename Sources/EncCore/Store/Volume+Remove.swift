#if canImport(Glibc)
import Glibc
#endif

extension Volume {
    /// Removes a name. Works in the locked view too (fscrypt allows unlink without the key).
    public func unlink(parent: UInt64, name: [UInt8]) throws {
        let dir = try node(parent)
        let backing = try backingName(of: name, in: dir)
        let st = try Self.statEntry(dir, backing)
        guard st.st_mode & S_IFMT != S_IFDIR else { throw StoreError.isDirectory }
        // A file that keeps other names should stop listing this one; without the key the
        // header cannot be re-sealed, and the stale binding is harmless.
        var survivor: Node?
        if st.st_nlink > 1, (try? namingDirectory(dir)) != nil {
            survivor = try? child(of: dir, backingName: backing)
        }
        try Sys.unlinkAt(dir.fd.raw, backing)
        if let survivor, let (_, dirHeader) = try? namingDirectory(dir) {
            try? removeBinding(Binding.digest(parentID: dirHeader.objectID, backingName: backing), from: survivor)
        }
        if let survivor { release(survivor) }
    }

    public func rmdir(parent: UInt64, name: [UInt8]) throws {
        let dir = try node(parent)
        let backing = try backingName(of: name, in: dir)
        let st = try Self.statEntry(dir, backing)
        guard st.st_mode & S_IFMT == S_IFDIR else { throw StoreError.notDirectory }
        try removeEmptyDirectory(in: dir, backingName: backing)
    }

    /// Takes an empty directory out of the namespace with one rename to a hidden trash name, then
    /// deletes its header and itself. A crash at any point leaves either the directory intact or
    /// a hidden leftover that fsck removes, never an entry without a header.
    func removeEmptyDirectory(in dir: Node, backingName: [UInt8]) throws {
        let target = try Sys.openAt(dir.fd.raw, backingName, flags: Sys.oPath | O_DIRECTORY | O_NOFOLLOW)
        defer { withExtendedLifetime(target) {} }
        guard try Sys.listDirectory(target.raw).allSatisfy({ !NameCodec.isEntryName($0.name) }) else {
            throw StoreError.notEmpty
        }
        let trash = Array(".rm-\(Hex.encode(OpenSSL.random(count: 8)))".utf8)
        try Sys.renameAt(dir.fd.raw, backingName, dir.fd.raw, trash, flags: Sys.renameNoReplace)
        try removeTree(in: dir.fd.raw, name: trash)
    }

    /// Deletes a hidden leftover directory (our own metadata files only; entries were checked).
    func removeTree(in parentFD: Int32, name: [UInt8]) throws {
        let fd = try Sys.openAt(parentFD, name, flags: Sys.oPath | O_DIRECTORY | O_NOFOLLOW)
        defer { withExtendedLifetime(fd) {} }
        for entry in try Sys.listDirectory(fd.raw) {
            if entry.isDirectory {
                try removeTree(in: fd.raw, name: entry.name)
            } else {
                try Sys.unlinkAt(fd.raw, entry.name)
            }
        }
        try Sys.unlinkAt(parentFD, name, directory: true)
    }
}
