import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

enum OpenHandle {
    /// An open file and the node's `ExtentFile`, which stays the node's from its first open to its
    /// last release: a write reaches it without taking the node lock to find it.
    case file(Node, ExtentFile)
    /// A directory's entries as listed at opendir or at the last rewind; `served` once a read
    /// has returned them, so a later read from offset 0 is a rewinddir and lists again.
    case directory(Node, [DirectoryEntry], served: Bool)
}

struct HandleTable {
    var byID: [UInt64: OpenHandle] = [:]
    var nextID: UInt64 = 1
    /// Handles opened with O_NOATIME: their reads never move the atime.
    var withoutAccessTime: Set<UInt64> = []
    /// Handles opened for writing with O_APPEND: while the file is append-only they write nothing
    /// below the end, though the caller may clear O_APPEND with fcntl (the kernel refuses that on
    /// ext4 by testing IS_APPEND, which no FUSE inode has).
    var appending: Set<UInt64> = []
    /// Handles whose open moved the atime while the kernel may still cache the attributes from
    /// before (`Volume.tellKernelOfAccess`).
    var accessUntold: Set<UInt64> = []

    mutating func insert(_ handle: OpenHandle) -> UInt64 {
        let id = nextID
        nextID += 1
        byID[id] = handle
        return id
    }

    /// The node of an open file's handle, and whether the open's atime was still untold (taken:
    /// whoever asks tells the kernel or knows it needs no telling).
    mutating func takeFile(_ handle: UInt64) throws(StoreError) -> (node: Node, accessUntold: Bool) {
        guard case .file(let node, _)? = byID[handle] else { throw StoreError.invalidArgument }
        return (node, accessUntold.remove(handle) != nil)
    }
}

extension Volume {
    func fileNode(handle: UInt64) throws -> Node {
        try openFile(handle: handle).node
    }

    func openFile(handle: UInt64) throws -> (node: Node, file: ExtentFile) {
        rekeys.noteForeground()
        guard case .file(let node, let file)? = handles.withLock({ $0.byID[handle] }) else { throw StoreError.invalidArgument }
        return (node, file)
    }

    func commit(_ file: ExtentFile, _ state: inout NodeState, durability: ExtentFile.Durability = .consistent) throws {
        let safety = try file.commit(header: &state.header, durability: durability)
        state.slotSafety.record(safety, sequence: state.header.sequence)
    }

    /// Runs `body` on the node's open file under the node lock.
    func withOpenFile<R: ~Copyable>(_ node: Node, _ body: (inout NodeState, ExtentFile) throws -> R) throws -> R {
        try node.state.withLock { state in
            guard let file = state.file else { throw StoreError.invalidArgument }
            return try body(&state, file)
        }
    }

    // MARK: open, read, write, flush, release

    /// - Parameter descriptor: the backing file read-write, when the caller has it already (a
    ///   create); otherwise it is opened from the node's location.
    public func open(_ id: UInt64, truncate: Bool) throws -> UInt64 {
        try open(id, truncate: truncate, descriptor: nil)
    }

    /// open(2) with its flags: what the inode flags forbid is refused, and an open for reading
    /// is an access (`noteAccess`) unless it asks for O_NOATIME. The open counts rather than the
    /// reads: with the page cache kept across opens most reads never reach the daemon.
    ///
    /// - Parameter dropSetID: an O_TRUNC open by a caller without CAP_FSETID: the truncate drops
    ///   the set-ID bits, and any O_TRUNC open removes `security.capability`, as on ext4.
    public func open(_ id: UInt64, flags: Int32, dropSetID: Bool = false) throws -> UInt64 {
        let node = try node(id)
        try checkOpen(node, flags: flags)
        let truncate = flags & O_TRUNC != 0
        let handle = try open(id, truncate: truncate, descriptor: nil, dropSetID: dropSetID)
        if truncate { try dropCapability(node) }
        if flags & O_ACCMODE != O_RDONLY, flags & O_APPEND != 0, !kernelWritesPages.load(ordering: .relaxed) {
            handles.withLock { _ = $0.appending.insert(handle) }
        }
        if flags & Sys.noAccessTimeFlag != 0 {
            handles.withLock { _ = $0.withoutAccessTime.insert(handle) }
        } else if flags & O_ACCMODE != O_WRONLY, noteAccess(node, tellKernel: false) {
            handles.withLock { _ = $0.accessUntold.insert(handle) }
        }
        return handle
    }

    /// The kernel learns of an atime an open moved from its own bookkeeping when a read of the
    /// handle reaches the daemon (it drops its cached atime as each READ completes), and
    /// otherwise from the daemon at the close (FLUSH, which close(2) waits for; encfsd never sets
    /// FOPEN_NOFLUSH) or at the release of a handle that had no FLUSH: never at the open. `cat`
    /// and most readers fstat a file right after opening it, and invalidating then made each such
    /// fstat a GETATTR round trip, as did the size check of the read at end of file after a full
    /// invalidation (read-all: 5.4 requests per file instead of 4.4; PERFORMANCE.md, "An atime
    /// told at the read"). As on ext4, whose atime moves at the read, a stat after the read or the
    /// close shows the new atime, and one between open and read the old. Only a read served
    /// wholly from the page cache, followed by a stat before the close, can show the old one (for
    /// up to the attribute timeout).
    func tellKernelOfAccess(_ node: Node) {
        attributesMoved.withLock { $0 }?.notify(node.id)
    }

    /// - Parameters:
    ///   - created: the key and budget place a create took before its entry existed; the open
    ///     uses them and gives the place back if the file is open already or the open fails.
    func open(_ id: UInt64, truncate: Bool, descriptor: SharedDescriptor?, dropSetID: Bool = false,
              created: MasterKey? = nil) throws -> UInt64 {
        var budgetTaken = created != nil
        defer { if budgetTaken { openFiles.release() } }
        let node = try node(id)
        switch node.type {
        case .regular: break
        case .directory: throw StoreError.isDirectory
        default: throw StoreError.invalidArgument
        }
        // What an open file writes in a tree being rekeyed is sealed under the new key. A file
        // just created has the policy `prepare` chose with the key it took: converted now (a
        // new key added meanwhile), its writes would go under the old key, its header naming
        // the new one.
        if created == nil, node.state.withLock({ $0.file == nil }) { try convertForRekey(node) }
        // A file that is already open can be opened again even after its key was removed: it
        // holds the key itself (fscrypt's soft removal). Anything else needs the key present.
        let key = try created ?? key(for: node, .contents).key
        let headerKey = truncate && dropSetID ? try self.key(for: node, .header).key : nil
        let file = try node.state.withLock { state -> ExtentFile in
            if state.file == nil {
                // The open file's descriptor is the object's only long-lived one (see Node).
                if budgetTaken { budgetTaken = false } else { try openFiles.acquire() }
                do {
                    let fd = try descriptor ?? SharedDescriptor(reopen(node, locations: state.locations, .readWrite))
                    state.file = extentFile(fd, key: key, header: state.header)
                } catch {
                    openFiles.release()
                    throw error
                }
            }
            if truncate {
                do {
                    try state.file!.resize(to: 0)
                    try commitTruncate(node, state.file!, &state, droppingSetIDWith: headerKey)
                } catch {
                    if state.opens == 0 { closeFile(&state) }
                    throw error
                }
            }
            state.opens += 1
            return state.file!
        }
        return handles.withLock { $0.insert(.file(node, file)) }
    }

    /// Drops the open file, its descriptor and its place in the budget.
    func closeFile(_ state: inout NodeState) {
        guard state.file != nil else { return }
        state.file = nil
        openFiles.release()
    }

    public func read(handle: UInt64, offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let n = try out.withUnsafeMutableBytes { try read(handle: handle, offset: offset, into: $0) }
        return Array(out[0..<n])
    }

    /// Reads up to `out.count` bytes at `offset` into `out`; returns how many (short at the end of
    /// the file). Committed extents are decrypted after the node lock is dropped (see
    /// `ExtentFile.prepareRead`), so concurrent reads of one file use every core.
    public func read(handle: UInt64, offset: UInt64, into out: UnsafeMutableRawBufferPointer) throws -> Int {
        rekeys.noteForeground()
        // One look at the handle table: the node; the open's atime needs no telling any more (see
        // `tellKernelOfAccess`); and (strictatime: every read that reaches the daemon is an
        // access too, kept in memory only) whether this handle moves atimes at all.
        let strict = accessTimes.rule == .always && !accessTimes.readOnly && keepsInodeMetadata
        let (node, accessed) = try handles.withLock { table throws(StoreError) -> (Node, Bool) in
            let node = try table.takeFile(handle).node
            return (node, strict && !table.withoutAccessTime.contains(handle))
        }
        let lease = try withOpenFile(node) { state, file in
            state.cacheableSinceDirectWrite = true
            if accessed && !state.header.inodeFlags.contains(.noAccessTime) { state.accessedAt = Self.nowNanoseconds() }
            return try file.prepareRead(offset: offset, count: out.count, into: out)
        }
        return try lease.finish(into: out)
    }

    /// - Parameter dropSetID: the writer lacks CAP_FSETID: the set-ID bits go, in the header
    ///   commit that makes this write durable (nothing is written when there are none). The
    ///   write removes `security.capability` in any case, as on ext4.
    /// - Parameter bypassesPageCache: an O_DIRECT write, whose bytes the kernel does not cache.
    /// - Returns: for such a write, whether a read or a cached write was answered since the last
    ///   one (each marks the node under its lock, a read before it reads): only then can the
    ///   kernel hold pages older than this write, and the caller drops the file's pages. A read
    ///   marked after this write's take read the store after this write.
    @discardableResult
    public func write(handle: UInt64, offset: UInt64, data: UnsafeRawBufferPointer, dropSetID: Bool = false,
                      bypassesPageCache: Bool = false) throws -> Bool {
        let (node, file) = try openFile(handle: handle)
        // Whole extents are sealed before the node lock is taken, so concurrent write requests
        // (several writers, or aio at a queue depth) encrypt side by side.
        let presealed = file.sealWholeExtents(offset: offset, data: data)
        let appending = handles.withLock { $0.appending.contains(handle) }
        let (mayHoldCapability, pagesMayBeOlder) = try withOpenFile(node) { state, current in
            try checkWrite(state)
            if appending && offset < current.size && state.header.inodeFlags.contains(.appendOnly) { throw StoreError.notPermitted }
            // A file closed and reopened in between has a new ExtentFile, keyed to the same object:
            // its sealed extents are still valid there, but write them plainly to keep this simple.
            try current.write(offset: offset, data: data, presealed: current === file ? presealed : nil)
            if dropSetID { state.header.mode = Self.modeDroppingSetID(state.header.mode) }
            // FS_SYNC_FL: every write is durable before its reply, as with O_SYNC.
            if state.header.inodeFlags.contains(.sync) {
                try commit(current, &state, durability: .data)
            } else if current.needsCommitForMemory {
                try commit(current, &state)
            }
            // Taken only once the write has succeeded: a failed one leaves the mark to the next.
            let marked = state.cacheableSinceDirectWrite
            state.cacheableSinceDirectWrite = !bypassesPageCache
            return (!holdsNoXattr(state), bypassesPageCache && marked)
        }
        if mayHoldCapability { try dropCapability(node) }
        return pagesMayBeOlder
    }

    /// Commits buffered writes (close(2) of a descriptor, not necessarily the last one).
    public func flush(handle: UInt64) throws {
        rekeys.noteForeground()
        let (node, untold) = try handles.withLock { table throws(StoreError) in try table.takeFile(handle) }
        defer { if untold { tellKernelOfAccess(node) } }
        try withOpenFile(node) { state, file in try commit(file, &state) }
    }

    public func fsync(handle: UInt64, dataOnly: Bool) throws {
        let node = try fileNode(handle: handle)
        try withOpenFile(node) { state, file in
            try commit(file, &state, durability: dataOnly ? .data : .all)
        }
    }

    public func release(handle: UInt64) throws {
        let (released, untold) = handles.withLock { table -> (OpenHandle?, Bool) in
            table.withoutAccessTime.remove(handle)
            table.appending.remove(handle)
            return (table.byID.removeValue(forKey: handle), table.accessUntold.remove(handle) != nil)
        }
        guard case .file(let node, _)? = released else { return }
        // A handle released with its atime still untold never had a FLUSH (close(2) sends one):
        // the kernel is told here rather than not at all.
        if untold { tellKernelOfAccess(node) }
        defer { dropIfUnused(node) }
        let atimeKey = accessTimeKey(node)
        try node.state.withLock { state in
            state.opens -= 1
            defer {
                // lazytime keeps the atime to the forget, but a node the kernel forgot while the
                // file was open goes here: this is its last moment too. Written before a last
                // close closes the descriptor it goes through.
                if let atimeKey, !accessTimes.lazy || (state.lookups == 0 && state.opens == 0) {
                    writeAccessTimeReporting(node, &state, key: atimeKey)
                }
                // The last close drops the file and with it this node's reference to the key, and
                // removes its (empty) shadow.
                if state.opens == 0 {
                    if state.file?.usedJournal == true && !state.header.flags.contains(.pendingWrite) {
                        Journal.remove(journalFD: journalFD.descriptor, objectID: state.header.objectID)
                    }
                    closeFile(&state)
                    if state.sideObjectUnlinked { removeSideObject(of: state.header) }
                }
            }
            if let f = state.file { try commit(f, &state) }
        }
    }

    /// Commits every open file whose oldest buffered change is older than `age`: the timer flush,
    /// which bounds what a daemon death can lose from files nobody closes or syncs.
    ///
    /// - Returns: whether any open file still holds buffered changes (writes are under way).
    @discardableResult
    public func commitIdleFiles(olderThan age: Duration) -> Bool {
        let nodes = table.withLock { Array($0.byID.values) }
        let deadline = ContinuousClock.now - age
        var busy = false
        for node in nodes {
            node.state.withLock { state in
                guard let file = state.file, let since = file.dirtySince else { return }
                guard since < deadline else {
                    busy = true
                    return
                }
                do {
                    try commit(file, &state)
                } catch {
                    Diagnostics.report("timed flush of object \(Hex.encode(state.header.objectID)) failed: \(error)")
                }
            }
        }
        return busy
    }

    // MARK: directories

    public func openDirectory(_ id: UInt64) throws -> UInt64 {
        let dir = try node(id)
        guard dir.isDirectory else { throw StoreError.notDirectory }
        let entries = try list(dir)
        return handles.withLock { $0.insert(.directory(dir, entries, served: false)) }
    }

    /// The entries from `offset`. POSIX wants entries made since opendir to show after
    /// rewinddir, which reaches the daemon as a read from offset 0: that lists the directory
    /// again (except the first read, which opendir's listing already answers).
    public func readDirectory(handle: UInt64, from offset: Int) throws -> ArraySlice<DirectoryEntry> {
        guard case .directory(let dir, var entries, let served)? = handles.withLock({ $0.byID[handle] }) else {
            throw StoreError.invalidArgument
        }
        if offset == 0 && served { entries = try list(dir) }
        if offset == 0 {
            noteAccess(dir)
            handles.withLock { table in
                if table.byID[handle] != nil { table.byID[handle] = .directory(dir, entries, served: true) }
            }
        }
        return offset < entries.count ? entries[offset...] : []
    }

    public func releaseDirectory(handle: UInt64) {
        guard case .directory(let dir, _, _)? = handles.withLock({ $0.byID.removeValue(forKey: handle) }) else { return }
        if !accessTimes.lazy { writeAccessTimeReporting(dir) }
    }

    public func fsyncDirectory(_ id: UInt64) throws {
        let dir = try directoryFD(try node(id))
        let fd = try dir.descriptor.listingDescriptor()
        try fd.fsync()
    }

    /// The directory's entries with plaintext names (no-key names in the locked view).
    /// Entries that fail to decrypt are left out and logged; `encfsd fsck` reports them.
    func list(_ dir: Node) throws -> [DirectoryEntry] {
        let dirFD = try directoryFD(dir)
        let st = try dirFD.descriptor.fstat()
        var entries = [DirectoryEntry(name: [0x2e], inode: UInt64(st.st_ino), typeBits: S_IFDIR),
                       DirectoryEntry(name: [0x2e, 0x2e], inode: UInt64(st.st_ino), typeBits: S_IFDIR)]
        let unlocked = (try? key(for: dir, .names)).map { ($0.key, $0.header) }
        // Names a rekey has not moved yet open under the previous key: one more SIV try each.
        let previousKey = unlocked?.1.previousPolicy.flatMap { keys.key(for: $0, allowLingering: true) }
        for raw in try dirFD.descriptor.listDirectory() {
            let short = NameCodec.ciphertext(ofShortBackingName: raw.name)
            guard short != nil || NameCodec.isLongBackingName(raw.name) else { continue }
            let typeBits: UInt32 = raw.isDirectory ? S_IFDIR : 0
            guard let (key, header) = unlocked else {
                entries.append(DirectoryEntry(name: raw.name, inode: raw.inode, typeBits: typeBits, backingName: raw.name))
                continue
            }
            do {
                func bindings() throws -> [Binding] {
                    let node = try child(of: dir, backingName: raw.name)
                    defer { release(node) }
                    return node.state.withLock { $0.header.bindings }
                }
                let name = try (try? NameResolver.plaintext(of: raw.name, short: short, directoryID: header.objectID, key: key, bindings: bindings))
                    ?? NameResolver.plaintext(of: raw.name, short: short, directoryID: header.objectID, key: previousKey ?? key, bindings: bindings)
                entries.append(DirectoryEntry(name: name, inode: raw.inode, typeBits: typeBits, backingName: raw.name))
            } catch {
                Diagnostics.report("skipping undecryptable entry \(String(decoding: raw.name, as: UTF8.self)): \(error)")
            }
        }
        return entries
    }
}
