import Locking

/// How the extents of one request are spread over `ForkJoin.shared`: in pieces of about 32 KiB,
/// and only when the request holds at least 128 KiB of them (a kernel read-ahead request). Waking a
/// helper costs a few microseconds, about what sealing 8 KiB does; 128 KiB take some 50.
enum ExtentFanOut {
    static let pieceBytes = 32 << 10
    static let smallestSpreadBytes = 128 << 10

    /// Calls `body` with consecutive ranges covering `0..<count` extents of `extentSize` bytes,
    /// possibly concurrently on several threads; `body` must touch only what its range owns.
    ///
    /// With `keyGroup` > 1 the extents are consecutive from index `first`, and pieces are whole key
    /// groups split where the absolute index is a multiple of the group: each piece seals or opens
    /// its groups under one key derivation, not one per piece a group was cut into.
    static func forEach(_ count: Int, extentSize: Int, first: UInt64 = 0, keyGroup: UInt64 = 1, _ body: (Range<Int>) -> Void) {
        guard count > 0 else { return }
        guard count * extentSize >= smallestSpreadBytes, ForkJoin.shared.helpers > 0 else {
            body(0..<count)
            return
        }
        let group = Int(keyGroup)
        let perPiece = (max(1, pieceBytes / extentSize) + group - 1) / group * group
        // The first piece runs to the first piece boundary in absolute indices.
        let lead = group > 1 ? (perPiece - Int(first % UInt64(perPiece))) % perPiece : 0
        let leading = min(lead, count)
        let pieces = (leading > 0 ? 1 : 0) + (count - leading + perPiece - 1) / perPiece
        ForkJoin.shared.forEach(pieces) { piece in
            if leading > 0 && piece == 0 { return body(0..<leading) }
            let start = leading + (piece - (leading > 0 ? 1 : 0)) * perPiece
            body(start..<min(count, start + perPiece))
        }
    }

    /// `forEach` for work that can fail: every range still runs, and the first error (by range
    /// order) is rethrown once all are done.
    static func forEach(_ count: Int, extentSize: Int, first: UInt64 = 0, keyGroup: UInt64 = 1,
                        _ body: (Range<Int>) throws -> Void) throws {
        // Most reads are not spread: no lock to collect errors for them (one per 4 KiB read).
        guard count > 0 else { return }
        guard count * extentSize >= smallestSpreadBytes, ForkJoin.shared.helpers > 0 else {
            try body(0..<count)
            return
        }
        let failures = Lock<[(start: Int, error: any Error)]>([])
        forEach(count, extentSize: extentSize, first: first, keyGroup: keyGroup) { range in
            do {
                try body(range)
            } catch {
                failures.withLock { $0.append((range.lowerBound, error)) }
            }
        }
        if let first = failures.withLock({ $0.min { $0.start < $1.start } }) { throw first.error }
    }
}
