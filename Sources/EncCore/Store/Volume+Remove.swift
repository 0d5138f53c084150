import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

extension Volume {
    /// Removes a name. Works in the locked view too (fscrypt allows unlink without the key).
    public func unlink(parent: UInt64, name: [UInt8]) throws {
        try resolvingNames { try changingNamespace { try unlinkLocked(parent: parent, name: name) } }
    }

    private func unlinkLocked(parent: UInt64, name: [UInt8]) throws {
        let dir = try node(parent)
        let naming = try? key(for: dir, .names)
        let backing = try backingName(of: name, in: dir, naming: naming)
        let dirFD = try changingDirectoryFD(dir)
        let st = try Self.statEntry(dirFD.descriptor, backing)
        guard st.st_mode & S_IFMT != S_IFDIR else { throw StoreError.isDirectory }
        try checkRemoval(from: dir, backingName: backing, inode: UInt64(st.st_ino))
        // A file that keeps other names should stop listing this one; without the key the
        // header cannot be re-sealed, and the stale binding is harmless.
        var survivor: Node?
        if st.st_nlink > 1, naming != nil {
            survivor = try? childEntry(of: dir, backingName: backing, naming: naming).node
        }
        let lastName = st.st_nlink == 1 ? header(ofLastName: backing, in: dirFD.descriptor, inode: UInt64(st.st_ino)) : nil
        try changingNames(of: survivor) { try dirFD.descriptor.unlinkAt(backing) }
        forgetLocation(Location(parent: dir, name: backing), inode: UInt64(st.st_ino))
        if st.st_nlink == 1 { dropSideObject(ofUnlinked: UInt64(st.st_ino), header: lastName, directoryFD: dirFD.descriptor) }
        if let survivor, let naming {
            bindingWentStale(Binding.digest(parentID: naming.header.objectID, backingName: backing), of: survivor,
                             at: Location(parent: dir, name: backing))
        }
        if let survivor { release(survivor) }
        try syncIfDirectorySync(dir)
    }

    /// The header of an object about to lose its last name, when no node has it (a node's is read
    /// then): only a v3 store's objects can have a side object to remove with it.
    func header(ofLastName backing: [UInt8], in dirFD: borrowing FileDescriptor, inode: UInt64) -> ObjectHeader? {
        guard holdsSideObjects, table.withLock({ $0.byInode[inode] }) == nil,
              let fd = try? dirFD.openEntry(backing, .regularFile, .readOnly) else { return nil }
        return try? slots.read(fd: fd, key: nil)
    }

    public func rmdir(parent: UInt64, name: [UInt8]) throws {
        try resolvingNames { try rmdirResolved(parent: parent, name: name) }
    }

    private func rmdirResolved(parent: UInt64, name: [UInt8]) throws {
        try changingNamespace {
            let dir = try node(parent)
            let backing = try backingName(of: name, in: dir, naming: try? key(for: dir, .names))
            let st = try statEntry(in: dir, backing)
            guard st.st_mode & S_IFMT == S_IFDIR else { throw StoreError.notDirectory }
            try checkRemoval(from: dir, backingName: backing, inode: UInt64(st.st_ino))
            try removeEmptyDirectory(in: dir, backingName: backing)
            try syncIfDirectorySync(dir)
        }
    }

    /// Takes an empty directory out of the namespace with one rename to a hidden trash name, then
    /// deletes its header and itself through the descriptor that was checked (see `Leftovers`).
    /// A crash at any point leaves either the directory intact or a hidden leftover that fsck
    /// removes, never an entry without a header.
    func removeEmptyDirectory(in dir: Node, backingName: [UInt8]) throws {
        let dirFD = try changingDirectoryFD(dir)
        let opened = try dirFD.descriptor.openEntryStat(backingName, .directory, .path)
        let st = opened.stat
        let target = opened.descriptor
        switch try Leftovers.contents(of: target) {
        case .removable: break
        case .entries: throw StoreError.notEmpty
        case .foreign: throw Leftovers.foreign
        }
        let removed = header(ofLastName: directoryHeaderName, in: target, inode: UInt64(st.st_ino))
        let trash = Leftovers.rmdirPrefix + Array(Hex.encode(OpenSSL.random(count: 8)).utf8)
        try dirFD.descriptor.renameNoReplace(backingName, dirFD.descriptor, trash, native: capabilities.has(.renameNoReplace))
        forgetLocation(Location(parent: dir, name: backingName), inode: UInt64(st.st_ino))
        try Leftovers.remove(target, named: trash, in: dirFD.descriptor)
        dropSideObject(ofUnlinked: UInt64(st.st_ino), header: removed, directoryFD: dirFD.descriptor)
    }
    /// A backing name that no longer leads to the object the kernel may still know by it.
    func forgetLocation(_ location: Location, inode: UInt64) {
        guard let node = table.withLock({ $0.byInode[inode] }) else { return }
        node.state.withLock { $0.removeLocation(location) }
        if node.isDirectory && node.state.withLock({ $0.locations.isEmpty }) { directories.remove(node.id) }
    }
}
