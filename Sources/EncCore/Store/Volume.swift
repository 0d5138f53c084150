import Locking
import Synchronization
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

struct NodeTable {
    var byID: [UInt64: Node] = [:]
    var byInode: [UInt64: Node] = [:]
    var nextID: UInt64 = Volume.rootID + 1
    var forgotten = ForgottenHeaders(capacity: Volume.forgottenHeaderCapacity)
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
    let journalFD: SharedDescriptor
    /// Its filesystem's device, for every file's size limit (`SizeLimit`), stat-ed once.
    let journalDevice: UInt64
    let table = Lock(NodeTable())
    let handles = Lock(HandleTable())
    /// Descriptors are held for open files and a bounded set of directories only (see `Node`).
    let directories: DescriptorCache
    let openFiles: OpenFileBudget
    /// Bindings to drop once the renames and unlinks that made them stale are durable.
    let staleBindings = Lock<[StaleBinding]>([])
    /// Held for a whole drop of stale bindings (its header writes included), so the unmount's
    /// drop, and the clean end of the epoch after it, wait for one the timer thread has begun.
    let droppingStaleBindings = Lock(())
    /// Where the store's directory is: every directory the store changes must lie beneath it.
    let rootPlace: Sys.Place
    /// Trees being moved to another key (Volume+Rekey.swift).
    public let rekeys: RekeyRegistry
    /// What the backing filesystem can do; each missing capability selects its fallback.
    public let capabilities: BackingCapabilities
    /// Held across every namespace change when a fallback needs them to run one at a time
    /// (`BackingCapabilities.needsNamespaceLock`); taken before any node or table lock.
    let namespaceLock = Lock<Void>(())
    /// Held shared from the moment an operation resolves a name until it has acted on it (lookup
    /// and every namespace change), exclusive by a rekey while it starts on a tree and while it
    /// moves one name to the new key's form (`resolvingNames`, `Volume+Rekey`). Without it an
    /// operation could act on a name the rekey had just moved: a rename onto the old form then
    /// made a second entry for the same name, which the rekey could never move (EEXIST), and a
    /// lookup could answer ENOENT for a file that exists. Taken before `namespaceLock`.
    let nameResolution = ReadWriteLock()
    /// `.xattrs`, once a side object was read or written (`Volume+XattrSide`).
    let xattrSideDirectory = Lock<SharedDescriptor?>(nil)
    let sideObjectRefusalReported = Atomic<Bool>(false)
    #if ENCFSD_TEST_HOOKS
    /// Side object files read: tests hold the xattr paths to their count.
    let sideObjectReads = Atomic<Int>(0)
    #endif
    /// This mount's epoch and the evidence damaged header slots are judged by.
    let slots: HeaderSlots
    /// The store directory, for the epoch record.
    let storeFD: SharedDescriptor
    /// A real (listing) open of the store root, made before this mount's first write and kept:
    /// `syncfs` reports writeback errors only since the descriptor it is given was opened.
    let syncFD: FileDescriptor
    /// When reads move atimes (the mount's atime options).
    public let accessTimes: AccessTimeOptions
    /// Told the node whose attributes changed without a request that changes them (an access
    /// moved its atime), so the front end can drop what the kernel caches of them.
    public let attributesMoved = Lock<AttributesMovedObserver?>(nil)
    /// The mount caches writes in the kernel (`-o writeback_cache`): it sends them as whole pages
    /// through any writable handle of the file, so no write can be told to one handle.
    public let kernelWritesPages = Atomic<Bool>(false)

    /// Opens the store. `capabilities` are probed when not given (a caller that probed already,
    /// or that wants the fallbacks of a backing it does not have, passes them).
    /// - Parameter openingEpoch: open this mount's epoch now. A daemon passes false and calls
    ///   `openEpoch()` once nothing can refuse the mount any more.
    public init(storePath: String, keys: KeyTable, capabilities: BackingCapabilities? = nil, openingEpoch: Bool = true,
                accessTimes: AccessTimeOptions = AccessTimeOptions()) throws {
        self.storePath = storePath
        self.accessTimes = accessTimes
        self.keys = keys
        let fd = SharedDescriptor(try Sys.openStoreRoot(storePath))
        config = try StoreConfig.load(storeFD: fd.descriptor)
        rekeys = RekeyRegistry(config: config)
        storeFD = fd
        let reading = try EpochRecord.read(storeFD: fd.descriptor)
        let evidence = reading.evidence(storeVersion: config.version)
        let headerFD = try fd.descriptor.openEntry(directoryHeaderName, .regularFile, .readOnly)
        let st = try fd.descriptor.fstat()
        rootPlace = Sys.Place(st)
        let identity = fd.descriptor.identity()
        let headerIdentity = headerFD.identity()
        let readingSlots = HeaderSlots.reading(evidence: evidence, storeVersion: config.version)
        let (header, verified) = try Self.readHeader(headerFD, keys: keys, slots: readingSlots)
        guard header.type == .directory else { throw StoreError.integrity("root header is not a directory") }
        // A root rekey records its new policy in encfsd.conf before the root header (Rekey.swift).
        let rekeyedFrom = config.rekeys?.first { $0.isRoot }.flatMap { KeyIdentifier(hex: $0.from) }
        guard header.policy == config.rootIdentifier || header.policy == rekeyedFrom, header.macPolicy == header.policy else {
            throw StoreError.integrity("root header policy \(header.policy) differs from encfsd.conf's \(config.rootPolicy)")
        }
        // A store's objects are never in a newer version than its encfsd.conf says; a
        // configuration edited down to version 1 would bring back version 1's weaker rules.
        guard header.version <= config.version else {
            throw StoreError.integrity("the root header is format version \(header.version), newer than encfsd.conf's \(config.version)")
        }
        // Everything above only reads: a store refused there is left as it was.
        journalFD = SharedDescriptor(try Self.openJournal(storeFD: fd.descriptor))
        journalDevice = UInt64(try journalFD.descriptor.fstat().st_dev)
        self.capabilities = try capabilities ?? BackingCapabilities.probe(storeFD: fd.descriptor)
        // A FUSE server may misread UTIME_OMIT; so may whatever a type not found stands for.
        let type = self.capabilities.filesystemType
        if type.hasPrefix("fuse") || type == "unknown" { Sys.omittedTimesNeedResolving.store(true, ordering: .relaxed) }
        // An exchange done as three renames and interrupted completes before anything looks up
        // either name (on any backing: the store may have moved here from one without exchange).
        try ExchangeRecord.recoverAll(journalFD: journalFD.descriptor, storeFD: fd.descriptor)
        syncFD = try fd.descriptor.listingDescriptor()
        slots = HeaderSlots(epoch: 0, evidence: evidence, storeVersion: UInt16(config.version))
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
        if openingEpoch { try openEpoch() }
    }

    /// Opens this mount's epoch: durable before any header of the mount is written (EpochRecord).
    public func openEpoch() throws {
        precondition(slots.epoch == 0, "the epoch is opened once")
        let opened = try EpochRecord.open(storeFD: storeFD.descriptor, storeVersion: config.version)
        slots.epochCell.value.store(opened.epoch, ordering: .releasing)
    }

    /// Opens `.journal`, creating it durably (directory fsynced) if an older store lacks it.
    static func openJournal(storeFD: borrowing FileDescriptor) throws -> FileDescriptor {
        do {
            return try storeFD.openEntry(Journal.directoryName, .directory, .path)
        } catch StoreError.system(ENOENT) {
            try storeFD.mkdirAt(Journal.directoryName, mode: 0o700)
            let store = try storeFD.listingDescriptor()
            try store.fsync()
            return try storeFD.openEntry(Journal.directoryName, .directory, .path)
        }
    }

    /// A fresh view of the node's contents for I/O through `descriptor`, sharing the journal.
    func extentFile(_ descriptor: SharedDescriptor, key: MasterKey, header: ObjectHeader) -> ExtentFile {
        ExtentFile(backing: descriptor, journal: journalFD, key: key, legacyKey: header.previousPolicy.flatMap { keys.key(for: $0, allowLingering: true) },
                   header: header, slots: slots, storeRoot: rootPlace, journalDevice: journalDevice)
    }

    /// The node's contents for one operation: its open file, or a view opened for the call.
    func contents(_ node: Node, _ state: NodeState, key: MasterKey, writable: Bool) throws -> ExtentFile {
        if let file = state.file { return file }
        return extentFile(try objectDescriptor(node, state, writable ? .readWrite : .readOnly), key: key, header: state.header)
    }

    // MARK: nodes

    func node(_ id: UInt64) throws -> Node {
        guard let node = table.withLock({ $0.byID[id] }) else { throw StoreError.notFound }
        return node
    }

    /// The backing entry name for `name` in `dir`: its encryption when the directory is
    /// unlocked; in the locked view the name must itself be a no-key (backing) name.
    func backingName(of name: [UInt8], in dir: Node, naming: KeyGrant?) throws -> [UInt8] {
        if let naming {
            return try resolveName(name, in: dir, key: naming.key, header: naming.header).backingName
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
        try childEntry(of: dir, backingName: backingName, naming: try? key(for: dir, .names)).node
    }

    /// `child`, also giving the entry's `stat` as this lookup found it (for the object that the
    /// node is: identity checked), so the reply's attributes need not stat it again.
    /// `naming` is the directory's name key as the caller found it (nil: locked): it checks the
    /// child's binding, and verifies the child's header when it is the key that authenticates it.
    func childEntry(of dir: Node, backingName: [UInt8], naming: KeyGrant?) throws -> (node: Node, stat: stat) {
        let dirFD = try directoryFD(dir)
        let st = try Self.statEntry(dirFD.descriptor, backingName)
        let location = Location(parent: dir, name: backingName)
        // The entry's identity is needed only to confirm a node, or a forgotten header, already
        // known for its inode.
        let (known, forgotten) = table.withLock { ($0.byInode[UInt64(st.st_ino)], $0.forgotten.contains(UInt64(st.st_ino))) }
        let found = known?.identity == nil && !forgotten ? nil : dirFD.descriptor.identity(ofEntry: backingName)
        let cached: Node? = known == nil ? (forgotten ? remembered(stat: st, identity: found, location: location) : nil) : table.withLock { t in
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
        let (node, entryStat) = try cached.map { ($0, st) } ?? openNode(in: dirFD.descriptor, at: location, stat: st, candidate: naming?.key)
        do {
            try checkBinding(node, parent: naming, backingName: backingName)
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

    /// The node of `inode`, if the table has one, with one more reference taken under the same
    /// hold of the table's lock (so it stays the inode's node until `release`).
    func retainedNode(inode: UInt64) -> Node? {
        table.withLock { t in
            let found = t.byInode[inode]
            found?.state.withLock { $0.lookups += 1 }
            return found
        }
    }

    /// Drops a reference taken by `child` or `insert` for the duration of one operation.
    func release(_ node: Node) {
        forget(node.id, count: 1)
    }

    static func statEntry(_ dirFD: borrowing FileDescriptor, _ backingName: [UInt8]) throws -> stat {
        do {
            return try dirFD.fstatAt(backingName)
        } catch StoreError.system(ENOENT) {
            throw StoreError.notFound
        }
    }

    func statEntry(in dir: Node, _ backingName: [UInt8]) throws -> stat {
        let fd = try directoryFD(dir)
        return try Self.statEntry(fd.descriptor, backingName)
    }

    /// Reads the header of the entry at `location` (whose descriptor is `dirFD`) and adds its
    /// node. Files are opened only for that read; a directory's descriptor goes to the cache.
    private func openNode(in dirFD: borrowing FileDescriptor, at location: Location, stat st: stat, candidate: MasterKey?) throws -> (Node, stat) {
        let type: BackingType = switch st.st_mode & S_IFMT {
        case S_IFDIR: .directory
        case S_IFREG: .regularFile
        default: throw StoreError.integrity("backing entry is neither a file nor a directory")
        }
        let entry = try dirFD.openEntryStat(location.name, type, type == .directory ? .path : .readOnly)
        let opened = entry.stat
        let fd = entry.descriptor
        let header: ObjectHeader, verified: Bool, headerIdentity: [UInt8]?
        if type == .directory {
            let headerFD = try Self.openDirectoryHeader(fd)
            (header, verified) = try Self.readHeader(headerFD, keys: keys, slots: slots, candidate: candidate)
            headerIdentity = headerFD.identity()
        } else {
            (header, verified) = try Self.readHeader(fd, keys: keys, slots: slots, candidate: candidate)
            headerIdentity = nil
        }
        let identity = fd.identity()
        guard (header.type == .directory) == (type == .directory) else {
            throw StoreError.integrity("header type does not match the backing object")
        }
        // Keyed by what was opened, not by the earlier stat: a rename in between must not put one
        // object's header under another's inode.
        let node = insert(inode: UInt64(opened.st_ino), identity: identity, headerIdentity: headerIdentity,
                          header: header, verified: verified, location: location)
        // The kernel asks for ACLs and security.* of nearly every file it looks up (ls -l, the
        // capability probe before writes). Listing the backing xattr names here, on the descriptor
        // the header was read through, spares those a reopen of the file each (Volume+Xattr's cache).
        if type == .regularFile && capabilities.has(.userXattrs), node.identity == identity,
           let names = try? fd.flistxattr() {
            let known = Set(names.filter { $0.hasPrefix(XattrCodec.backingPrefix) })
            node.state.withLock { if $0.backingXattrs == nil { $0.backingXattrs = known } }
        }
        if type == .directory && node.identity == identity { directories.insert(node.id, SharedDescriptor(fd)) }
        return (node, opened)
    }

    /// A backing directory's `.d`: one without it is not a directory of the store (EIO).
    static func openDirectoryHeader(_ dir: borrowing FileDescriptor) throws -> FileDescriptor {
        do {
            return try dir.openEntry(directoryHeaderName, .regularFile, .readOnly)
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
            Self.insert(&t, inode: inode, identity: identity, headerIdentity: headerIdentity, header: header,
                        verified: verified, location: location, created: created)
        }
    }

    private static func insert(_ t: inout NodeTable, inode: UInt64, identity: [UInt8]?, headerIdentity: [UInt8]?,
                               header: ObjectHeader, verified: Bool, location: Location, created: Bool) -> Node {
        if let existing = t.byInode[inode], !created, existing.isObject(inode: inode, identity: identity) {
            existing.state.withLock {
                $0.lookups += 1
                $0.addLocation(location)
            }
            return existing
        }
        t.forgotten.remove(inode)
        let node = Node(id: t.nextID, backingInode: inode, identity: identity, headerIdentity: headerIdentity,
                        header: header, verified: verified, location: location)
        node.state.withLock { $0.lookups = 1 }
        t.nextID += 1
        t.byID[node.id] = node
        t.byInode[inode] = node
        return node
    }

    /// Files whose headers are kept once the kernel has forgotten them (`ForgottenHeaders`).
    static let forgottenHeaderCapacity = 16384

    /// A node made from the forgotten header of the file `st` describes, if it is still the
    /// object that was forgotten and unchanged since; nil sends the caller to read the header.
    private func remembered(stat st: stat, identity found: [UInt8]?, location: Location) -> Node? {
        let inode = UInt64(st.st_ino)
        let keyChanges = keys.changes
        return table.withLock { t -> Node? in
            guard t.byInode[inode] == nil, let entry = t.forgotten.take(inode), let found, entry.identity == found,
                  entry.fingerprint == ForgottenHeaders.Fingerprint(st), entry.keyChanges == keyChanges else { return nil }
            let node = Self.insert(&t, inode: inode, identity: entry.identity, headerIdentity: nil, header: entry.header,
                                   verified: entry.verified, location: location, created: false)
            node.state.withLock {
                $0.backingXattrs = entry.backingXattrs
                $0.slotSafety = entry.slotSafety
            }
            return node
        }
    }

    /// Keeps the header of a file node just dropped (`ForgottenHeaders`), with the stat of its
    /// backing file taken now, under the node's lock, after the last change made through it. Only
    /// a directory descriptor already open is used: a forget never opens anything.
    private func rememberForgotten(_ node: Node, reservation: UInt64) {
        let entry = rememberedEntry(node)
        table.withLock { t in
            guard let entry else { return t.forgotten.cancel(node.backingInode, reservation: reservation) }
            t.forgotten.put(node.backingInode, entry, reservation: reservation)
        }
    }

    private func rememberedEntry(_ node: Node) -> ForgottenHeaders.Entry? {
        guard let identity = node.identity else { return nil }
        let keyChanges = keys.changes
        return node.state.withLock { s -> ForgottenHeaders.Entry? in
            guard !s.header.flags.contains(.pendingWrite), let location = s.locations.last,
                  let dirFD = location.parent.pinnedDirectory ?? directories.descriptor(location.parent.id),
                  let st = try? dirFD.descriptor.fstatAt(location.name),
                  UInt64(st.st_ino) == node.backingInode, st.st_mode & S_IFMT == S_IFREG, st.st_nlink > 0 else { return nil }
            var now = timespec()
            clock_gettime(CLOCK_REALTIME, &now)
            let age = (Int64(now.tv_sec) - Int64(st.st_ctim.tv_sec)) * 1_000_000_000 + Int64(now.tv_nsec) - Int64(st.st_ctim.tv_nsec)
            guard age >= ForgottenHeaders.racyInterval else { return nil }
            let xattrs = s.backingXattrs.flatMap { $0.count <= ForgottenHeaders.largestXattrSet ? $0 : nil }
            return ForgottenHeaders.Entry(identity: identity, fingerprint: .init(st), header: s.header, verified: s.verified,
                                          slotSafety: s.slotSafety, backingXattrs: xattrs, keyChanges: keyChanges)
        }
    }

    func checkBinding(_ node: Node, parent naming: KeyGrant?, backingName: [UInt8]) throws {
        guard let parentHeader = naming?.header else { return }
        let (verified, bindings) = node.state.withLock { ($0.verified, $0.header.bindings) }
        guard verified else { return }
        guard NameResolver.isBound(bindings, parentID: parentHeader.objectID, backingName: backingName) else {
            throw StoreError.integrity("object is not bound to this name: moved or swapped in the backing store")
        }
    }

    /// Drops a node nobody refers to any more. References are only ever taken under the table
    /// lock, so the check made here under the same lock cannot race with a new reference.
    func dropIfUnused(_ node: Node) {
        guard node.id != Self.rootID else { return }
        let (dropped, reservation) = table.withLock { t -> (Bool, UInt64?) in
            guard t.byID[node.id] === node, node.state.withLock({ $0.lookups == 0 && $0.opens == 0 }) else { return (false, nil) }
            t.byID[node.id] = nil
            // A node that lost its inode to another object's is not that inode's header.
            guard t.byInode[node.backingInode] === node else { return (true, nil) }
            t.byInode[node.backingInode] = nil
            return (true, node.isDirectory || node.identity == nil ? nil : t.forgotten.reserve(node.backingInode))
        }
        if dropped && node.isDirectory { directories.remove(node.id) }
        if let reservation { rememberForgotten(node, reservation: reservation) }
    }

    // MARK: lookup, forget, getattr

    public func lookup(parent: UInt64, name: [UInt8]) throws -> (UInt64, Attributes) {
        try resolvingNames { try lookupResolved(parent: parent, name: name) }
    }

    /// Runs an operation that resolves names and acts on them under `nameResolution`, shared.
    func resolvingNames<T>(_ body: () throws -> T) rethrows -> T {
        nameResolution.lockShared()
        defer { nameResolution.unlockShared() }
        return try body()
    }

    private func lookupResolved(parent: UInt64, name: [UInt8]) throws -> (UInt64, Attributes) {
        rekeys.noteForeground()
        let dir = try node(parent)
        let naming = try? key(for: dir, .names)
        let (child, st) = try childEntry(of: dir, backingName: try backingName(of: name, in: dir, naming: naming), naming: naming)
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
        // A listed name is resolved too (it was read before): a move between the listing and
        // the open would leave the node located under the old form only.
        try resolvingNames { try lookupResolved(parent: parent, listed: entry) }
    }

    private func lookupResolved(parent: UInt64, listed entry: DirectoryEntry) throws -> (UInt64, Attributes) {
        guard let backingName = entry.backingName else { throw StoreError.invalidArgument }
        let dir = try node(parent)
        // The listing was made when the handle was opened; if a key came or went since, its
        // names belong to the other view and must not become dentries (the key change already
        // invalidated the cached ones). Locked listings name entries by their backing names.
        let listedUnlocked = entry.name != backingName
        let naming = try? key(for: dir, .names)
        guard listedUnlocked == (naming != nil) else { throw StoreError.invalidArgument }
        let (child, st) = try childEntry(of: dir, backingName: backingName, naming: naming)
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
        let forgotten = node.state.withLock {
            $0.lookups -= min($0.lookups, count)
            return $0.lookups == 0 && $0.opens == 0 && $0.accessedAt != nil
        }
        // lazytime: the last moment the atime can still be written from this node.
        if forgotten { writeAccessTimeReporting(node) }
        dropIfUnused(node)
    }

    public func getattr(_ id: UInt64) throws -> Attributes {
        try attributes(try node(id))
    }

    /// - Parameter known: the object's `stat` if the request already has it (a lookup).
    func attributes(_ node: Node, stat known: stat? = nil) throws -> Attributes {
        var known = known
        // An atime write moves the backing ctime, then marks it (AccessTimes.swift) under the node
        // lock, while these stats are taken without it: a stat caught between the two is taken again.
        var attempt = 0
        while true {
            // A replayed write changes the backing file: the stat taken before it is stale.
            let (replays, writes) = node.state.withLock { ($0.header.flags.contains(.pendingWrite), $0.accessTimeWrites) }
            try recoverIfPossible(node)
            let st = try (replays ? nil : known) ?? backingStat(node)
            // A directory's metadata lives in its ".d" file, whose rewrite (chmod, chown) does not
            // touch the directory's own ctime: the later of the two is the directory's ctime.
            let headerStat = node.isDirectory ? try statEntry(ofHeaderOf: node) : st
            if let attributes = node.state.withLock({ s in
                s.accessTimeWrites == writes || attempt == 3 ? Self.attributes(node, s, stat: st, headerStat: headerStat) : nil
            }) {
                return attributes
            }
            known = nil
            attempt += 1
        }
    }

    private static func attributes(_ node: Node, _ s: NodeState, stat st: stat, headerStat: stat) -> Attributes {
        func later(_ a: timespec, _ b: timespec) -> timespec { (a.tv_sec, a.tv_nsec) >= (b.tv_sec, b.tv_nsec) ? a : b }
        func spec(_ ns: UInt64) -> timespec { timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000)) }
        // An atime write leaves the plaintext ctime in the header (AccessTimes.swift).
        let headerChange = spec(changeTime(headerStat, header: s.header))
        let ownChange = node.isDirectory ? st.st_ctim : headerChange
        let accessed = s.accessedAt ?? (s.header.accessTime != 0 ? s.header.accessTime : nil)
        let size: UInt64 = switch node.type {
        case .directory: 4096
        case .regular, .symlink: s.file?.size ?? s.header.size
        default: 0
        }
        let pending = s.file?.modifiedAt
        var attributes = Attributes(
            inode: UInt64(st.st_ino), mode: node.type.formatBits | s.header.mode, linkCount: UInt32(st.st_nlink),
            uid: s.header.uid, gid: s.header.gid, rdev: s.header.rdev, size: size, blocks: UInt64(st.st_blocks),
            accessTime: accessed.map { Timestamp(nanosecondsSinceEpoch: $0) } ?? Timestamp(st.st_atim),
            modificationTime: Timestamp(pending ?? st.st_mtim),
            changeTime: Timestamp(later(pending ?? ownChange, later(ownChange, headerChange))))
        if node.type == .regular { attributes.blockSize = s.header.extentSize }
        // A v1 header has no field for it: the time set at creation would be gone at remount.
        if s.header.version >= 2 && s.header.birthTime != 0 {
            attributes.birthTime = Timestamp(nanosecondsSinceEpoch: s.header.birthTime)
        }
        return attributes
    }

    /// A directory's `.d` file, by name (no descriptor opened).
    func statEntry(ofHeaderOf dir: Node) throws -> stat {
        let fd = try directoryFD(dir)
        return try fd.descriptor.fstatAt(directoryHeaderName)
    }

    public func statfs() throws -> FileSystemStatistics {
        let root = try directoryFD(try node(Self.rootID))
        let s = try root.descriptor.fstatvfs()
        return FileSystemStatistics(
            blockSize: UInt64(s.f_frsize), blocks: UInt64(s.f_blocks), blocksFree: UInt64(s.f_bfree),
            blocksAvailable: UInt64(s.f_bavail), files: UInt64(s.f_files), filesFree: UInt64(s.f_ffree),
            nameMax: UInt64(NameCodec.maximumNameBytes))
    }
}

/// The front end's callback for `Volume.attributesMoved`, in a class so that taking it out of the
/// lock copies a reference: a bare closure there came out wrapped in two more reabstraction
/// thunks at every `withLock { $0 }`, and kept them (the inout write-back stored the wrapped one),
/// so every access that moved an atime made the next call deeper, until the stack ran out.
public final class AttributesMovedObserver: Sendable {
    public let notify: @Sendable (UInt64) -> Void
    public init(_ notify: @escaping @Sendable (UInt64) -> Void) { self.notify = notify }
}
