#if canImport(Glibc)
import Glibc
#endif

extension Volume {
    /// Everything needed to create one entry in an unlocked directory.
    struct NewEntry {
        let dir: Node
        let key: MasterKey
        let name: EncryptedName
        let header: ObjectHeader
    }

    func prepare(parent: UInt64, name: [UInt8], type: ObjectType, mode: UInt32, rdev: UInt64 = 0,
                 caller: Caller) throws -> NewEntry {
        let dir = try node(parent)
        let (key, dirHeader) = try creationDirectory(dir)
        let encrypted = try NameCodec.encrypt(name, directoryID: dirHeader.objectID, key: key)
        // ext4 semantics: a set-group-ID directory passes its group on, and the bit to subdirectories.
        let inheritsGroup = dirHeader.mode & UInt32(S_ISGID) != 0
        var permissions = mode & 0o7777
        if inheritsGroup && type == .directory { permissions |= UInt32(S_ISGID) }
        var header = ObjectHeader(
            type: type, mode: permissions, uid: caller.uid, gid: inheritsGroup ? dirHeader.gid : caller.gid,
            extentSize: type == .directory ? 0 : UInt32(config.extentSize),
            objectID: OpenSSL.random(count: 16), policy: dirHeader.policy, version: slots.newObjectVersion)
        header.rdev = rdev
        header.birthTime = Self.nowNanoseconds()
        header.bindings = [Self.binding(parentID: dirHeader.objectID, name: encrypted)]
        return NewEntry(dir: dir, key: key, name: encrypted, header: header)
    }

    /// The creation instant, on the clock the backing timestamps use (CLOCK_REALTIME).
    static func nowNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    static func binding(parentID: [UInt8], name: EncryptedName) -> Binding {
        Binding(digest: Binding.digest(parentID: parentID, backingName: name.backingName),
                longName: name.isLong ? name.ciphertext : [])
    }

    /// Creates a non-directory object. The backing file is built unnamed (O_TMPFILE) and linked
    /// in only when its header is complete, so no crash can leave a half-made entry behind.
    func createFile(_ entry: NewEntry, contents: [UInt8] = []) throws -> (Node, FileDescriptor) {
        let dirFD = try changingDirectoryFD(entry.dir)
        defer { withExtendedLifetime(dirFD) {} }
        let fd = try Sys.createUnnamed(in: dirFD.raw, mode: 0o600)
        var header = entry.header
        try slots.create(fd: fd.raw, header: &header, key: entry.key)
        if !contents.isEmpty {
            let file = ExtentFile(fd: fd.raw, journalFD: journalFD.raw, key: entry.key, header: header, slots: slots)
            try contents.withUnsafeBytes { try file.write(offset: 0, data: $0) }
            try file.commit(header: &header)
        }
        // Durable before it has a name: an entry that survives a power loss always has a header
        // (every metadata file the store creates is synced before anything depends on it).
        try Sys.fdatasync(fd.raw)
        FaultPoints.reach(.createHeaderWritten)
        try existsOnCollision { try Sys.linkAt(fd: fd.raw, toDir: dirFD.raw, entry.name.backingName) }
        let st = try Sys.fstat(fd.raw)
        let node = insert(inode: UInt64(st.st_ino), identity: Sys.identity(of: fd.raw), headerIdentity: nil,
                          header: header, verified: true,
                          location: Location(parent: entry.dir, name: entry.name.backingName), created: true)
        node.state.withLock { if $0.header.sequence == header.sequence { $0.durableSequence = header.sequence } }
        return (node, fd)
    }

    /// Creates a directory under a temporary name, makes its header durable, then renames it into
    /// place without replacing anything: a power loss never leaves a directory without a header
    /// (the failure that made whole gocryptfs volumes unreadable, its issue #1033).
    func createDirectory(_ entry: NewEntry) throws -> Node {
        let temporary = Array(".mk-\(Hex.encode(OpenSSL.random(count: 8)))".utf8)
        let parentFD = try changingDirectoryFD(entry.dir)
        defer { withExtendedLifetime(parentFD) {} }
        try Sys.mkdirAt(parentFD.raw, temporary, mode: 0o700)
        var made: FileDescriptor?
        do {
            let dirFD = try Sys.openEntry(parentFD.raw, temporary, .directory, .path)
            made = dirFD
            var header = entry.header
            let headerFD = try Sys.createEntry(dirFD.raw, directoryHeaderName, mode: 0o600)
            try withExtendedLifetime(headerFD) {
                try slots.create(fd: headerFD.raw, header: &header, key: entry.key)
                try Sys.fsync(headerFD.raw)
            }
            try existsOnCollision {
                try Sys.renameAt(parentFD.raw, temporary, parentFD.raw, entry.name.backingName, flags: Sys.renameNoReplace)
            }
            let st = try Sys.fstat(dirFD.raw)
            let node = insert(inode: UInt64(st.st_ino), identity: Sys.identity(of: dirFD.raw),
                              headerIdentity: Sys.identity(of: headerFD.raw), header: header, verified: true,
                              location: Location(parent: entry.dir, name: entry.name.backingName), created: true)
            directories.insert(node.id, dirFD)
            node.state.withLock { if $0.header.sequence == entry.header.sequence { $0.durableSequence = entry.header.sequence } }
            return node
        } catch {
            if let made { try? Sys.unlinkAt(made.raw, directoryHeaderName) }
            try? Sys.unlinkAt(parentFD.raw, temporary, directory: true)
            throw error
        }
    }

    /// The reply for a new entry; the reference `insert` took becomes the kernel's lookup.
    private func entered(_ node: Node, parent: UInt64, name: [UInt8]) throws -> (UInt64, Attributes) {
        node.state.withLock { _ = $0.dentries.insert(Dentry(parent: parent, name: name)) }
        do {
            return (node.id, try attributes(node))
        } catch {
            release(node)
            throw error
        }
    }

    // MARK: the create family

    public func create(parent: UInt64, name: [UInt8], mode: UInt32, caller: Caller) throws -> (UInt64, Attributes, UInt64) {
        let (node, fd) = try createFile(try prepare(parent: parent, name: name, type: .regular, mode: mode, caller: caller))
        let (id, attributes) = try entered(node, parent: parent, name: name)
        do {
            return (id, attributes, try open(id, truncate: false, descriptor: fd))
        } catch {
            release(node) // the kernel never hears of the entry
            throw error
        }
    }

    public func mknod(parent: UInt64, name: [UInt8], mode: UInt32, rdev: UInt64, caller: Caller) throws -> (UInt64, Attributes) {
        guard let type = ObjectType(formatBits: mode), type != .directory, type != .symlink else {
            throw StoreError.invalidArgument
        }
        let special = type == .characterDevice || type == .blockDevice
        let entry = try prepare(parent: parent, name: name, type: type, mode: mode, rdev: special ? rdev : 0, caller: caller)
        return try entered(try createFile(entry).0, parent: parent, name: name)
    }

    public func mkdir(parent: UInt64, name: [UInt8], mode: UInt32, caller: Caller) throws -> (UInt64, Attributes) {
        try entered(try createDirectory(try prepare(parent: parent, name: name, type: .directory, mode: mode, caller: caller)),
                    parent: parent, name: name)
    }

    public static let maximumSymlinkTarget = 4095

    public func symlink(parent: UInt64, name: [UInt8], target: [UInt8], caller: Caller) throws -> (UInt64, Attributes) {
        guard !target.isEmpty, !target.contains(0) else { throw StoreError.invalidArgument }
        guard target.count <= Self.maximumSymlinkTarget else { throw StoreError.nameTooLong }
        let entry = try prepare(parent: parent, name: name, type: .symlink, mode: 0o777, caller: caller)
        return try entered(try createFile(entry, contents: target).0, parent: parent, name: name)
    }

    public func readlink(_ id: UInt64) throws -> [UInt8] {
        let node = try node(id)
        guard node.type == .symlink else { throw StoreError.invalidArgument }
        let key = try contentKey(node)
        return try node.state.withLock { state in
            let file = try contents(node, state, key: key, writable: false)
            return try file.read(offset: 0, count: Int(file.size))
        }
    }

    /// Gives an object another name. The new name is added to the header's bindings (durably)
    /// before the backing link exists, so the new entry always authenticates.
    public func link(_ id: UInt64, newParent: UInt64, newName: [UInt8]) throws -> (UInt64, Attributes) {
        let object = try node(id)
        guard !object.isDirectory else { throw StoreError.notPermitted }
        let dir = try node(newParent)
        let (dirKey, dirHeader) = try creationDirectory(dir)
        try checkSamePolicy(object, directoryPolicy: dirHeader.policy)
        let name = try NameCodec.encrypt(newName, directoryID: dirHeader.objectID, key: dirKey)
        let binding = Self.binding(parentID: dirHeader.objectID, name: name)
        try addBinding(binding, to: object)
        do {
            let dirFD = try changingDirectoryFD(dir)
            try withObjectFD(object, .path) { fd in
                try withExtendedLifetime(dirFD) { try Sys.linkAt(fd: fd, toDir: dirFD.raw, name.backingName) }
            }
            object.state.withLock { $0.addLocation(Location(parent: dir, name: name.backingName)) }
        } catch {
            try? removeBinding(binding.digest, from: object)
            if case StoreError.system(EEXIST) = error { throw StoreError.exists }
            throw error
        }
        retain(object)
        return try entered(object, parent: newParent, name: newName)
    }

    /// EXDEV unless the object may live under the directory's policy. FIFOs, sockets and device
    /// nodes carry no encrypted contents, so fscrypt lets them cross policies, and so do we.
    func checkSamePolicy(_ node: Node, directoryPolicy: KeyIdentifier) throws {
        let policy = node.state.withLock { $0.header.macPolicy }
        let carriesNoContents = [.fifo, .socket, .characterDevice, .blockDevice].contains(node.type)
        guard policy == directoryPolicy || carriesNoContents else {
            throw StoreError.crossPolicy
        }
    }

    /// Maps the backing EEXIST of a name collision to `StoreError.exists`.
    func existsOnCollision(_ body: () throws -> Void) throws {
        do {
            try body()
        } catch let error as StoreError where error == .system(EEXIST) {
            throw StoreError.exists
        }
    }

    // MARK: bindings

    func addBinding(_ binding: Binding, to node: Node) throws {
        let key = try headerKey(node)
        do {
            try appendBinding(binding, to: node, key: key)
        } catch StoreError.tooManyLinks {
            // The header may be full of bindings that wait to be dropped: drop them now.
            dropStaleBindings()
            try appendBinding(binding, to: node, key: key)
        }
    }

    private func appendBinding(_ binding: Binding, to node: Node, key: MasterKey) throws {
        try mutateHeader(node, key: key, sync: true) { header in
            guard !header.bindings.contains(binding) else { return }
            guard header.fits(extraBytes: ObjectHeader.bindingBytes(binding)) else { throw StoreError.tooManyLinks }
            header.bindings.append(binding)
        }
    }

    /// Removing a stale name needs no fsync: a leftover binding only keeps an old name valid.
    func removeBinding(_ digest: [UInt8], from node: Node) throws {
        let key = try headerKey(node)
        try mutateHeader(node, key: key, sync: false) { header in
            header.bindings.removeAll { $0.digest == digest }
        }
    }

    /// Rewrites the header after `change`, keeping the backing modification time: metadata
    /// updates must not look like content changes (POSIX: chmod changes ctime only).
    func mutateHeader(_ node: Node, key: MasterKey, sync: Bool, _ change: (inout ObjectHeader) throws -> Void) throws {
        try node.state.withLock { state in
            // A header still flagged by a failed transaction is finished first: rewritten with a
            // new sequence, its journal would no longer match it and the object would stay EIO.
            if state.header.flags.contains(.pendingWrite) { try recoverLocked(node, &state, key: key) }
            var header = state.header
            try change(&header)
            guard header != state.header else { return }
            let headerFD = try headerDescriptor(node, state, writable: true)
            defer { withExtendedLifetime(headerFD) {} }
            let before = node.isDirectory ? nil : try Sys.fstat(headerFD.raw)
            // The other slot may be overwritten without a sync only if the current version is
            // durable; the current one may be replaced in place only if the other slot is a
            // durable state the object can fall back to (not a pending copy whose journal may be
            // gone, nor a size whose extents a shrink or later appends rewrote). Otherwise the
            // old rule: sync, then the other slot.
            let durable = state.durableSequence == state.header.sequence
            let replaceable = state.replaceableSequence == state.header.sequence
            do {
                try slots.write(fd: headerFD.raw, header: &header, key: key, sync: sync,
                                   afterData: !(durable || replaceable), currentIsDurable: durable)
            } catch {
                // Whatever reached the disk is what memory holds; known neither durable nor
                // replaceable, the next write takes the old rule.
                state.header = header
                throw error
            }
            state.header = header
            // Either way the other slot now holds a durable version consistent with the data.
            if sync { state.durableSequence = header.sequence } else { state.replaceableSequence = header.sequence }
            if let before {
                try Sys.futimens(headerFD.raw, (Sys.omitTime, before.st_mtim))
            }
        }
    }
}
