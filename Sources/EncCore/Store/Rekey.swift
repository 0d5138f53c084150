import Locking
import EncCrypto
import EncKeys
import EncFormat
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The trees of a mounted store that are moving from one master key to another (issue 11), and
/// how far each has got.
///
/// The authoritative state is in the store: the tree's record in `encfsd.conf` (written before
/// anything is sealed under the new key) and, per object, its header's `previousPolicy` and
/// legacy ranges. This registry is what the running daemon knows of it: it answers "does key A
/// have a successor?" on every namespace change (so new names and headers go under the new key)
/// and carries the progress `encfsd rekey status` reports.
public final class RekeyRegistry: Sendable {
    public struct Progress: Sendable, Equatable {
        public var objectsDone: UInt64 = 0
        public var objectsTotal: UInt64 = 0
        public var bytesDone: UInt64 = 0
        public var bytesTotal: UInt64 = 0
        /// Objects still under the old key that cannot be moved because it is gone (they read ENOKEY).
        public var objectsLocked: UInt64 = 0
        /// Plaintext bytes re-encrypted since the daemon started on the tree (for the rate).
        public var bytesRewritten: UInt64 = 0
        public var elapsedNanoseconds: UInt64 = 0
        public var finished = false
    }

    public struct Tree: Sendable {
        public var record: StoreConfig.RekeyRecord
        public var from: KeyIdentifier
        public var to: KeyIdentifier
        public var rootObjectID: [UInt8]
        public var progress = Progress()
        let started: ContinuousClock.Instant

        init?(_ record: StoreConfig.RekeyRecord) {
            guard let from = KeyIdentifier(hex: record.from), let to = KeyIdentifier(hex: record.to),
                  let root = Hex.decode(record.root) else { return nil }
            self.record = record
            self.from = from
            self.to = to
            rootObjectID = root
            started = .now
        }
    }

    private struct State {
        var config: StoreConfig
        var trees: [Tree]
        /// Trees finished since the mount, kept for `rekey status` and `rekey wait`.
        var finished: [Tree] = []
        var workerRunning = false
    }

    private let state: Lock<State>
    /// Foreground requests served (file reads, writes, flushes, lookups): the worker rests after a
    /// batch only if some came meanwhile, so an idle mount is rekeyed at full speed.
    let foreground = Atomic<UInt64>(0)

    func noteForeground() { foreground.add(1, ordering: .relaxed) }

    /// Held by the one batch (and its rest) allowed to run while foreground requests come.
    private let pacer = Lock(())

    /// Runs `batch` as the only paced batch of the daemon, then rests `restFactor` times as long
    /// as it took before letting the next one run: how the worker's lanes yield to foreground
    /// requests (see `Volume.rekeyRestFactor`).
    func paced(_ restFactor: Double, _ batch: () throws -> Int) throws -> Int {
        try pacer.withLock { _ in
            let start = ContinuousClock.now
            let result = try batch()
            let took = (ContinuousClock.now - start).components
            let seconds = Double(took.seconds) + Double(took.attoseconds) / 1e18
            Thread.sleep(forTimeInterval: seconds * restFactor)
            return result
        }
    }

    /// Set at unmount: the worker stops between batches, before the mount's epoch is closed.
    let stopRequested = Atomic(false)

    init(config: StoreConfig) {
        state = Lock(State(config: config, trees: (config.rekeys ?? []).compactMap(Tree.init)))
    }

    /// The key replacing `policy` in a tree being rekeyed, if any.
    public func successor(of policy: KeyIdentifier) -> KeyIdentifier? {
        state.withLock { s in s.trees.first { $0.from == policy }?.to }
    }

    public var config: StoreConfig { state.withLock { $0.config } }
    var active: [Tree] { state.withLock { $0.trees } }

    /// The tree rooted at the object `objectID`, active or finished since the mount.
    public func tree(rootedAt objectID: [UInt8]) -> Tree? {
        state.withLock { s in s.trees.first { $0.rootObjectID == objectID } ?? s.finished.last { $0.rootObjectID == objectID } }
    }

    /// The tree (active, or finished since the mount) whose old or new key is `policy`.
    public func tree(involving policy: KeyIdentifier) -> Tree? {
        state.withLock { s in
            s.trees.first { $0.from == policy || $0.to == policy } ?? s.finished.last { $0.from == policy || $0.to == policy }
        }
    }

    func update(_ objectID: [UInt8], _ change: (inout Progress) -> Void) {
        state.withLock { s in
            guard let i = s.trees.firstIndex(where: { $0.rootObjectID == objectID }) else { return }
            change(&s.trees[i].progress)
            let elapsed = (ContinuousClock.now - s.trees[i].started).components
            s.trees[i].progress.elapsedNanoseconds = UInt64(elapsed.seconds) * 1_000_000_000 + UInt64(elapsed.attoseconds / 1_000_000_000)
        }
    }

    /// Changes the configuration and writes it to the store before the change takes effect here.
    func changeConfig(storeFD: borrowing FileDescriptor, _ change: (inout StoreConfig, inout [Tree], inout [Tree]) throws -> Void) throws {
        try state.withLock { s in
            // What the CLI wrote meanwhile (`key change-passphrase` adds a passphrase entry) is kept.
            let current = (try? StoreConfig.load(storeFD: storeFD)) ?? s.config
            var config = current
            var trees = s.trees
            var finished = s.finished
            try change(&config, &trees, &finished)
            if config != current { try Self.write(config, storeFD: storeFD) }
            s.config = config
            s.trees = trees
            s.finished = finished
        }
    }

    /// Claims the worker slot: true if the caller is now the one worker thread.
    func claimWorker() -> Bool {
        state.withLock { s in
            guard !s.workerRunning else { return false }
            s.workerRunning = true
            return true
        }
    }

    /// Gives the worker slot back unless trees remain (then the caller keeps working).
    func releaseWorker() -> Bool {
        state.withLock { s in
            guard s.trees.isEmpty || stopRequested.load(ordering: .acquiring) else { return false }
            s.workerRunning = false
            return true
        }
    }

    /// Stops the worker and waits until it has: no header may be written after a clean unmount
    /// is recorded (a torn write would then read as damage). What it had not done resumes at the
    /// next mount.
    public func stop() {
        stopRequested.store(true, ordering: .releasing)
        while state.withLock({ $0.workerRunning }) { usleep(10_000) }
    }

    /// Replaces `encfsd.conf` atomically; see `StoreConfig.replace`.
    static func write(_ config: StoreConfig, storeFD: borrowing FileDescriptor) throws { try StoreConfig.replace(config, storeFD: storeFD) }
}

extension StoreConfig {
    /// Replaces the `encfsd.conf` of the store at `storePath` atomically.
    public static func replace(_ config: StoreConfig, storePath: String) throws {
        let root = try Sys.openStoreRoot(storePath)
        try replace(config, storeFD: root)
    }

    /// Replaces `encfsd.conf` atomically: the new contents go to an unnamed file, synced, linked
    /// under a temporary `.conf-` name and renamed over the old file, then the directory is
    /// synced. A crash leaves the old or the new configuration, at worst a `.conf-` leftover.
    /// A backing without O_TMPFILE or linkat of an open file (bindfs, sshfs, GlusterFS) gets the
    /// `.conf-` file made under its name, which no reader takes for the configuration.
    static func replace(_ config: StoreConfig, storeFD: borrowing FileDescriptor) throws {
        let dir = try storeFD.listingDescriptor()
        let temporary = Array(".conf-\(Hex.encode(OpenSSL.random(count: 8)))".utf8)
        let contents = Array(config.encoded())
        func durable(_ fd: consuming FileDescriptor) throws -> FileDescriptor {
            try contents.withUnsafeBytes { try fd.pwrite($0, offset: 0) }
            try fd.fsync()
            return fd
        }
        let linked = (try? durable(dir.createUnnamed(mode: 0o644)).linkAt(toDir: dir, temporary)) != nil
        if !linked { _ = try durable(dir.createEntry(temporary, mode: 0o644)) }
        try dir.renameAt(temporary, dir, Array(StoreConfig.fileName.utf8))
        try dir.fsync()
    }
}
