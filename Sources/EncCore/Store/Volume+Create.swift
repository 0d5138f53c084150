import EncCrypto
import EncKeys
import EncFormat
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
        /// Attributes the object is born with (ACLs inherited from the directory), set on the
        /// backing object before it is entered, so no crash leaves it named without them.
        var xattrs: [(name: [UInt8], value: [UInt8])] = []
    }

    func prepare(parent: UInt64, name: [UInt8], type: ObjectType, mode: UInt32, rdev: UInt64 = 0,
                 caller: Caller) throws -> NewEntry {
        let dir = try node(parent)
        try refuse(dir, ifAny: [.immutable])
        let directory = try key(for: dir, .newNames)
        let (key, dirHeader) = (directory.key, directory.header)
        // An existing entry still under a rekey's old name key is found, so the create collides.
        let encrypted = try resolveName(name, in: dir, key: key, header: dirHeader)
        let (inheritedMode, xattrs) = try inheritedPermissions(from: dir, type: type, mode: mode & 0o7777, umask: caller.umask)
        // ext4 semantics: a set-group-ID directory passes its group on, and the bit to subdirectories.
        let inheritsGroup = dirHeader.mode & UInt32(S_ISGID) != 0
        var permissions = inheritedMode
        if inheritsGroup && type == .directory { permissions |= UInt32(S_ISGID) }
        var header = ObjectHeader(
            type: type, mode: permissions, uid: caller.uid, gid: inheritsGroup ? dirHeader.gid : caller.gid,
            extentSize: type == .directory ? 0 : UInt32(config.extentSize),
            objectID: OpenSSL.random(count: 16), policy: dirHeader.policy, version: slots.newObjectVersion)
        header.rdev = rdev
        if type != .directory && config.makesKeyGroups { header.flags.insert(.keyGroups) }
        header.inodeFlags = Self.inheritedFlags(dirHeader.inodeFlags, type: type)
        header.birthTime = Self.nowNanoseconds()
        header.bindings = [Self.binding(parentID: dirHeader.objectID, name: encrypted)]
        return NewEntry(dir: dir, key: key, name: encrypted, header: header, xattrs: xattrs)
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
    /// in only when its header is complete, so no crash can leave a half-made entry behind. A
    /// backing without O_TMPFILE (or without linkat of an open file) gets the same from a
    /// reserved `.nf-` name renamed into place without replacing: a crash before the rename leaves
    /// only a hidden leftover, never a named entry without its header.
    /// Returns the backing object's `stat` as it was entered, so the reply needs no second one.
    func createFile(_ entry: NewEntry, contents: [UInt8] = []) throws -> (Node, SharedDescriptor, stat) {
        try changingNamespace {
            let dirFD = try changingDirectoryFD(entry.dir)
            guard !capabilities.createsUnnamed else {
                let fd = SharedDescriptor(try dirFD.descriptor.createUnnamed(mode: 0o600))
                return try buildFile(entry, contents: contents, fd: fd) {
                    try fd.descriptor.linkAt(toDir: dirFD.descriptor, entry.name.backingName)
                }
            }
            let temporary = Leftovers.newFilePrefix + Array(Hex.encode(OpenSSL.random(count: 8)).utf8)
            let fd = SharedDescriptor(try dirFD.descriptor.createEntry(temporary, mode: 0o600))
            do {
                return try buildFile(entry, contents: contents, fd: fd) {
                    try dirFD.descriptor.renameNoReplace(temporary, dirFD.descriptor, entry.name.backingName,
                                                         native: capabilities.has(.renameNoReplace))
                }
            } catch {
                try? dirFD.descriptor.unlinkAt(temporary)
                throw error
            }
        }
    }

    /// Writes a new file's header (and contents), makes it durable, then names it with `enter`.
    private func buildFile(_ entry: NewEntry, contents: [UInt8], fd: SharedDescriptor,
                           enter: () throws -> Void) throws -> (Node, SharedDescriptor, stat) {
        var header = entry.header
        let side = try bornSideXattrs(entry, &header)
        do {
            return try buildFile(entry, header: header, side: side, contents: contents, fd: fd, enter: enter)
        } catch {
            if side != nil { removeSideObject(of: header) }
            throw error
        }
    }

    /// On a backing without xattrs, the attributes a new object is born with go to its first
    /// side object, durable before the header naming it is written.
    private func bornSideXattrs(_ entry: NewEntry, _ header: inout ObjectHeader) throws -> SideXattrs? {
        guard !entry.xattrs.isEmpty, !capabilities.has(.userXattrs) else { return nil }
        let side = try createSideXattrs(entry.xattrs, objectID: header.objectID, key: entry.key)
        header.xattrGeneration = side.generation
        return side
    }

    private func buildFile(_ entry: NewEntry, header initial: ObjectHeader, side: SideXattrs?, contents: [UInt8], fd backing: SharedDescriptor,
                           enter: () throws -> Void) throws -> (Node, SharedDescriptor, stat) {
        var header = initial
        try slots.create(fd: backing.descriptor, header: &header, key: entry.key)
        if !contents.isEmpty {
            let file = ExtentFile(backing: backing, journal: journalFD, key: entry.key, header: header, slots: slots)
            try contents.withUnsafeBytes { try file.write(offset: 0, data: $0) }
            try file.commit(header: &header)
        }
        let xattrs = side != nil ? [] : try Self.attachXattrs(entry.xattrs, fd: backing.descriptor, objectID: header.objectID, key: entry.key)
        // Durable before it has a name: an entry that survives a power loss always has a header
        // (every metadata file the store creates is synced before anything depends on it), and
        // the attributes it was born with (metadata, which only fsync covers).
        try xattrs.isEmpty ? backing.descriptor.fdatasync() : backing.descriptor.fsync()
        FaultPoints.reach(.createHeaderWritten)
        try existsOnCollision(enter)
        try Self.stampBirth(backing.descriptor, pathOnly: false)
        let st = try backing.descriptor.fstat()
        let node = insert(inode: UInt64(st.st_ino), identity: backing.descriptor.identity(), headerIdentity: nil,
                          header: header, verified: true,
                          location: Location(parent: entry.dir, name: entry.name.backingName), created: true)
        node.state.withLock {
            if $0.header.sequence == header.sequence { $0.slotSafety.madeDurable(header.sequence) }
            $0.backingXattrs = xattrs
            $0.sideXattrs = side
        }
        return (node, backing, st)
    }

    /// Creates a directory under a temporary name, makes its header durable, then renames it into
    /// place without replacing anything: a power loss never leaves a directory without a header
    /// (the failure that made whole gocryptfs volumes unreadable, its issue #1033).
    func createDirectory(_ entry: NewEntry) throws -> Node {
        try changingNamespace { try createDirectoryLocked(entry) }
    }

    private func createDirectoryLocked(_ entry: NewEntry) throws -> Node {
        let temporary = Array(".mk-\(Hex.encode(OpenSSL.random(count: 8)))".utf8)
        let parentFD = try changingDirectoryFD(entry.dir)
        try parentFD.descriptor.mkdirAt(temporary, mode: 0o700)
        var made: SharedDescriptor?
        var side: SideXattrs?
        do {
            let dirFD = SharedDescriptor(try parentFD.descriptor.openEntry(temporary, .directory, .path))
            made = dirFD
            var header = entry.header
            side = try bornSideXattrs(entry, &header)
            let headerFD = try dirFD.descriptor.createEntry(directoryHeaderName, mode: 0o600)
            try slots.create(fd: headerFD, header: &header, key: entry.key)
            try headerFD.fsync()
            var xattrs: Set<String> = []
            if !entry.xattrs.isEmpty && side == nil {
                let listing = try dirFD.descriptor.listingDescriptor()
                xattrs = try Self.attachXattrs(entry.xattrs, fd: listing, objectID: entry.header.objectID, key: entry.key)
                try listing.fsync()
            }
            try existsOnCollision {
                try parentFD.descriptor.renameNoReplace(temporary, parentFD.descriptor, entry.name.backingName,
                                        native: capabilities.has(.renameNoReplace))
            }
            try Self.stampBirth(dirFD.descriptor, pathOnly: true)
            let st = try dirFD.descriptor.fstat()
            let node = insert(inode: UInt64(st.st_ino), identity: dirFD.descriptor.identity(),
                              headerIdentity: headerFD.identity(), header: header, verified: true,
                              location: Location(parent: entry.dir, name: entry.name.backingName), created: true)
            directories.insert(node.id, dirFD)
            node.state.withLock {
                if $0.header.sequence == header.sequence { $0.slotSafety.madeDurable(header.sequence) }
                $0.backingXattrs = xattrs
                $0.sideXattrs = side
            }
            return node
        } catch {
            if side != nil { removeSideObject(objectID: entry.header.objectID, generation: 1) }
            if let made { try? made.descriptor.unlinkAt(directoryHeaderName) }
            try? parentFD.descriptor.unlinkAt(temporary, directory: true)
            throw error
        }
    }

    /// Gives a new backing object one instant for its atime, mtime and ctime, taken after its
    /// last change (the link or rename that entered it): the steps of a creation otherwise leave
    /// them apart (a symlink's target written after its ctime was set, say), and a later object
    /// could show an earlier mtime than one made before it. `pathOnly`: an O_PATH descriptor
    /// (a directory), which only a path through /proc can reach; an open file is stamped directly.
    static func stampBirth(_ fd: borrowing FileDescriptor, pathOnly: Bool) throws {
        if pathOnly {
            try fd.setTimes((Sys.nowTime, Sys.nowTime))
        } else {
            try fd.futimens((Sys.nowTime, Sys.nowTime))
        }
    }

    /// The reply for a new entry; the reference `insert` took becomes the kernel's lookup.
    /// `stat`: the backing object's, when the caller has just taken it.
    private func entered(_ node: Node, parent: UInt64, name: [UInt8], stat known: stat? = nil) throws -> (UInt64, Attributes) {
        node.state.withLock { _ = $0.dentries.insert(Dentry(parent: parent, name: name)) }
        do {
            try syncIfDirectorySync(try self.node(parent))
            return (node.id, try attributes(node, stat: known))
        } catch {
            release(node)
            throw error
        }
    }

    // MARK: the create family

    public func create(parent: UInt64, name: [UInt8], mode: UInt32, caller: Caller) throws -> (UInt64, Attributes, UInt64) {
        try resolvingNames { try createResolved(parent: parent, name: name, mode: mode, caller: caller) }
    }

    private func createResolved(parent: UInt64, name: [UInt8], mode: UInt32, caller: Caller) throws -> (UInt64, Attributes, UInt64) {
        let entry = try prepare(parent: parent, name: name, type: .regular, mode: mode, caller: caller)
        // O_CREAT|O_EXCL that fails must leave no name behind. So the open's place in the budget
        // is taken before the entry exists, as the kernel takes the descriptor number first, and
        // the open uses the key the create held: a key removed in between is fscrypt's soft
        // removal, which lets an operation already under way finish.
        try openFiles.acquire()
        var budgetHeld = true
        defer { if budgetHeld { openFiles.release() } }
        let (node, fd, st) = try createFile(entry)
        let (id, attributes) = try entered(node, parent: parent, name: name, stat: st)
        budgetHeld = false // the open takes it over
        do {
            return (id, attributes, try open(id, truncate: false, descriptor: fd, created: entry.key))
        } catch {
            release(node) // the kernel never hears of the entry
            throw error
        }
    }

    public func mknod(parent: UInt64, name: [UInt8], mode: UInt32, rdev: UInt64, caller: Caller) throws -> (UInt64, Attributes) {
        try resolvingNames { try mknodResolved(parent: parent, name: name, mode: mode, rdev: rdev, caller: caller) }
    }

    private func mknodResolved(parent: UInt64, name: [UInt8], mode: UInt32, rdev: UInt64, caller: Caller) throws -> (UInt64, Attributes) {
        guard let type = ObjectType(formatBits: mode), type != .directory, type != .symlink else {
            throw StoreError.invalidArgument
        }
        let special = type == .characterDevice || type == .blockDevice
        let entry = try prepare(parent: parent, name: name, type: type, mode: mode, rdev: special ? rdev : 0, caller: caller)
        let (node, _, st) = try createFile(entry)
        return try entered(node, parent: parent, name: name, stat: st)
    }

    public func mkdir(parent: UInt64, name: [UInt8], mode: UInt32, caller: Caller) throws -> (UInt64, Attributes) {
        try resolvingNames { try mkdirResolved(parent: parent, name: name, mode: mode, caller: caller) }
    }

    private func mkdirResolved(parent: UInt64, name: [UInt8], mode: UInt32, caller: Caller) throws -> (UInt64, Attributes) {
        try entered(try createDirectory(try prepare(parent: parent, name: name, type: .directory, mode: mode, caller: caller)),
                    parent: parent, name: name)
    }

    public static let maximumSymlinkTarget = 4095

    public func symlink(parent: UInt64, name: [UInt8], target: [UInt8], caller: Caller) throws -> (UInt64, Attributes) {
        try resolvingNames { try symlinkResolved(parent: parent, name: name, target: target, caller: caller) }
    }

    private func symlinkResolved(parent: UInt64, name: [UInt8], target: [UInt8], caller: Caller) throws -> (UInt64, Attributes) {
        guard !target.isEmpty, !target.contains(0) else { throw StoreError.invalidArgument }
        guard target.count <= Self.maximumSymlinkTarget else { throw StoreError.nameTooLong }
        let entry = try prepare(parent: parent, name: name, type: .symlink, mode: 0o777, caller: caller)
        let (node, _, st) = try createFile(entry, contents: target)
        return try entered(node, parent: parent, name: name, stat: st)
    }

    public func readlink(_ id: UInt64) throws -> [UInt8] {
        let node = try node(id)
        guard node.type == .symlink else { throw StoreError.invalidArgument }
        let key = try key(for: node, .contents).key
        return try node.state.withLock { state in
            let file = try contents(node, state, key: key, writable: false)
            return try file.read(offset: 0, count: Int(file.size))
        }
    }

    /// Gives an object another name. The new name is added to the header's bindings (durably)
    /// before the backing link exists, so the new entry always authenticates.
    public func link(_ id: UInt64, newParent: UInt64, newName: [UInt8]) throws -> (UInt64, Attributes) {
        try resolvingNames { try changingNamespace { try linkLocked(id, newParent: newParent, newName: newName) } }
    }

    private func linkLocked(_ id: UInt64, newParent: UInt64, newName: [UInt8]) throws -> (UInt64, Attributes) {
        guard capabilities.has(.hardLinks) else { throw StoreError.notPermitted }
        let object = try node(id)
        guard !object.isDirectory else { throw StoreError.notPermitted }
        try refuse(object, ifAny: [.immutable, .appendOnly])
        let dir = try node(newParent)
        try refuse(dir, ifAny: [.immutable])
        let directory = try key(for: dir, .newNames)
        let (dirKey, dirHeader) = (directory.key, directory.header)
        try checkSamePolicy(object, directoryPolicy: dirHeader)
        let name = try resolveName(newName, in: dir, key: dirKey, header: dirHeader)
        let binding = Self.binding(parentID: dirHeader.objectID, name: name)
        let location = Location(parent: dir, name: name.backingName)
        do {
            try entering(object, by: binding, at: location) {
                let dirFD = try changingDirectoryFD(dir)
                try withObjectFD(object, .path) { fd in
                    try fd.linkAt(toDir: dirFD.descriptor, name.backingName)
                }
                object.state.withLock { $0.addLocation(location) }
            }
        } catch StoreError.system(EEXIST) {
            throw StoreError.exists
        }
        retain(object)
        return try entered(object, parent: newParent, name: newName)
    }

    /// EXDEV unless the object may live under the directory's policy. FIFOs, sockets and device
    /// nodes carry no encrypted contents, so fscrypt lets them cross policies, and so do we.
    /// During a rekey an object still under the old policy belongs to the tree as much as one
    /// already moved to the new one (the rekey moves it wherever it goes in the tree).
    func checkSamePolicy(_ node: Node, directoryPolicy directory: ObjectHeader) throws {
        let policy = node.state.withLock { $0.header.macPolicy }
        let carriesNoContents = [.fifo, .socket, .characterDevice, .blockDevice].contains(node.type)
        let sameTree = policy == directory.policy || rekeys.successor(of: policy) == directory.policy
            || (directory.previousPolicy != nil && rekeys.successor(of: directory.previousPolicy!) == policy)
        guard sameTree || carriesNoContents else {
            throw StoreError.crossPolicy
        }
    }

    /// Runs a namespace change alone when a fallback in use checks a name before renaming or
    /// renames in several steps (`BackingCapabilities.needsNamespaceLock`); otherwise directly.
    func changingNamespace<T>(_ body: () throws -> T) throws -> T {
        guard capabilities.needsNamespaceLock else { return try body() }
        return try namespaceLock.withLock { _ in try body() }
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

    /// Runs `enter`, which makes `location` lead to `node`, after `binding` for that name is in
    /// the node's header, durably, as one `changingNames` of the node: an earlier move off the
    /// same name may have queued the binding, and the timer dropping it once the name leads here
    /// again would make the object EIO. A binding this call added is never removed here (another
    /// operation may be entering by it): if `enter` fails it is queued as stale, and the timer
    /// keeps it if the failure came after a backing change that left the name leading here.
    /// `queueOnFailure` false: a failure may leave a change that recovery at the next mount
    /// completes (an exchange done as three renames), and the binding stays. `enter` records the
    /// new location itself.
    func entering<T>(_ node: Node, by binding: Binding, at location: Location, queueOnFailure: Bool = true,
                     _ enter: () throws -> T) throws -> T {
        try changingNames(of: node) {
            let added = try addBinding(binding, to: node)
            do {
                return try enter()
            } catch {
                if added && queueOnFailure { bindingWentStale(binding.digest, of: node, at: location) }
                throw error
            }
        }
    }

    /// Runs `body`, which changes which backing names lead to `node` (nil: no node to tell).
    func changingNames<T>(of node: Node?, _ body: () throws -> T) rethrows -> T {
        node?.state.withLock { $0.namesChanging += 1 }
        defer {
            node?.state.withLock { s in
                s.namesChanging -= 1
                s.namesChanged &+= 1
            }
        }
        return try body()
    }

    /// Whether the binding was added (false: the header had it already).
    private func addBinding(_ binding: Binding, to node: Node) throws -> Bool {
        let key = try key(for: node, .header).key
        do {
            return try appendBinding(binding, to: node, key: key)
        } catch StoreError.tooManyLinks {
            // The header may be full of bindings that wait to be dropped: drop them now. This
            // operation has changed no name yet: the timer need not wait for it.
            dropStaleBindings(changingNow: node)
            return try appendBinding(binding, to: node, key: key)
        }
    }

    private func appendBinding(_ binding: Binding, to node: Node, key: MasterKey) throws -> Bool {
        var added = false
        try mutateHeader(node, key: key, sync: true) { header in
            guard !header.bindings.contains(binding) else { return }
            guard header.fits(extraBytes: ObjectHeader.bindingBytes(binding)) else { throw StoreError.tooManyLinks }
            header.bindings.append(binding)
            added = true
        }
        return added
    }

    /// Rewrites the header after `change`, keeping the backing modification time: metadata
    /// updates must not look like content changes (POSIX: chmod changes ctime only).
    func mutateHeader(_ node: Node, key: MasterKey, sync: Bool, _ change: (inout ObjectHeader) throws -> Void) throws {
        try node.state.withLock { state in try mutateHeaderLocked(node, &state, key: key, sync: sync, change) }
    }

    /// `mutateHeader` for a caller already holding the node's lock.
    /// - Parameter unseen: the change is the store's own bookkeeping, which no caller asked for
    ///   (a stale binding dropped): the plaintext ctime stays where it was, as an atime write
    ///   leaves it (`writeAccessTime`), instead of moving a second after the rename that caused it.
    func mutateHeaderLocked(_ node: Node, _ state: inout NodeState, key: MasterKey, sync: Bool, unseen: Bool = false,
                            _ change: (inout ObjectHeader) throws -> Void) throws {
        // A header still flagged by a failed transaction is finished first: rewritten with a
        // new sequence, its journal would no longer match it and the object would stay EIO.
        if state.header.flags.contains(.pendingWrite) { try recoverLocked(node, &state, key: key) }
        var header = state.header
        try change(&header)
        guard header != state.header else { return }
        let headerFD = try headerDescriptor(node, state, writable: true)
        let keepsTimes = unseen && header.version >= 3
        let before = node.isDirectory && !keepsTimes ? nil : try headerFD.descriptor.fstat()
        if keepsTimes, let before {
            header.changeTime = Self.changeTime(before, header: state.header)
            // The mark below sets the backing atime to now: the one shown until then goes first.
            if header.accessTime == 0 && state.accessedAt == nil {
                header.accessTime = Timestamp(before.st_atim).nanosecondsSinceEpoch
            }
        } else {
            // A real change: the plaintext ctime moves with the backing one.
            header.changeTime = 0
        }
        // An atime kept for the handle's close goes with this write.
        if let accessed = state.accessedAt {
            header.accessTime = accessed
            state.accessedAt = nil
        }
        do {
            try slots.writeMetadata(fd: headerFD.descriptor, header: &header, key: key, sync: sync, safety: &state.slotSafety)
        } catch {
            // Whatever reached the disk is what memory holds; known neither durable nor
            // replaceable, the next write takes the old rule.
            state.header = header
            throw error
        }
        state.header = header
        if keepsTimes, let before {
            state.accessTimeWrites += 1
            try headerFD.descriptor.markUnchangedSinceWrite(modified: node.isDirectory ? nil : before.st_mtim)
        } else if let before {
            try headerFD.descriptor.restoreModificationTime(before.st_mtim, accessTime: before.st_atim)
        }
    }
}
