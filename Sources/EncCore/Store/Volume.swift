import Synchronization
#if canImport(Glibc)
import Glibc
#endif

struct NodeTable {
    var byID: [UInt64: Node] = [:]
    var byInode: [UInt64: Node] = [:]
    var nextID: UInt64 = Volume.rootID + 1
}

/// A mounted store: the objects the kernel knows (by node ID), their backing objects, and the
/// operations on them. Knows nothing of FUSE; node IDs and lookup counts are the kernel VFS's
/// own concepts, which any front end has.
///
/// Locking: the node table lock is held only to find or insert nodes, never across I/O; each
/// node's lock guards its header and open file. A namespace operation takes at most the locks of
/// the nodes whose headers it rewrites, one at a time.
public final class Volume: Sendable {
    public static let rootID: UInt64 = 1
    public let storePath: String
    public let config: StoreConfig
    public let keys: KeyTable
    /// The `.journal` directory holding the shadows of flush transactions in progress.
    let journalFD: FileDescriptor
    let table = Mutex(NodeTable())
    let handles = Mutex(HandleTable())
    /// Descriptors are held for open files and a bounded set of directories only (see `Node`).
    let directories: DescriptorCache
    let openFiles: OpenFileBudget
    /// Bindings to drop once the renames and unlinks that made them stale are durable.
    let staleBindings = Mutex<[StaleBinding]>([])
    /// Where the store's directory is: every directory the store changes must lie beneath it.
    let rootPlace: Sys.Place
    /// This mount's epoch and the evidence damaged header slots are judged by.
    let slots: HeaderSlots
    /// The store directory, for closing the epoch at a clean unmount.
    let storeFD: FileDescriptor

    public init(storePath: String, keys: KeyTable) throws {
        self.storePath = storePath
        self.keys = keys
        let fd = try Sys.openStoreRoot(storePath)
        config = try StoreConfig.load(storeFD: fd.raw)
        journalFD = try Self.openJournal(storeFD: fd.raw)
        storeFD = fd
        // Durable before any header of this mount is written (EpochRecord).
        let epoch = try EpochRecord.open(storeFD: fd.raw, storeVersion: config.version)
        let slots = HeaderSlots(epoch: epoch.epoch, evidence: epoch.evidence, storeVersion: UInt16(config.version))
        self.slots = slots
        let headerFD = try Sys.openEntry(fd.raw, directoryHeaderName, .regularFile, .readOnly)
        let st = try Sys.fstat(fd.raw)
        rootPlace = Sys.Place(st)
        let identity = Sys.identity(of: fd.raw)
        let headerIdentity = Sys.identity(of: headerFD.raw)
        let (header, verified) = try withExtendedLifetime(headerFD) { try Self.readHeader(headerFD.raw, keys: keys, slots: slots) }
        guard header.type == .directory else { throw StoreError.integrity("root header is not a directory") }
        guard header.policy == config.rootIdentifier, header.macPolicy == header.policy else {
            throw StoreError.integrity("root header policy \(header.policy) differs from encfsd.conf's \(config.rootPolicy)")
        }
        let root = Node(id: Self.rootID, backingInode: UInt64(st.st_ino), identity: identity, headerIdentity: headerIdentity,
                        header: header, verified: verified, location: nil, pinnedDirectory: fd)
        // A quarter of the descriptors for directories, the rest for open files.
        let limit = OpenFileBudget.processLimit - OpenFileBudget.reserved
        directories = DescriptorCache(capacity: min(4096, limit / 4))
        openFiles = OpenFileBudget(limit: limit - directories.capacity)
        root.state.withLock { $0.lookups = 1 }
        table.withLock {
            $0.byID[Self.rootID] = root
            $0.byInode[root.backingInode] = root
        }
    }

    /// Opens `.journal`, creating it durably (directory fsynced) if an older store lacks it.
    static func openJournal(storeFD: Int32) throws -> FileDescriptor {
        do {
            return try Sys.openEntry(storeFD, Journal.directoryName, .directory, .path)
        } catch StoreError.system(ENOENT) {
            try Sys.mkdirAt(storeFD, Journal.directoryName, mode: 0o700)
            let store = try Sys.listingDescriptor(storeFD)
            try withExtendedLifetime(store) { try Sys.fsync(store.raw) }
            return try Sys.openEntry(storeFD, Journal.directoryName, .directory, .path)
        }
    }

    /// A fresh view of the node's contents for I/O through `descriptor`, sharing the journal.
    func extentFile(_ descriptor: FileDescriptor, key: MasterKey, header: ObjectHeader) -> ExtentFile {
        ExtentFile(descriptor: descriptor, journalFD: journalFD.raw, key: key, header: header, slots: slots, storeRoot: rootPlace)
    }

    /// The node's contents for one operation: its open file, or a view opened for the call.
    func contents(_ node: Node, _ state: NodeState, key: MasterKey, writable: Bool) throws -> ExtentFile {
        if let file = state.file { return file }
        return extentFile(try objectDescriptor(node, state, writable ? .readWrite : .readOnly), key: key, header: state.header)
    }

    // MARK: headers and keys

    /// Reads the current header, verifying it when the key that authenticates it is loaded.
    static func readHeader(_ fd: Int32, keys: KeyTable, slots: HeaderSlots) throws -> (ObjectHeader, Bool) {
        let unverified = try slots.read(fd: fd, key: nil)
        guard let key = keys.key(for: unverified.macPolicy) ?? keys.lingeringKey(for: unverified.macPolicy) else {
            return (unverified, false)
        }
        return (try slots.read(fd: fd, key: key), true)
    }

    /// The node's header, verified (re-read if it was first read without the key). ENOKEY when
    /// the key that authenticates it is not loaded.
    func verifiedHeader(_ node: Node) throws -> ObjectHeader {
        try node.state.withLock { state in
            if !state.verified {
                guard let key = keys.key(for: state.header.macPolicy) ?? keys.lingeringKey(for: state.header.macPolicy)
                else { throw StoreError.noKey }
                let fd = try headerDescriptor(node, state, writable: false)
                state.header = try withExtendedLifetime(fd) { try slots.read(fd: fd.raw, key: key) }
                state.verified = true
            }
            return state.header
        }
    }

    /// A directory's name key and header, for resolving and listing names. A removed key that
    /// open files still hold is good enough here, as fscrypt's pinned directory inodes keep
    /// theirs; new objects need `creationDirectory`.
    func namingDirectory(_ dir: Node) throws -> (MasterKey, ObjectHeader) {
        guard dir.isDirectory else { throw StoreError.notDirectory }
        let header = dir.state.withLock { $0.header }
        guard let key = keys.key(for: header.policy) ?? keys.lingeringKey(for: header.policy) else { throw StoreError.noKey }
        // The header is authenticated under the parent's policy; without that key (a directory
        // with its own policy in a locked parent) the names still authenticate themselves.
        return (key, (try? verifiedHeader(dir)) ?? header)
    }

    /// A directory in which new names may be made: its key must be present, not just lingering.
    func creationDirectory(_ dir: Node) throws -> (MasterKey, ObjectHeader) {
        guard dir.isDirectory else { throw StoreError.notDirectory }
        let policy = dir.state.withLock { $0.header.policy }
        guard let key = keys.key(for: policy) else { throw StoreError.noKey }
        return (key, (try? verifiedHeader(dir)) ?? dir.state.withLock { $0.header })
    }

    /// The key of an object's contents, for opening it anew; ENOKEY without it.
    func objectKey(_ node: Node) throws -> MasterKey {
        let policy = node.state.withLock { $0.header.policy }
        guard let key = keys.key(for: policy) else { throw StoreError.noKey }
        let header = try verifiedHeader(node)
        // An interrupted flush transaction is never served half-written: it is replayed from its
        // journal first, or, if that cannot be done, the object is refused (EIO).
        if header.flags.contains(.pendingWrite) { try recover(node, key: key) }
        return key
    }

    /// Replays an interrupted write as soon as the object is seen with its key present, so no
    /// attribute (the size above all) is ever reported from the pending header: the first stat,
    /// lookup or read after a crash already sees the recovered object.
    func recoverIfPossible(_ node: Node) throws {
        let (pending, policy) = node.state.withLock { ($0.header.flags.contains(.pendingWrite), $0.header.policy) }
        guard pending, let key = keys.key(for: policy) else { return }
        _ = try verifiedHeader(node)
        try recover(node, key: key)
    }

    func recover(_ node: Node, key: MasterKey) throws {
        try node.state.withLock { state in
            guard state.header.flags.contains(.pendingWrite) else { return }
            try recoverLocked(node, &state, key: key)
            Diagnostics.report("recovered an interrupted write of object \(Hex.encode(state.header.objectID)) from its journal")
        }
    }

    /// Replays the pending transaction of `state` (the node's lock held).
    func recoverLocked(_ node: Node, _ state: inout NodeState, key: MasterKey) throws {
        let fd = try objectDescriptor(node, state, .readWrite)
        state.header = try withExtendedLifetime(fd) {
            try Journal.recover(journalFD: journalFD.raw, objectFD: fd.raw, pending: state.header, key: key)
        }
        state.durableSequence = state.header.sequence
    }

    /// The key of an object's contents for reading or writing them: that of the open file if the
    /// object is open (it keeps working after the key is removed), else `objectKey`.
    func contentKey(_ node: Node) throws -> MasterKey {
        if let key = node.state.withLock({ $0.file?.key }) { return key }
        return try objectKey(node)
    }

    /// The key that authenticates the node's header, to rewrite it.
    func headerKey(_ node: Node) throws -> MasterKey {
        _ = try verifiedHeader(node)
        let policy = node.state.withLock { $0.header.macPolicy }
        guard let key = keys.key(for: policy) ?? keys.lingeringKey(for: policy) else { throw StoreError.noKey }
        return key
    }

    // MARK: nodes

    func node(_ id: UInt64) throws -> Node {
        guard let node = table.withLock({ $0.byID[id] }) else { throw StoreError.notFound }
        return node
    }

    /// The backing entry name for `name` in `dir`: its encryption when the directory is
    /// unlocked; in the locked view the name must itself be a no-key (backing) name.
    func backingName(of name: [UInt8], in dir: Node) throws -> [UInt8] {
        if let (key, header) = try? namingDirectory(dir) {
            return try NameCodec.encrypt(name, directoryID: header.objectID, key: key).backingName
        }
        guard dir.isDirectory else { throw StoreError.notDirectory }
        guard NameCodec.isEntryName(name) else { throw StoreError.notFound }
        return name
    }

    /// Finds or opens the node of the backing entry `backingName` in `dir`, taking one
    /// reference (released with `release(_:)` or the kernel's forget), and checks that the
    /// object's header lists this entry as one of its names.
    ///
    /// The reference is taken under the table lock, so a concurrent forget cannot drop the node
    /// between finding and counting it (which would let a second node for the same inode appear).
    func child(of dir: Node, backingName: [UInt8]) throws -> Node {
        try childEntry(of: dir, backingName: backingName).node
    }

    /// `child`, also giving the entry's `stat` as this lookup found it (for the object that the
    /// node is: identity checked), so the reply's attributes need not stat it again.
    func childEntry(of dir: Node, backingName: [UInt8]) throws -> (node: Node, stat: stat) {
        let dirFD = try directoryFD(dir)
        let st = try withExtendedLifetime(dirFD) { try Self.statEntry(dirFD.raw, backingName) }
        let location = Location(parent: dir, name: backingName)
        // The entry's identity is needed only to confirm a node already known for its inode.
        let known = table.withLock { $0.byInode[UInt64(st.st_ino)] }
        let found = known?.identity == nil ? nil : withExtendedLifetime(dirFD) { Sys.identity(ofEntry: backingName, in: dirFD.raw) }
        let cached: Node? = known == nil ? nil : table.withLock { t in
            // A node for another object that had this inode number (deleted behind the daemon's
            // back, its number reused) is passed over; `insert` replaces it.
            guard let node = t.byInode[UInt64(st.st_ino)], node === known, node.isObject(inode: UInt64(st.st_ino), identity: found) else {
                return nil
            }
            node.state.withLock {
                $0.lookups += 1
                $0.addLocation(location)
            }
            return node
        }
        let (node, entryStat) = try cached.map { ($0, st) } ?? withExtendedLifetime(dirFD) { try openNode(in: dirFD.raw, at: location, stat: st) }
        do {
            try checkBinding(node, parent: dir, backingName: backingName)
        } catch {
            release(node)
            throw error
        }
        return (node, entryStat)
    }

    /// Takes one more reference to a node already in the table (a new name's entry reply).
    func retain(_ node: Node) {
        table.withLock { _ in node.state.withLock { $0.lookups += 1 } }
    }

    /// Drops a reference taken by `child` or `insert` for the duration of one operation.
    func release(_ node: Node) {
        forget(node.id, count: 1)
    }

    static func statEntry(_ dirFD: Int32, _ backingName: [UInt8]) throws -> stat {
        do {
            return try Sys.fstatAt(dirFD, backingName)
        } catch StoreError.system(ENOENT) {
            throw StoreError.notFound
        }
    }

    func statEntry(in dir: Node, _ backingName: [UInt8]) throws -> stat {
        let fd = try directoryFD(dir)
        return try withExtendedLifetime(fd) { try Self.statEntry(fd.raw, backingName) }
    }

    /// Reads the header of the entry at `location` (whose descriptor is `dirFD`) and adds its
    /// node. Files are opened only for that read; a directory's descriptor goes to the cache.
    private func openNode(in dirFD: Int32, at location: Location, stat st: stat) throws -> (Node, stat) {
        let type: BackingType = switch st.st_mode & S_IFMT {
        case S_IFDIR: .directory
        case S_IFREG: .regularFile
        default: throw StoreError.integrity("backing entry is neither a file nor a directory")
        }
        let (fd, opened) = try Sys.openEntryStat(dirFD, location.name, type, type == .directory ? .path : .readOnly)
        let headerFD = type == .directory ? try Self.openDirectoryHeader(fd.raw) : fd
        let (header, verified) = try withExtendedLifetime(headerFD) { try Self.readHeader(headerFD.raw, keys: keys, slots: slots) }
        let identity = Sys.identity(of: fd.raw)
        let headerIdentity = type == .directory ? Sys.identity(of: headerFD.raw) : nil
        guard (header.type == .directory) == (type == .directory) else {
            throw StoreError.integrity("header type does not match the backing object")
        }
        // Keyed by what was opened, not by the earlier stat: a rename in between must not put one
        // object's header under another's inode.
        let node = insert(inode: UInt64(opened.st_ino), identity: identity, headerIdentity: headerIdentity,
                          header: header, verified: verified, location: location)
        if type == .directory && node.identity == identity { directories.insert(node.id, fd) }
        return (node, opened)
    }

    /// A backing directory's `.d`: one without it is not a directory of the store (EIO).
    static func openDirectoryHeader(_ dir: Int32) throws -> FileDescriptor {
        do {
            return try Sys.openEntry(dir, directoryHeaderName, .regularFile, .readOnly)
        } catch StoreError.system(ENOENT) {
            throw StoreError.integrity("a backing directory without a header (.d)")
        }
    }

    /// Adds a node for a backing object, or returns the one another thread added first; either
    /// way with one reference taken. A node of another object under the same inode number (its
    /// object deleted, the number reused: by the daemon's own create, or behind its back) is
    /// never adopted: it loses its place in `byInode` and keeps only the kernel's references.
    /// An object just created is always new (`created`), even where file handles are missing.
    func insert(inode: UInt64, identity: [UInt8]?, headerIdentity: [UInt8]?, header: ObjectHeader, verified: Bool,
                location: Location, created: Bool = false) -> Node {
        table.withLock { t in
            if let existing = t.byInode[inode], !created, existing.isObject(inode: inode, identity: identity) {
                existing.state.withLock {
                    $0.lookups += 1
                    $0.addLocation(location)
                }
                return existing
            }
            let node = Node(id: t.nextID, backingInode: inode, identity: identity, headerIdentity: headerIdentity,
                            header: header, verified: verified, location: location)
            node.state.withLock { $0.lookups = 1 }
            t.nextID += 1
            t.byID[node.id] = node
            t.byInode[inode] = node
            return node
        }
    }

    func checkBinding(_ node: Node, parent: Node, backingName: [UInt8]) throws {
        guard let (_, parentHeader) = try? namingDirectory(parent) else { return }
        let (verified, bindings) = node.state.withLock { ($0.verified, $0.header.bindings) }
        guard verified else { return }
        let digest = Binding.digest(parentID: parentHeader.objectID, backingName: backingName)
        guard bindings.contains(where: { $0.digest == digest }) else {
            throw StoreError.integrity("object is not bound to this name: moved or swapped in the backing store")
        }
    }

    /// Drops a node nobody refers to any more. References are only ever taken under the table
    /// lock, so the check made here under the same lock cannot race with a new reference.
    func dropIfUnused(_ node: Node) {
        guard node.id != Self.rootID else { return }
        let dropped = table.withLock { t in
            guard t.byID[node.id] === node, node.state.withLock({ $0.lookups == 0 && $0.opens == 0 }) else { return false }
            t.byID[node.id] = nil
            if t.byInode[node.backingInode] === node { t.byInode[node.backingInode] = nil }
            return true
        }
        if dropped && node.isDirectory { directories.remove(node.id) }
    }

    // MARK: lookup, forget, getattr

    public func lookup(parent: UInt64, name: [UInt8]) throws -> (UInt64, Attributes) {
        let dir = try node(parent)
        let (child, st) = try childEntry(of: dir, backingName: try backingName(of: name, in: dir))
        child.state.withLock { _ = $0.dentries.insert(Dentry(parent: parent, name: name)) }
        do {
            return (child.id, try attributes(child, stat: st))
        } catch {
            forget(child.id, count: 1)
            throw error
        }
    }

    /// Looks up an entry a directory listing returned (readdirplus): the same as `lookup` by its
    /// name, without encrypting the name again.
    public func lookup(parent: UInt64, listed entry: DirectoryEntry) throws -> (UInt64, Attributes) {
        guard let backingName = entry.backingName else { throw StoreError.invalidArgument }
        let dir = try node(parent)
        // The listing was made when the handle was opened; if a key came or went since, its
        // names belong to the other view and must not become dentries (the key change already
        // invalidated the cached ones). Locked listings name entries by their backing names.
        let listedUnlocked = entry.name != backingName
        let unlockedNow = dir.state.withLock { keys.key(for: $0.header.policy) ?? keys.lingeringKey(for: $0.header.policy) } != nil
        guard listedUnlocked == unlockedNow else { throw StoreError.invalidArgument }
        let (child, st) = try childEntry(of: dir, backingName: backingName)
        child.state.withLock { _ = $0.dentries.insert(Dentry(parent: parent, name: entry.name)) }
        do {
            return (child.id, try attributes(child, stat: st))
        } catch {
            forget(child.id, count: 1)
            throw error
        }
    }

    public func forget(_ id: UInt64, count: UInt64) {
        guard let node = table.withLock({ $0.byID[id] }) else { return }
        node.state.withLock { $0.lookups -= min($0.lookups, count) }
        dropIfUnused(node)
    }

    public func getattr(_ id: UInt64) throws -> Attributes {
        try attributes(try node(id))
    }

    /// - Parameter known: the object's `stat` if the request already has it (a lookup).
    func attributes(_ node: Node, stat known: stat? = nil) throws -> Attributes {
        // A replayed write changes the backing file: the stat taken before it is stale.
        let replays = node.state.withLock { $0.header.flags.contains(.pendingWrite) }
        try recoverIfPossible(node)
        let st = try (replays ? nil : known) ?? backingStat(node)
        // A directory's metadata lives in its ".d" file, whose rewrite (chmod, chown) does not
        // touch the directory's own ctime: the later of the two is the directory's ctime.
        let headerChange = node.isDirectory ? try statEntry(ofHeaderOf: node).st_ctim : st.st_ctim
        func stamp(_ t: timespec) -> Timestamp { Timestamp(seconds: Int64(t.tv_sec), nanoseconds: Int64(t.tv_nsec)) }
        func later(_ a: timespec, _ b: timespec) -> timespec { (a.tv_sec, a.tv_nsec) >= (b.tv_sec, b.tv_nsec) ? a : b }
        return node.state.withLock { s in
            let size: UInt64 = switch node.type {
            case .directory: 4096
            case .regular, .symlink: s.file?.size ?? s.header.size
            default: 0
            }
            let pending = s.file?.modifiedAt
            var attributes = Attributes(
                inode: UInt64(st.st_ino), mode: node.type.formatBits | s.header.mode, linkCount: UInt32(st.st_nlink),
                uid: s.header.uid, gid: s.header.gid, rdev: s.header.rdev, size: size, blocks: UInt64(st.st_blocks),
                accessTime: stamp(st.st_atim),
                modificationTime: stamp(pending ?? st.st_mtim),
                changeTime: stamp(later(pending ?? st.st_ctim, later(st.st_ctim, headerChange))))
            if node.type == .regular { attributes.blockSize = s.header.extentSize }
            return attributes
        }
    }

    /// A directory's `.d` file, by name (no descriptor opened).
    func statEntry(ofHeaderOf dir: Node) throws -> stat {
        let fd = try directoryFD(dir)
        return try withExtendedLifetime(fd) { try Sys.fstatAt(fd.raw, directoryHeaderName) }
    }

    public func statfs() throws -> FileSystemStatistics {
        let root = try directoryFD(try node(Self.rootID))
        let s = try withExtendedLifetime(root) { try Sys.fstatvfs(root.raw) }
        return FileSystemStatistics(
            blockSize: UInt64(s.f_frsize), blocks: UInt64(s.f_blocks), blocksFree: UInt64(s.f_bfree),
            blocksAvailable: UInt64(s.f_bavail), files: UInt64(s.f_files), filesFree: UInt64(s.f_ffree),
            nameMax: UInt64(NameCodec.maximumNameBytes))
    }
}
