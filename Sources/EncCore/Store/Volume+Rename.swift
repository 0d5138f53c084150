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
        try resolvingNames { try changingNamespace { try renameLocked(parent: parent, name: name, newParent: newParent, newName: newName, mode: mode) } }
    }

    private func renameLocked(parent: UInt64, name: [UInt8], newParent: UInt64, newName: [UInt8], mode: RenameMode) throws {
        let fromDir = try node(parent)
        let toDir = try node(newParent)
        let fromNaming = try key(for: fromDir, .newNames), toNaming = try key(for: toDir, .newNames)
        let (fromKey, fromHeader, toKey, toHeader) = (fromNaming.key, fromNaming.header, toNaming.key, toNaming.header)
        let fromName = try resolveName(name, in: fromDir, key: fromKey, header: fromHeader)
        let toName = try resolveName(newName, in: toDir, key: toKey, header: toHeader)
        TestHooks.pause(.renameResolved)
        let source = try child(of: fromDir, backingName: fromName.backingName)
        defer { release(source) }
        try refuse(fromDir, ifAny: [.immutable, .appendOnly])
        try refuse(source, ifAny: [.immutable, .appendOnly])
        try refuse(toDir, ifAny: [.immutable])
        if fromHeader.policy != toHeader.policy || source.isDirectory {
            try checkSamePolicy(source, directoryPolicy: toHeader)
        }

        var target: Node?
        defer { if let target { release(target) } }
        let fromFD = try changingDirectoryFD(fromDir)
        let toFD = try changingDirectoryFD(toDir)
        var replaced: UInt64?
        var replacedLastName: (inode: UInt64, header: ObjectHeader?)?
        // A replaced file that keeps other names loses its binding for the target name too.
        var replacedNode: Node?
        defer { if let replacedNode { release(replacedNode) } }
        if let st = try? Self.statEntry(toFD.descriptor, toName.backingName) {
            replaced = UInt64(st.st_ino)
            if mode == .replace, st.st_nlink > 1, UInt64(st.st_ino) != source.backingInode {
                replacedNode = retainedNode(inode: UInt64(st.st_ino))
            }
            if mode == .replace, st.st_mode & S_IFMT == S_IFREG, st.st_nlink == 1, UInt64(st.st_ino) != source.backingInode {
                replacedLastName = (UInt64(st.st_ino), header(ofLastName: toName.backingName, in: toFD.descriptor, inode: UInt64(st.st_ino)))
            }
            if UInt64(st.st_ino) == source.backingInode { return } // same object: POSIX says do nothing
            switch mode {
            case .noReplace: throw StoreError.exists
            case .exchange:
                try checkRemoval(from: toDir, backingName: toName.backingName, inode: UInt64(st.st_ino))
                let other = try child(of: toDir, backingName: toName.backingName)
                target = other
                if fromHeader.policy != toHeader.policy || other.isDirectory {
                    try checkSamePolicy(other, directoryPolicy: fromHeader)
                }
            case .replace:
                try checkRemoval(from: toDir, backingName: toName.backingName, inode: UInt64(st.st_ino))
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
        let from = Location(parent: fromDir, name: fromName.backingName)
        let to = Location(parent: toDir, name: toName.backingName)
        func move() throws {
            FaultPoints.reach(.renameBindingAdded)
            switch mode {
            case .replace:
                try fromFD.descriptor.renameAt(fromName.backingName, toFD.descriptor, toName.backingName)
            case .noReplace:
                try fromFD.descriptor.renameNoReplace(fromName.backingName, toFD.descriptor, toName.backingName,
                                        native: capabilities.has(.renameNoReplace))
            case .exchange where capabilities.has(.renameExchange):
                try fromFD.descriptor.renameAt(fromName.backingName, toFD.descriptor, toName.backingName, flags: Sys.renameExchange)
            case .exchange:
                let record = ExchangeRecord(firstDirectory: try backingPath(of: fromDir), first: fromName.backingName,
                                            secondDirectory: try backingPath(of: toDir), second: toName.backingName,
                                            temporary: ExchangeRecord.newTemporaryName())
                try record.perform(journalFD: journalFD.descriptor, firstFD: fromFD.descriptor, secondFD: toFD.descriptor)
            }
            FaultPoints.reach(.renameDone)
            // The new locations are in place before `entering` lets the timer at the bindings.
            if let target {
                target.state.withLock { $0.removeLocation(to); $0.addLocation(from) }
            } else if let replaced {
                forgetLocation(to, inode: replaced)
            }
            source.state.withLock { $0.removeLocation(from); $0.addLocation(to) }
        }
        // An exchange done as three renames that fails part way is finished by the next mount's
        // recovery: the bindings it added stay for that.
        let queueOnFailure = mode != .exchange || capabilities.has(.renameExchange)
        do {
            try entering(source, by: newBinding, at: to, queueOnFailure: queueOnFailure) {
                if let target {
                    try entering(target, by: oldBinding, at: from, queueOnFailure: queueOnFailure, move)
                } else {
                    try changingNames(of: replacedNode, move)
                }
            }
        } catch StoreError.system(EEXIST) {
            throw StoreError.exists
        }
        if let replacedLastName { dropSideObject(ofUnlinked: replacedLastName.inode, header: replacedLastName.header, directoryFD: toFD.descriptor) }
        bindingWentStale(oldBinding.digest, of: source, at: from)
        if let target { bindingWentStale(newBinding.digest, of: target, at: to) }
        if let replacedNode { bindingWentStale(newBinding.digest, of: replacedNode, at: to) }
        try syncIfDirectorySync(fromDir)
        if toDir !== fromDir { try syncIfDirectorySync(toDir) }
    }

    /// Backing names from the store root down to the directory `dir`, by each directory's first
    /// location (a directory has one: no hard links to directories), taking each directory's lock
    /// briefly, one at a time: for a record that must find it again after a crash, and the
    /// store-boundary check's hint (`knownPath`).
    func backingPath(of dir: Node) throws -> [[UInt8]] {
        var components: [[UInt8]] = []
        var current = dir
        for _ in 0..<4096 {
            if current.id == Self.rootID { return components.reversed() }
            guard let location = current.state.withLock({ $0.locations.first }) else { throw StoreError.notFound }
            components.append(location.name)
            current = location.parent
        }
        throw StoreError.integrity("a directory lies more than 4096 levels deep")
    }
}

extension Volume {
    /// RENAME_WHITEOUT, for overlayfs upper and work directories: the rename, then a whiteout
    /// (a character device 0/0, mode 0, the caller's) under the old name. Not one atomic step as
    /// on ext4: the kernel holds both directories locked for the whole request, so no other
    /// request sees the moment between, but a crash there leaves the rename without its
    /// whiteout (overlayfs would show the lower entry again). Before the reply nothing was
    /// acknowledged, so nothing acknowledged is lost.
    public func renameLeavingWhiteout(parent: UInt64, name: [UInt8], newParent: UInt64, newName: [UInt8], mode: RenameMode,
                                      caller: Caller) throws {
        guard mode != .exchange else { throw StoreError.invalidArgument }
        try rename(parent: parent, name: name, newParent: newParent, newName: newName, mode: mode)
        try resolvingNames {
            let whiteout = try prepare(parent: parent, name: name, type: .characterDevice, mode: 0, rdev: 0,
                                       caller: Caller(uid: caller.uid, gid: caller.gid, umask: 0))
            let (node, _, _) = try createFile(whiteout)
            release(node) // the kernel looks the whiteout up when it wants it
        }
    }
}
