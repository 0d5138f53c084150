import Locking
import Dispatch
import Synchronization
import EncCrypto

/// The master keys a mounted store knows, with the semantics of Linux fscrypt v2 key management.
///
/// - Each `add` by a user is a *claim*; a key stays present while any user claims it.
/// - Removing the last claim drops the table's strong reference. Open files hold their own, so
///   they keep working (soft removal); the entry then reports *incompletely removed*, and its
///   `lingering` weak reference tells whether any file still holds the key. When the last one
///   lets go, `MasterKey.deinit` wipes every byte, the entry reports *absent*, and the wipe
///   observer is told.
/// - A non-root user may claim at most `userQuota` keys (EDQUOT past it).
public final class KeyTable: Sendable {
    public enum Status: Equatable, Sendable {
        case absent
        case present(userCount: Int, addedBySelf: Bool)
        case incompletelyRemoved
    }

    public enum Removal: Equatable, Sendable {
        /// The key is gone (or will be wiped the moment the last open file closes, if `busy`).
        case removed
        /// Files still hold the key: it stays usable by them and is wiped when the last closes.
        case filesBusy
        /// Only the caller's claim was dropped; other users still hold the key.
        case otherUsersRemain
    }

    /// A user's claim, and the keyring entry it came from.
    public struct KeyringClaim: Sendable, Equatable {
        public var uid: UInt32
        public var serial: Int32
        /// Whether the entry is encfsd's own (made by `encfsd key add`), to revoke when the key is
        /// wiped; a key the user placed in the keyring themselves is theirs to keep.
        public var revokeWhenWiped: Bool
        public init(uid: UInt32, serial: Int32, revokeWhenWiped: Bool = false) {
            self.uid = uid
            self.serial = serial
            self.revokeWhenWiped = revokeWhenWiped
        }
    }

    package struct Entry {
        package var key: MasterKey?
        weak var lingering: MasterKey?
        package var claims: [UInt32: KeyringClaim] = [:]
        /// Set by the removed key's deinit. Status reads this rather than `lingering`: reading a
        /// weak reference makes a strong one, which inside the lock could be the last and run the
        /// key's deinit there.
        package var wiped: WipeFlag?
    }

    /// Whether a removed key has been wiped: written by its deinit, which may run on any thread
    /// and takes no lock.
    package final class WipeFlag: Sendable {
        private let done = Atomic(false)
        /// Signalled once, by the wipe: a remover waiting for in-flight releases wakes at the
        /// moment the key is gone instead of polling for it.
        private let signal = DispatchSemaphore(value: 0)
        package func set() {
            done.store(true, ordering: .releasing)
            signal.signal()
        }
        package var isSet: Bool { done.load(ordering: .acquiring) }
        /// Waits until the key is wiped, at most `milliseconds`; whether it was.
        package func wait(milliseconds: Int) -> Bool {
            if isSet { return true }
            guard signal.wait(timeout: .now() + .milliseconds(milliseconds)) == .success else { return isSet }
            signal.signal() // for any other waiter
            return true
        }
    }

    public let userQuota: Int
    private let entries = Lock<[KeyIdentifier: Entry]>([:])
    private let changeCount = Atomic<UInt64>(0)

    /// Grows after every add, removal and wipe: state derived from the keys (a header verified
    /// under one, a locked view without it) and stamped with an earlier value is stale.
    public var changes: UInt64 { changeCount.load(ordering: .acquiring) }

    private func noteChange() { changeCount.add(1, ordering: .releasing) }
    #if ENCFSD_TEST_HOOKS
    /// Key lookups made (each one lock of the table): tests hold the request paths to their count.
    package let lookups = Atomic<Int>(0)
    #endif

    @inline(__always)
    private func countLookup() {
        #if ENCFSD_TEST_HOOKS
        lookups.add(1, ordering: .relaxed)
        #endif
    }
    /// Keyring entries of dropped claims, revoked once their key is wiped. Kept apart from the
    /// entries: a completed removal deletes its entry before the wipe is handled.
    private let dropped = Lock<[KeyIdentifier: [KeyringClaim]]>([:])
    private let wipeObserver: (@Sendable (KeyIdentifier) -> Void)?

    /// - Parameter wipeObserver: told once a removed key has been wiped. It runs on whichever
    ///   thread released the key last, possibly inside this table's lock: it must neither block
    ///   nor call back into the table (hand the work to another thread, which may call
    ///   `takeRevocations`).
    public init(userQuota: Int = 200, wipeObserver: (@Sendable (KeyIdentifier) -> Void)? = nil) {
        self.userQuota = userQuota
        self.wipeObserver = wipeObserver
    }

    /// Adds `key` as `claim.uid`'s claim. Re-adding an incompletely removed key revives the
    /// instance open files still hold, so old and new opens share one key.
    @discardableResult
    public func add(_ key: MasterKey, claim: KeyringClaim) throws(KeyError) -> KeyIdentifier {
        let id = key.identifier
        var superseded: [KeyringClaim] = []
        try entries.withLock { (table: inout [KeyIdentifier: Entry]) throws(KeyError) in
            if claim.uid != 0 {
                let held = table.values.filter { $0.claims[claim.uid] != nil }.count
                if table[id]?.claims[claim.uid] == nil && held >= userQuota { throw .quotaExceeded }
            }
            var entry = table[id] ?? Entry()
            if entry.key == nil { entry.key = entry.lingering ?? key }
            entry.lingering = nil
            entry.wiped = nil
            if let replaced = entry.claims.updateValue(claim, forKey: claim.uid), replaced.serial != claim.serial {
                superseded.append(replaced) // its keyring entry goes when the key does
            }
            table[id] = entry
        }
        if !superseded.isEmpty { dropped.withLock { $0[id, default: []] += superseded } }
        noteChange()
        return id
    }

    /// The key for new work: only keys that are present, not incompletely removed.
    public func key(for identifier: KeyIdentifier) -> MasterKey? {
        countLookup()
        return entries.withLock { $0[identifier]?.key }
    }

    /// The key, or with `allowLingering` a removed key that open files still hold: enough to
    /// resolve names in the directories they live in (as fscrypt's still-keyed directory inodes
    /// do), never to open anything new. One lock either way; the strong reference it makes leaves
    /// the lock with the caller (see `remove`).
    public func key(for identifier: KeyIdentifier, allowLingering: Bool) -> MasterKey? {
        countLookup()
        return entries.withLock { table in
            guard let entry = table[identifier] else { return nil }
            return entry.key ?? (allowLingering ? entry.lingering : nil)
        }
    }


    /// Every key the table knows: present or incompletely removed (for `encfsd status`).
    public func identifiers() -> [KeyIdentifier] {
        entries.withLock { Array($0.keys) }
    }

    public func status(of identifier: KeyIdentifier, uid: UInt32) -> Status {
        entries.withLock { table in
            guard let entry = table[identifier] else { return .absent }
            guard entry.key != nil else { return entry.wiped?.isSet == true ? .absent : .incompletelyRemoved }
            return .present(userCount: entry.claims.count, addedBySelf: entry.claims[uid] != nil)
        }
    }

    /// Drops `uid`'s claim (or every claim), and the key itself once no claim remains.
    public func remove(_ identifier: KeyIdentifier, uid: UInt32, allUsers: Bool) throws(KeyError) -> Removal {
        var released: MasterKey?
        var droppedClaims: [KeyringClaim] = []
        defer { noteChange() }
        let outcome: Removal? = try entries.withLock { (table: inout [KeyIdentifier: Entry]) throws(KeyError) -> Removal? in
            guard var entry = table[identifier] else { throw .noKey }
            if entry.key != nil {
                if allUsers {
                    droppedClaims = Array(entry.claims.values)
                    entry.claims.removeAll()
                } else {
                    guard let claim = entry.claims.removeValue(forKey: uid) else { throw .noKey }
                    droppedClaims = [claim]
                    if !entry.claims.isEmpty {
                        table[identifier] = entry
                        return .otherUsersRemain
                    }
                }
                // Released outside the lock: if nothing else holds it, deinit runs right away
                // and its observer must be free to run.
                released = entry.key
                entry.lingering = entry.key
                entry.key = nil
                let wiped = WipeFlag()
                entry.wiped = wiped
                released?.setWipeObserver(makeObserver(identifier, wiped))
            }
            table[identifier] = entry
            return nil
        }
        // Recorded before the key is released: its wipe may run the moment it is, and the thread
        // handling the wipe asks for these.
        if !droppedClaims.isEmpty { dropped.withLock { $0[identifier, default: []] += droppedClaims } }
        if let outcome { return outcome }
        released = nil
        // Reading a weak reference makes a strong one. If files release the key meanwhile, that
        // strong one can be the last: it must be dropped after the lock, or the key's deinit (and
        // its observer, which takes this lock) would run inside it.
        var survivor: MasterKey?
        defer { survivor = nil }
        return entries.withLock { table in
            guard let entry = table[identifier], entry.key == nil else { return .removed }
            survivor = entry.lingering
            if survivor != nil { return .filesBusy }
            table[identifier] = nil
            return .removed
        }
    }

    /// Waits, at most `milliseconds`, for a removed key that open files still held to be wiped
    /// (their last release), then completes the removal. For the releases the kernel sends just
    /// after the last close(2) returns: fscrypt would evict such inodes at once.
    public func awaitWipe(_ identifier: KeyIdentifier, uid: UInt32, allUsers: Bool, milliseconds: Int) -> Removal {
        guard let flag = entries.withLock({ $0[identifier]?.wiped }) else { return .removed }
        guard flag.wait(milliseconds: milliseconds) else { return .filesBusy }
        return (try? remove(identifier, uid: uid, allUsers: allUsers)) ?? .removed
    }

    /// The key's deinit calls this, wherever its last reference was dropped, so it takes no lock.
    private func makeObserver(_ identifier: KeyIdentifier, _ wiped: WipeFlag) -> @Sendable () -> Void {
        let observer = wipeObserver
        return { [weak self] in
            self?.noteChange()
            wiped.set()
            observer?(identifier)
        }
    }

    /// The keyring entries to revoke now that a removed key was wiped: those of its dropped
    /// claims that are encfsd's own, never one a live claim (of any key) still came from.
    public func takeRevocations(_ identifier: KeyIdentifier) -> [KeyringClaim] {
        let inUse = entries.withLock { table in Set(table.values.flatMap { $0.claims.values.map(\.serial) }) }
        let claims = dropped.withLock { $0.removeValue(forKey: identifier) ?? [] }
        return claims.filter { $0.revokeWhenWiped && $0.serial > 0 && !inUse.contains($0.serial) }
    }

}
