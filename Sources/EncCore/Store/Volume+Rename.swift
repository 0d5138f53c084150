import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

extension Volume {
    /// Renames with one atomic backing renameat2, honouring RENAME_NOREPLACE and RENAME_EXCHANGE.
    ///
    /// Each moved object must authenticate under its new name, so the new name is added to its
    /// header's bindings (durably) before the backing rename and the old one is dropped after.
    /// A crash anywhere leaves the object under exactly one of its two names, and that name is
    /// bound: the old name until the rename, the new one after.
    public func rename(parent: UInt64, name: [UInt8], newParent: UInt64, newName: [UInt8], mode: RenameMode) throws {
        let fromDir = try node(parent)
        let toDir = try node(newParent)
        let fromNaming = try key(for: fromDir, .newNames), toNaming = try key(for: toDir, .newNames)
        let (fromKey, fromHeader, toKey, toHeader) = (fromNaming.key, fromNaming.header, toNaming.key, toNaming.header)
        let fromName = try NameCodec.encrypt(name, directoryID: fromHeader.objectID, key: fromKey)
        let toName = try NameCodec.encrypt(newName, directoryID: toHeader.objectID, key: toKey)
        let source = try child(of: fromDir, backingName: fromName.backingName)
        defer { release(source) }
        if fromHeader.policy != toHeader.policy || source.isDirectory {
            try checkSamePolicy(source, directoryPolicy: toHeader.policy)
        }

        var target: Node?
        defer { if let target { release(target) } }
        let fromFD = try changingDirectoryFD(fromDir)
        let toFD = try changingDirectoryFD(toDir)
        defer { withExtendedLifetime((fromFD, toFD)) {} }
        var replaced: UInt64?
        if let st = try? Self.statEntry(toFD.raw, toName.backingName) {
            replaced = UInt64(st.st_ino)
            if UInt64(st.st_ino) == source.backingInode { return } // same object: POSIX says do nothing
            switch mode {
            case .noReplace: throw StoreError.exists
            case .exchange:
                let other = try child(of: toDir, backingName: toName.backingName)
                target = other
                if fromHeader.policy != toHeader.policy || other.isDirectory {
                    try checkSamePolicy(other, directoryPolicy: fromHeader.policy)
                }
            case .replace:
                let targetIsDirectory = st.st_mode & S_IFMT == S_IFDIR
                if source.isDirectory != targetIsDirectory {
                    // Before reporting the types, make sure the target is an object of the store
                    // at all (a damaged or planted one is EIO, not EISDIR or ENOTDIR).
                    release(try child(of: toDir, backingName: toName.backingName))
                    throw source.isDirectory ? StoreError.notDirectory : StoreError.isDirectory
                }
                if targetIsDirectory {
                    // The backing directory still holds its header file, so the backing rename
                    // would refuse it as non-empty: take the empty target out first.
                    try removeEmptyDirectory(in: toDir, backingName: toName.backingName)
                }
            }
        } else if mode == .exchange {
            throw StoreError.notFound
        }

        let newBinding = Self.binding(parentID: toHeader.objectID, name: toName)
        let oldBinding = Self.binding(parentID: fromHeader.objectID, name: fromName)
        try addBinding(newBinding, to: source)
        if let target { try addBinding(oldBinding, to: target) }
        FaultPoints.reach(.renameBindingAdded)
        do {
            let flags: UInt32 = switch mode {
            case .replace: 0
            case .noReplace: Sys.renameNoReplace
            case .exchange: Sys.renameExchange
            }
            try Sys.renameAt(fromFD.raw, fromName.backingName, toFD.raw, toName.backingName, flags: flags)
        } catch {
            try? removeBinding(newBinding.digest, from: source)
            if let target { try? removeBinding(oldBinding.digest, from: target) }
            if case StoreError.system(EEXIST) = error { throw StoreError.exists }
            throw error
        }
        FaultPoints.reach(.renameDone)
        let from = Location(parent: fromDir, name: fromName.backingName)
        let to = Location(parent: toDir, name: toName.backingName)
        if let target {
            target.state.withLock { $0.removeLocation(to); $0.addLocation(from) }
        } else if let replaced {
            forgetLocation(to, inode: replaced)
        }
        source.state.withLock { $0.removeLocation(from); $0.addLocation(to) }
        bindingWentStale(oldBinding.digest, of: source)
        if let target { bindingWentStale(newBinding.digest, of: target) }
    }
}
