import Locking
import Synchronization

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
/// The memo belongs to one `MasterKey` instance and goes with it. Two generations bound it: when
/// the young one is full, it becomes the old one and the oldest generation is dropped, so a
/// working set under the capacity stays resident. Memory is bounded for the whole process, not
/// per key (a user may add hundreds of keys and look up random names under each): all memos
/// together hold about `processLimit` entries, of names up to `largestName` bytes only, and a
/// memo over that budget gives back its own old generation with each entry it takes.
final class NameSealMemo: Sendable {
    private struct Key: Hashable {
        let ad: [UInt8]
        let bytes: [UInt8]

        // Hashed as raw bytes: the synthesized hash feeds the hasher one element at a time,
        // which costs more than the lookup it serves.
        func hash(into hasher: inout Hasher) {
            ad.withUnsafeBytes { hasher.combine(bytes: $0) }
            hasher.combine(ad.count)
            bytes.withUnsafeBytes { hasher.combine(bytes: $0) }
        }
    }

    private struct Generations {
        var young: [Key: [UInt8]] = [:]
        var old: [Key: [UInt8]] = [:]
        var count: Int { young.count + old.count }
    }

    private struct State {
        var seals = Generations()
        var opens = Generations()
    }

    /// Entries of all memos of the process, both ways: about 300 bytes each for names up to
    /// `largestName`, so at most about 10 MB.
    static let processLimit = 32_768
    /// Padded names longer than this (two padding granules, most names) are not remembered.
    static let largestName = 64
    private static let entries = Atomic<Int>(0)

    let capacity: Int
    private let state = Lock(State())

    init(capacity: Int = 8192) { self.capacity = max(capacity, 1) }

    deinit {
        let held = state.withLock { $0.seals.count + $0.opens.count }
        Self.entries.subtract(held, ordering: .relaxed)
    }

    func sealed(ad: [UInt8], plaintext: [UInt8]) -> [UInt8]? {
        guard plaintext.count <= Self.largestName else { return nil }
        var dropped: [Key: [UInt8]] = [:]
        defer { dropped.removeAll() } // freed outside the lock
        return state.withLock { Self.find(Key(ad: ad, bytes: plaintext), in: &$0.seals, capacity: capacity, dropped: &dropped) }
    }

    func opened(ad: [UInt8], sealed: [UInt8]) -> [UInt8]? {
        guard sealed.count <= Self.largestName + 16 else { return nil }
        var dropped: [Key: [UInt8]] = [:]
        defer { dropped.removeAll() }
        return state.withLock { Self.find(Key(ad: ad, bytes: sealed), in: &$0.opens, capacity: capacity, dropped: &dropped) }
    }

    /// A seal or open that OpenSSL just did: `plaintext` seals to `sealed` under `ad`.
    func remember(ad: [UInt8], plaintext: [UInt8], sealed: [UInt8]) {
        guard plaintext.count <= Self.largestName else { return }
        var droppedSeals: [Key: [UInt8]] = [:]
        var droppedOpens: [Key: [UInt8]] = [:]
        defer { droppedSeals.removeAll(); droppedOpens.removeAll() }
        state.withLock { s in
            Self.insert(Key(ad: ad, bytes: plaintext), sealed, into: &s.seals, capacity: capacity, dropped: &droppedSeals)
            Self.insert(Key(ad: ad, bytes: sealed), plaintext, into: &s.opens, capacity: capacity, dropped: &droppedOpens)
        }
    }

    func forgetAll() {
        let old = state.withLock { s -> State in
            defer { s = State() }
            return s
        }
        Self.entries.subtract(old.seals.count + old.opens.count, ordering: .relaxed)
    }

    var count: (seals: Int, opens: Int) {
        state.withLock { ($0.seals.count, $0.opens.count) }
    }

    /// A hit in the old generation moves to the young one, so what is in use survives a turnover.
    private static func find(_ key: Key, in g: inout Generations, capacity: Int, dropped: inout [Key: [UInt8]]) -> [UInt8]? {
        if let hit = g.young[key] { return hit }
        guard let hit = g.old.removeValue(forKey: key) else { return nil }
        entries.subtract(1, ordering: .relaxed)
        insert(key, hit, into: &g, capacity: capacity, dropped: &dropped)
        return hit
    }

    /// Adds an entry, turning the generations over when the young one is full or the process is
    /// over its budget; the dropped generation is handed back to be freed outside the lock. Over
    /// the budget every insert turns over, so such a memo keeps at most two entries each way: all
    /// memos hold at most `processLimit` plus four per memo.
    private static func insert(_ key: Key, _ value: [UInt8], into g: inout Generations, capacity: Int,
                               dropped: inout [Key: [UInt8]]) {
        if g.young.count >= capacity || entries.load(ordering: .relaxed) >= processLimit {
            if g.young[key] != nil { return } // a race on one miss: the same bytes either way
            swap(&dropped, &g.old)
            entries.subtract(dropped.count, ordering: .relaxed)
            g.old = g.young
            g.young = [:]
        }
        // One hash and probe where a look first and an insert after took two.
        if g.young.updateValue(value, forKey: key) == nil { entries.add(1, ordering: .relaxed) }
    }
}
