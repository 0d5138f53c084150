import Locking

/// Names this key recently sealed or opened under its name key, both ways: AES-SIV is
/// deterministic, so a name sealed once in a directory always seals to the same bytes, and a
/// ciphertext that opened once always opens to the same name.
///
/// Why: a tree workload seals or opens every name several times over (a create's negative LOOKUP
/// and then the CREATE; the listing that untar's names are read back by; the unlink of a name a
/// listing just opened). Each AES-SIV operation on OpenSSL 3 costs about 29 K instructions,
/// mostly in copying the keyed template (its SIV cannot be re-keyed in place); a hit here costs a
/// hash of the name. `rm -rf` of a tree after untar spent 38% of the daemon's instructions in name
/// SIV (PERFORMANCE.md, tenth session).
///
/// Only results OpenSSL produced go in: a seal's output, or a ciphertext that authenticated. A
/// ciphertext that failed is never remembered, so a forged or damaged name is refused every time.
/// The memo belongs to one `MasterKey` instance and goes with it; plaintext names live here no
/// longer than the key that can produce them. Two generations bound it: when the young one is
/// full, it becomes the old one and the oldest generation is dropped, so a working set under the
/// capacity stays resident and memory stays bounded (at most `2 * capacity` entries each way).
final class NameSealMemo: Sendable {
    private struct Key: Hashable {
        let ad: [UInt8]
        let bytes: [UInt8]
    }

    private struct Generations {
        var young: [Key: [UInt8]] = [:]
        var old: [Key: [UInt8]] = [:]
    }

    private struct State {
        var seals = Generations()
        var opens = Generations()
    }

    let capacity: Int
    private let state = Lock(State())

    init(capacity: Int = 8192) { self.capacity = max(capacity, 1) }

    func sealed(ad: [UInt8], plaintext: [UInt8]) -> [UInt8]? {
        state.withLock { Self.find(Key(ad: ad, bytes: plaintext), in: &$0.seals, capacity: capacity) }
    }

    func opened(ad: [UInt8], sealed: [UInt8]) -> [UInt8]? {
        state.withLock { Self.find(Key(ad: ad, bytes: sealed), in: &$0.opens, capacity: capacity) }
    }

    /// A seal or open that OpenSSL just did: `plaintext` seals to `sealed` under `ad`.
    func remember(ad: [UInt8], plaintext: [UInt8], sealed: [UInt8]) {
        state.withLock { s in
            Self.insert(Key(ad: ad, bytes: plaintext), sealed, into: &s.seals, capacity: capacity)
            Self.insert(Key(ad: ad, bytes: sealed), plaintext, into: &s.opens, capacity: capacity)
        }
    }

    func forgetAll() {
        state.withLock { $0 = State() }
    }

    var count: (seals: Int, opens: Int) {
        state.withLock { ($0.seals.young.count + $0.seals.old.count, $0.opens.young.count + $0.opens.old.count) }
    }

    /// A hit in the old generation moves to the young one, so what is in use survives a turnover.
    private static func find(_ key: Key, in g: inout Generations, capacity: Int) -> [UInt8]? {
        if let hit = g.young[key] { return hit }
        guard let hit = g.old.removeValue(forKey: key) else { return nil }
        insert(key, hit, into: &g, capacity: capacity)
        return hit
    }

    private static func insert(_ key: Key, _ value: [UInt8], into g: inout Generations, capacity: Int) {
        if g.young.count >= capacity {
            g.old = g.young
            g.young = [:]
            g.young.reserveCapacity(capacity)
        }
        g.young[key] = value
    }
}
