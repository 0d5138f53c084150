import EncCrypto
import EncKeys

/// Extent ranges that are holes: not stored, read as zeros. Kept in the authenticated header,
/// so an attacker who zeroes stored extents gets EIO instead of a plausible hole.
public struct HoleMap: Equatable, Sendable {
    /// Sorted, disjoint, non-adjacent half-open ranges of extent indices.
    public private(set) var ranges: [Range<UInt64>]

    public init(ranges: [Range<UInt64>] = []) {
        self.ranges = []
        for r in ranges { insert(r) }
    }

    public var isEmpty: Bool { ranges.isEmpty }

    public func contains(_ index: UInt64) -> Bool {
        guard let i = firstEnding(after: index) else { return false }
        return ranges[i].contains(index)
    }

    /// The first range whose upper bound is above `index` (the only one that can hold it).
    private func firstEnding(after index: UInt64) -> Int? {
        var lo = 0, hi = ranges.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if ranges[mid].upperBound <= index { lo = mid + 1 } else { hi = mid }
        }
        return lo < ranges.count ? lo : nil
    }

    public mutating func insert(_ range: Range<UInt64>) {
        guard !range.isEmpty else { return }
        // A stream appends to the last range on every write: extend it in place, without the
        // rebuild below.
        if let last = ranges.last, last.lowerBound <= range.lowerBound, range.lowerBound <= last.upperBound {
            ranges[ranges.count - 1] = last.lowerBound..<max(last.upperBound, range.upperBound)
            return
        }
        if ranges.last.map({ $0.upperBound < range.lowerBound }) ?? true {
            ranges.append(range)
            return
        }
        var merged = range
        var kept: [Range<UInt64>] = []
        kept.reserveCapacity(ranges.count + 1)
        for r in ranges {
            if r.upperBound < merged.lowerBound || r.lowerBound > merged.upperBound {
                kept.append(r)
            } else {
                merged = min(r.lowerBound, merged.lowerBound)..<max(r.upperBound, merged.upperBound)
            }
        }
        kept.append(merged)
        kept.sort { $0.lowerBound < $1.lowerBound }
        ranges = kept
    }

    public mutating func remove(_ index: UInt64) {
        remove(index..<(index + 1))
    }

    public mutating func remove(_ range: Range<UInt64>) {
        // Most removals (a write over extents that were never holes) meet no range: answered
        // by the search alone, without rebuilding the array.
        guard !range.isEmpty, let first = firstEnding(after: range.lowerBound),
              ranges[first].lowerBound < range.upperBound else { return }
        var kept: [Range<UInt64>] = []
        kept.reserveCapacity(ranges.count + 1)
        for r in ranges {
            if r.upperBound <= range.lowerBound || r.lowerBound >= range.upperBound {
                kept.append(r)
                continue
            }
            if r.lowerBound < range.lowerBound { kept.append(r.lowerBound..<range.lowerBound) }
            if r.upperBound > range.upperBound { kept.append(range.upperBound..<r.upperBound) }
        }
        ranges = kept
    }

    /// Empties the set, keeping its storage for the next batch.
    public mutating func removeAll() { ranges.removeAll(keepingCapacity: true) }

    /// Drops every hole at or beyond `count` (after a shrink).
    public mutating func clip(to count: UInt64) {
        remove(count..<UInt64.max)
    }
}

/// A canonical set of extent-index ranges, as the hole map keeps them; also the legacy ranges of a
/// rekey (extents still sealed under the previous key).
public typealias ExtentRangeSet = HoleMap
