import Synchronization

/// The master keys a mounted store can use, by identifier.
///
/// The table holds one strong reference per added key; open files hold their own. Removing a
/// key drops the table's reference only, so files already open keep reading and writing, and
/// the key is wiped when the last of them lets go (see `MasterKey`).
public final class KeyTable: Sendable {
    private let keys = Mutex<[KeyIdentifier: MasterKey]>([:])

    public init() {}

    /// Adds `key`; adding a key that is already present keeps the existing one.
    @discardableResult
    public func add(_ key: MasterKey) -> KeyIdentifier {
        keys.withLock { table in
            if table[key.identifier] == nil { table[key.identifier] = key }
        }
        return key.identifier
    }

    public func key(for identifier: KeyIdentifier) -> MasterKey? {
        keys.withLock { $0[identifier] }
    }

    /// Drops the table's reference; returns whether the key was present.
    @discardableResult
    public func remove(_ identifier: KeyIdentifier) -> Bool {
        keys.withLock { $0.removeValue(forKey: identifier) != nil }
    }

    public var identifiers: [KeyIdentifier] { keys.withLock { Array($0.keys) } }
}
