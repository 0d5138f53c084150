import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// fallocate(2)'s range modes and lseek(2)'s SEEK_DATA/SEEK_HOLE, on the authenticated hole map.
///
/// Each operation changes only the in-memory view (holes, dirty extents, size); the caller commits
/// it as one flush transaction, so it is as crash-safe as a write: a crash leaves the old file or
/// the new one. A hole lives in the header, which is authenticated, so a punched range that is
/// later zeroed or cut short in the store still fails as any damaged extent does, while the
/// extents it dropped are never read again.
///
/// "Block" for the alignment rules below is the extent: the unit the hole map and the store can
/// drop or move without re-encrypting (st_blksize reports it). ext4 asks collapse and insert for
/// block-aligned offsets and lengths for the same reason.
extension ExtentFile {
    /// The extents `[offset, offset + length)` covers whole, clipped to the file. The partial last
    /// extent of the file counts as whole when the range reaches the end of the file.
    private func wholeExtents(offset: UInt64, end: UInt64) -> Range<UInt64> {
        let extentSize = UInt64(geometry.extentSize)
        let first = (offset + extentSize - 1) / extentSize
        let last = end == size ? geometry.extentCount(size: size) : end / extentSize
        return first < last ? first..<last : first..<first
    }

    /// Makes `range` a hole: no extent of it is stored or buffered any more.
    private func drop(_ range: Range<UInt64>) {
        guard !range.isEmpty else { return }
        changes.drop(range)
        holes.insert(range)
    }

    /// FALLOC_FL_PUNCH_HOLE (always with FALLOC_FL_KEEP_SIZE, which the kernel enforces) and the
    /// in-file part of FALLOC_FL_ZERO_RANGE: `[offset, offset + length)` reads as zeros. Whole
    /// extents become holes; the partly covered ones at either end are zeroed in place and
    /// resealed at commit. Nothing past the end of the file changes.
    ///
    /// - Returns: the extents that became holes, for the caller to give back to the backing file
    ///   once the header that drops them is durable.
    @discardableResult
    func punchHole(offset: UInt64, length: UInt64) throws -> Range<UInt64> {
        let end = min(size, try checkedEnd(offset: offset, length: length))
        guard offset < end else { return 0..<0 }
        let whole = wholeExtents(offset: offset, end: end)
        for index in [geometry.extentIndex(offset: offset), geometry.extentIndex(offset: end - 1)]
        where !whole.contains(index) && !holes.contains(index) {
            let start = geometry.extentStart(index)
            let from = Int(max(offset, start) - start)
            let to = Int(min(end, start + UInt64(geometry.extentSize)) - start)
            guard from < to else { continue }
            try makeDirty(index, willOverwriteWhole: false)
            _ = changes.modifyPlain(index) { $0[from..<to].initializeMemory(as: UInt8.self, repeating: 0) }
        }
        drop(whole)
        metadataChanged = true
        touch()
        return whole
    }

    /// FALLOC_FL_ZERO_RANGE: as a punch, and without FALLOC_FL_KEEP_SIZE the file grows to cover
    /// the range (the growth is a hole, as after a truncate).
    func zeroRange(offset: UInt64, length: UInt64, keepSize: Bool) throws {
        let end = try checkedEnd(offset: offset, length: length)
        if !keepSize && end > size { try resize(to: end) }
        try punchHole(offset: offset, length: length)
    }

    /// Largest tail collapse or insert moves in one transaction: every moved extent is resealed
    /// under its new index (the index is authenticated), and the transaction holds them all.
    static let shiftLimitBytes: UInt64 = 256 << 20

    /// The extent-aligned shift collapse and insert accept, as ext4 checks it: EINVAL for
    /// unaligned ranges, EFBIG past the size limit, and a tail small enough for one transaction.
    private func shiftExtents(offset: UInt64, length: UInt64) throws -> UInt64 {
        let extentSize = UInt64(geometry.extentSize)
        guard length > 0, offset % extentSize == 0, length % extentSize == 0 else { throw StoreError.invalidArgument }
        guard size > offset, size - offset <= Self.shiftLimitBytes else {
            throw size > offset ? StoreError.fileTooLarge : StoreError.invalidArgument
        }
        return length / extentSize
    }

    /// Copies extent `from` (data or hole) to extent `to`, whose old contents are replaced.
    private func move(_ from: UInt64, to: UInt64) throws {
        if holes.contains(from) {
            changes.drop(to..<(to + 1))
            holes.insert(to..<(to + 1))
            return
        }
        try makeDirty(from, willOverwriteWhole: false)
        changes.setPlain(to, changes.plain[from]!)
        holes.remove(to)
    }

    /// FALLOC_FL_COLLAPSE_RANGE: removes `[offset, offset + length)` and moves the rest of the file
    /// down over it. ext4's rules: offset and length extent-aligned, and the range must end before
    /// the end of the file (EINVAL otherwise).
    func collapseRange(offset: UInt64, length: UInt64) throws {
        let shift = try shiftExtents(offset: offset, length: length)
        guard offset + length < size else { throw StoreError.invalidArgument }
        let newSize = size - length
        let oldCount = geometry.extentCount(size: size)
        let newCount = geometry.extentCount(size: newSize)
        // Ascending: each source lies above its target and is read before it is overwritten.
        for target in geometry.extentIndex(offset: offset)..<newCount { try move(target + shift, to: target) }
        // The partial last extent moved with its length in the old size; its plaintext buffer is
        // zero past that length, which is what the new size reads there too.
        drop(newCount..<oldCount)
        holes.clip(to: newCount)
        size = newSize
        metadataChanged = true
        touch()
    }

    /// FALLOC_FL_INSERT_RANGE: moves everything from `offset` up by `length` and leaves a hole of
    /// `length` at `offset`. ext4's rules: offset and length extent-aligned, offset inside the file
    /// (EINVAL otherwise), and the new size within the limit (EFBIG).
    func insertRange(offset: UInt64, length: UInt64) throws {
        let shift = try shiftExtents(offset: offset, length: length)
        let newSize = try checkedEnd(offset: size, length: length)
        let first = geometry.extentIndex(offset: offset)
        let oldCount = geometry.extentCount(size: size)
        // The old last extent, if partial, is moved with its old length: load it before the size
        // changes so its tail is read as it was stored.
        var source = oldCount
        while source > first {
            source -= 1
            try move(source, to: source + shift)
        }
        drop(first..<(first + shift))
        size = newSize
        metadataChanged = true
        touch()
    }

    /// lseek(2) SEEK_DATA and SEEK_HOLE from the hole map as the file is now (uncommitted writes
    /// included): a hole is a whole extent; the end of the file is a hole. ENXIO at or past the end,
    /// and for SEEK_DATA when only holes follow.
    func seek(from offset: UInt64, data wantData: Bool) throws -> UInt64 {
        guard offset < size else { throw StoreError.system(ENXIO) }
        let count = geometry.extentCount(size: size)
        let start = geometry.extentIndex(offset: offset)
        // Hole ranges are disjoint and never adjacent: the end of one is data (or the file's end).
        let inHole = holes.ranges.first { $0.contains(start) }
        let index = switch (wantData, inHole) {
        case (true, let hole?): hole.upperBound
        case (true, nil), (false, _?): start
        case (false, nil): holes.ranges.first { $0.lowerBound > start }?.lowerBound ?? count
        }
        guard index < count else {
            if wantData { throw StoreError.system(ENXIO) }
            return size
        }
        return max(offset, geometry.extentStart(index))
    }

    /// Stores hole extents as sealed zeros (the hole map's overflow rule, FORMAT.md 4.6). Extents
    /// that are holes in the committed header are written in place at once: nothing references
    /// them. The others (a punch not yet committed) go through the transaction as dirty extents,
    /// since the committed header still references what is stored there.
    func storeAsZeros(_ range: Range<UInt64>, committedHoles: HoleMap) throws {
        var runStart: UInt64?
        for index in range {
            if committedHoles.contains(index) {
                if runStart == nil { runStart = index }
                continue
            }
            if let start = runStart { try writeZeroExtents(start..<index) }
            runStart = nil
            changes.setPlain(index, [UInt8](repeating: 0, count: geometry.extentSize))
        }
        if let start = runStart { try writeZeroExtents(start..<range.upperBound) }
    }
}
