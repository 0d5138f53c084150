import Foundation
import Locking
import Synchronization
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// O_PATH descriptors of recently used directories, at most `capacity` of them: lookups, creates
/// and listings in a directory need one, and reopening it from its parent on every request would
/// cost a walk. The least recently used go first; a descriptor in use elsewhere stays open until
/// its user lets go of it (each is one `SharedDescriptor`, closed with its last reference).
/// (Keeping the descriptors of recently looked-up files too was measured: no gain, 2026-12-01.)
final class DescriptorCache: Sendable {
    private struct Entry {
        let descriptor: SharedDescriptor
        var lastUse: UInt64
    }

    private struct State {
        var entries: [UInt64: Entry] = [:]
        var clock: UInt64 = 0
    }

    let capacity: Int
    private let state = Lock(State())

    init(capacity: Int) { self.capacity = max(capacity, 8) }

    func descriptor(_ id: UInt64) -> SharedDescriptor? {
        state.withLock { s in
            guard var entry = s.entries[id] else { return nil }
            s.clock += 1
            entry.lastUse = s.clock
            s.entries[id] = entry
            return entry.descriptor
        }
    }

    func insert(_ id: UInt64, _ descriptor: SharedDescriptor) {
        // Evicted descriptors are released after the lock: closing is a system call.
        var evicted: [SharedDescriptor] = []
        state.withLock { s in
            s.clock += 1
            s.entries[id] = Entry(descriptor: descriptor, lastUse: s.clock)
            guard s.entries.count > capacity else { return }
            // Evict an eighth at once so the scan is paid once per many misses, not per miss.
            let victims = s.entries.sorted { $0.value.lastUse < $1.value.lastUse }.prefix(max(1, capacity / 8))
            for (key, entry) in victims {
                evicted.append(entry.descriptor)
                s.entries[key] = nil
            }
        }
        evicted.removeAll()
    }

    func remove(_ id: UInt64) {
        // Released after the lock, as in `insert`.
        _ = state.withLock { $0.entries.removeValue(forKey: id) }
    }
}

/// How many backing descriptors open files may hold at once. Clients can open as many files as
/// they like; past this, only the open that needs a new descriptor fails (EMFILE), and the
/// directory cache, the journal and one request's transient descriptors per worker still have
/// room, so listing the root or using files already open keeps working.
final class OpenFileBudget: Sendable {
    let limit: Int
    private let held = Atomic<Int>(0)

    init(limit: Int) { self.limit = max(limit, 1) }

    /// Descriptors kept for libfuse, the journal, and per-request transients of every worker.
    static let reserved = 64

    /// The process's soft descriptor limit (the daemon raises it to the hard limit first).
    static var processLimit: Int {
        var r = rlimit()
        return getrlimit(Int32(RLIMIT_NOFILE.rawValue), &r) == 0 ? Int(min(UInt64(r.rlim_cur), UInt64(Int32.max))) : 1024
    }

    /// Takes a place, waiting up to `patience` for one when all are taken. The kernel sends
    /// RELEASE in the background after `close(2)` has returned, so a client that closes each file
    /// before opening the next can still find every place held by releases not yet delivered
    /// (a read of every file under load): it then waits for them, and only a budget that stays
    /// full is refused with EMFILE.
    func acquire(patience: Duration = .seconds(2)) throws {
        let clock = ContinuousClock()
        let deadline = clock.now + patience
        var pause: Duration = .microseconds(100)
        while true {
            let current = held.load(ordering: .relaxed)
            if current < limit {
                if held.compareExchange(expected: current, desired: current + 1, ordering: .relaxed).exchanged { return }
                continue
            }
            guard clock.now < deadline else { throw StoreError.system(EMFILE) }
            let (seconds, attoseconds) = pause.components
            Thread.sleep(forTimeInterval: Double(seconds) + Double(attoseconds) / 1e18)
            pause = min(pause * 2, .milliseconds(10))
        }
    }

    func release() { held.subtract(1, ordering: .relaxed) }
}

extension Volume {
    /// A directory node's O_PATH descriptor: the root's, a cached one, or reopened from where the
    /// directory is entered (its parent's descriptor, recursively, is found the same way).
    ///
    /// - Parameter locations: the directory's locations, when the caller holds its lock (the
    ///   lock is not taken again: a `Lock` traps on re-entry in test builds and deadlocks in release).
    func directoryFD(_ dir: Node, locations known: [Location]? = nil) throws -> SharedDescriptor {
        guard dir.isDirectory else { throw StoreError.notDirectory }
        if let pinned = dir.pinnedDirectory { return pinned }
        if let cached = directories.descriptor(dir.id) { return cached }
        let fd = SharedDescriptor(try reopen(dir, locations: known ?? dir.state.withLock { $0.locations }, .path))
        directories.insert(dir.id, fd)
        return fd
    }

    /// A directory's descriptor for a change of its entries (create, link, rename, unlink):
    /// checked to lie beneath the store root first, so nothing is made or moved outside it.
    func changingDirectoryFD(_ dir: Node) throws -> SharedDescriptor {
        let fd = try directoryFD(dir)
        guard dir.pinnedDirectory == nil else { return fd }
        if let path = knownPath(of: dir) {
            try fd.descriptor.checkBeneath(root: rootPlace, rootFD: storeFD.descriptor, path: path, identity: dir.identity)
        } else {
            try fd.descriptor.checkBeneath(root: rootPlace)
        }
        return fd
    }

    /// Where the daemon last knew `dir` (`backingPath`), joined by "/": a hint for `checkBeneath`,
    /// which checks where it leads from `storeFD`. Nil when the chain is broken or longer than any
    /// path the kernel resolves.
    func knownPath(of dir: Node) -> [UInt8]? {
        guard let components = try? backingPath(of: dir) else { return nil }
        let count = components.reduce(0) { $0 + $1.count + 1 }
        guard count < Int(PATH_MAX) else { return nil }
        var path: [UInt8] = []
        path.reserveCapacity(count)
        for name in components {
            if !path.isEmpty { path.append(0x2f) }
            path.append(contentsOf: name)
        }
        return path
    }

    /// Opens a node's backing object anew from one of its locations. Only the same inode will do:
    /// an entry replaced in the backing store since is passed over (and forgotten).
    ///
    /// Takes the locks of ancestors only (briefly, to read their locations), never the node's
    /// own, so it may be called with the node's lock held; `locations` is read by the caller.
    func reopen(_ node: Node, locations: [Location], _ access: BackingAccess) throws -> FileDescriptor {
        var failure: Error = StoreError.notFound
        for location in locations {
            do {
                let parent = try directoryFD(location.parent)
                let opened = try parent.descriptor.openEntryStat(location.name, node.isDirectory ? .directory : .regularFile, access)
                let identity = node.identity == nil ? nil : opened.descriptor.identity()
                if node.isObject(inode: UInt64(opened.stat.st_ino), identity: identity) {
                    return opened.descriptor
                }
                failure = StoreError.integrity("backing entry of object \(node.id) was replaced by another object")
            } catch {
                failure = error
            }
        }
        throw failure
    }

    /// The node's backing object for one call: the open file's descriptor when it is open (no
    /// system call), else one opened for the call. For use with the node's lock held.
    func objectDescriptor(_ node: Node, _ state: NodeState, _ access: BackingAccess) throws -> SharedDescriptor {
        if node.isDirectory { return try directoryFD(node, locations: state.locations) }
        if let open = state.file?.backing { return open }
        return SharedDescriptor(try reopen(node, locations: state.locations, access))
    }

    /// Where the node's header lives, opened for one call: a directory's `.d` file, or the object.
    func headerDescriptor(_ node: Node, _ state: NodeState, writable: Bool) throws -> SharedDescriptor {
        guard node.isDirectory else { return try objectDescriptor(node, state, writable ? .readWrite : .readOnly) }
        let dir = try directoryFD(node, locations: state.locations)
        // Written only if it is the `.d` that was read, with no other name: a planted hard link
        // to a file elsewhere would otherwise receive the header.
        let fd = writable ? try dir.descriptor.openPrivateFile(directoryHeaderName)
                          : try dir.descriptor.openEntry(directoryHeaderName, .regularFile, .readOnly)
        if let expected = node.headerIdentity, fd.identity() != expected {
            throw StoreError.integrity("the header file of directory \(node.id) was replaced in the backing store")
        }
        return SharedDescriptor(fd)
    }

    /// `body` with the node's backing object (see `objectDescriptor`), taking the node's lock
    /// only to read its state.
    func withObjectFD<R>(_ node: Node, _ access: BackingAccess, _ body: (borrowing FileDescriptor) throws -> R) throws -> R {
        let state = node.state.withLock { $0 }
        let fd = try objectDescriptor(node, state, access)
        return try body(fd.descriptor)
    }

    /// The backing `stat` of a node: from its open descriptor or directory, else by name in its
    /// parent (no descriptor opened).
    func backingStat(_ node: Node) throws -> stat {
        if node.isDirectory {
            let fd = try directoryFD(node)
            return try fd.descriptor.fstat()
        }
        let (open, locations) = node.state.withLock { ($0.file?.backing, $0.locations) }
        if let open { return try open.descriptor.fstat() }
        for location in locations {
            let parent = try directoryFD(location.parent)
            let st = try? parent.descriptor.fstatAt(location.name)
            let found = node.identity == nil ? nil : parent.descriptor.identity(ofEntry: location.name)
            if let st, node.isObject(inode: UInt64(st.st_ino), identity: found) { return st }
        }
        throw StoreError.notFound
    }
}
