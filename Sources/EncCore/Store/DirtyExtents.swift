import EncFormat

/// The extents an open file has changed since its last commit, each held in exactly one form:
///
/// - `plain`: plaintext of a partly written extent, `extentSize` bytes (zero past the file's end),
///   sealed at commit;
/// - `sealed`: a whole extent sealed when it was written (or resealed by a rekey), written in place
///   at commit;
/// - `written`: a whole extent past the committed end, already in the backing file, waiting only
///   for a header to cover it.
///
/// Invariant: an index is in at most one of the three, and each lies inside the file as it is
/// now (`clip` on every shrink). The setters below are the only way in, so the invariant cannot be
/// broken by a caller that updates one map and forgets another.
struct DirtyExtents {
    private(set) var plain: [UInt64: [UInt8]] = [:]
    private(set) var sealed: [UInt64: [UInt8]] = [:]
    /// A range set: a stream adds one range per write, not one member per extent.
    private(set) var written = ExtentRangeSet()

    var isEmpty: Bool { plain.isEmpty && sealed.isEmpty && written.isEmpty }

    /// Whether a write or rekey holds `index` in memory (plain or sealed, not yet in place).
    func buffers(_ index: UInt64) -> Bool { plain[index] != nil || sealed[index] != nil }

    /// Plaintext bytes of whole extents held in memory (`written` ones are on disk already).
    func bufferedBytes(extentSize: Int) -> Int { (plain.count + sealed.count) * extentSize }

    /// Takes every extent this commit will write or has written out of `set` (the legacy ranges
    /// it leaves).
    func removeChanged(from set: inout ExtentRangeSet) {
        guard !set.isEmpty else { return }
        for index in plain.keys { set.remove(index) }
        for index in sealed.keys { set.remove(index) }
        for range in written.ranges { set.remove(range) }
    }

    mutating func setPlain(_ index: UInt64, _ bytes: [UInt8]) {
        sealed[index] = nil
        written.remove(index)
        plain[index] = bytes
    }

    /// Changes the plaintext of an extent already held plain (`setPlain` first).
    mutating func modifyPlain<R>(_ index: UInt64, _ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try plain[index]!.withUnsafeMutableBytes(body)
    }

    mutating func setSealed(_ index: UInt64, _ stored: [UInt8]) {
        plain[index] = nil
        written.remove(index)
        sealed[index] = stored
    }

    /// Whole extents `range`, past the committed end, are in the backing file already.
    mutating func setWritten(_ range: Range<UInt64>) {
        dropBuffers(range)
        written.insert(range)
    }

    /// Forgets the plain and sealed extents in `range`, visiting whichever is fewer: the
    /// buffers held (a stream holds one, its partial tail) or the range's indices.
    private mutating func dropBuffers(_ range: Range<UInt64>) {
        func drop(_ map: inout [UInt64: [UInt8]]) {
            guard !map.isEmpty else { return }
            // The length as UInt64: `clip` passes ranges up to UInt64.max, past Int's count.
            if UInt64(map.count) < range.upperBound - range.lowerBound {
                for index in map.keys.filter({ range.contains($0) }) { map[index] = nil }
            } else {
                for index in range { map[index] = nil }
            }
        }
        drop(&plain)
        drop(&sealed)
    }

    /// Forgets `range`: it became a hole, or its extents were replaced.
    mutating func drop(_ range: Range<UInt64>) {
        guard !range.isEmpty else { return }
        dropBuffers(range)
        written.remove(range)
    }

    /// Keeps only extents below `count` (the file shrank).
    mutating func clip(to count: UInt64) { drop(count..<UInt64.max) }

    /// The records a commit writes in place: every plain extent sealed (`seal`, which may run on
    /// several threads at once, `ExtentFanOut`), then every sealed one, in index order.
    /// Each helper's part is sealed in index order through its own `ExtentGroupSealer` (from
    /// `makeSealer`), so neighbouring dirty extents of one key group share a key derivation.
    func records(extentSize: Int, makeSealer: () -> ExtentGroupSealer,
                 seal: (UInt64, [UInt8], inout ExtentGroupSealer) -> [UInt8]) -> [Journal.Record] {
        let toSeal = plain.sorted { $0.key < $1.key }
        var stored = [[UInt8]](repeating: [], count: toSeal.count)
        stored.withUnsafeMutableBufferPointer { out in
            ExtentFanOut.forEach(toSeal.count, extentSize: extentSize) { range in
                var sealer = makeSealer()
                for i in range { out[i] = seal(toSeal[i].key, toSeal[i].value, &sealer) }
            }
        }
        return (zip(toSeal, stored).map { Journal.Record(index: $0.0.key, stored: $0.1) }
            + sealed.map { Journal.Record(index: $0.key, stored: $0.value) })
            .sorted { $0.index < $1.index }
    }

    /// After a successful commit: everything is in the header now. Capacity is kept, since the
    /// next batch of writes fills the maps again.
    mutating func removeAll() {
        plain.removeAll(keepingCapacity: true)
        sealed.removeAll(keepingCapacity: true)
        written.removeAll()
    }
}
