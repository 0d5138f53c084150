import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The plaintext view of one open backing file.
///
/// Writes land in whole plaintext extents held in memory (`dirty`) and reach the backing file
/// only at `commit`, sealed once each. Sealing per write call would re-encrypt a whole extent for
/// every small write; batching also gives the crash-safety journal one unit to protect.
///
/// Invariant making this `@unchecked Sendable`: an `ExtentFile` lives only inside its node's
/// `Mutex<NodeState>` and every method runs with that lock held, so no two threads touch it at
/// once.
final class ExtentFile: @unchecked Sendable {
    let fd: Int32
    /// The store's `.journal` directory, where this file's shadow lives during a transaction.
    let journalFD: Int32
    let key: MasterKey
    let geometry: ExtentGeometry
    let objectID: [UInt8]
    /// Size and holes as the file is now, including uncommitted changes.
    private(set) var size: UInt64
    private(set) var holes: HoleMap
    /// Plaintext of changed extents, each `extentSize` bytes (bytes past the file end are zero).
    private var dirty: [UInt64: [UInt8]] = [:]
    private var metadataChanged = false
    /// When the contents last changed, if not yet committed: what stat reports as mtime and
    /// ctime meanwhile, and what the commit stamps on the backing file (POSIX: the time of the
    /// write, not of the flush).
    private(set) var modifiedAt: timespec?
    /// Whether a transaction of this open file went through the journal (its shadow then exists).
    private(set) var usedJournal = false
    /// When the oldest uncommitted change was made: the timer commits files dirty for too long.
    private(set) var dirtySince: ContinuousClock.Instant?

    /// Dirty bytes held before a write forces a commit: bounds memory and the journal batch.
    static let dirtyLimitBytes = 16 << 20

    init(fd: Int32, journalFD: Int32, key: MasterKey, header: ObjectHeader) {
        self.fd = fd
        self.journalFD = journalFD
        self.key = key
        geometry = header.geometry
        objectID = header.objectID
        size = header.size
        holes = header.holes
    }

    var hasUncommittedChanges: Bool { metadataChanged || !dirty.isEmpty }

    // MARK: reading

    func read(offset: UInt64, count: Int) throws -> [UInt8] {
        guard offset < size, count > 0 else { return [] }
        let end = min(size, offset + UInt64(count))
        var out = [UInt8](repeating: 0, count: Int(end - offset))
        var index = geometry.extentIndex(offset: offset)
        let last = geometry.extentIndex(offset: end - 1)
        var scratch = [UInt8](repeating: 0, count: geometry.extentSize)
        while index <= last {
            let start = geometry.extentStart(index)
            let from = max(offset, start)
            let to = min(end, start + UInt64(geometry.extentSize))
            let inExtent = Int(from - start)..<Int(to - start)
            let outRange = Int(from - offset)..<Int(to - offset)
            if let plain = dirty[index] {
                out.replaceSubrange(outRange, with: plain[inExtent])
            } else if !holes.contains(index) {
                try loadStored(index, into: &scratch)
                out.replaceSubrange(outRange, with: scratch[inExtent])
            }
            index += 1
        }
        return out
    }

    /// Decrypts committed extent `index` (length from the current size) into `buffer`.
    private func loadStored(_ index: UInt64, into buffer: inout [UInt8]) throws {
        let length = geometry.plaintextLength(index, size: size)
        var stored = [UInt8](repeating: 0, count: length + ExtentGeometry.overheadBytes)
        let n = try stored.withUnsafeMutableBytes { b throws in
            try Sys.pread(fd, b, offset: geometry.backingOffset(index))
        }
        guard n == stored.count else { throw StoreError.integrity("extent \(index) is truncated") }
        do {
            try stored.withUnsafeBytes { s throws in
                try buffer.withUnsafeMutableBytes { p throws in
                    try ExtentCodec.open(key: key, objectID: objectID, index: index, stored: s, into: p)
                }
            }
        } catch {
            throw StoreError.integrity("extent \(index) failed authentication")
        }
        if length < buffer.count {
            _ = buffer.withUnsafeMutableBytes { $0[length...].initializeMemory(as: UInt8.self, repeating: 0) }
        }
    }

    /// The extent's current plaintext as a mutable dirty buffer, loading it if needed.
    private func dirtyExtent(_ index: UInt64, willOverwriteWhole: Bool) throws -> [UInt8] {
        if let plain = dirty[index] { return plain }
        var buffer = [UInt8](repeating: 0, count: geometry.extentSize)
        if !willOverwriteWhole && !holes.contains(index) && index < geometry.extentCount(size: size) {
            try loadStored(index, into: &buffer)
        }
        return buffer
    }

    // MARK: writing

    func write(offset: UInt64, data: UnsafeRawBufferPointer) throws {
        guard data.count > 0 else { return }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(data.count))
        guard !overflow, end <= Self.maximumSize else { throw StoreError.system(27) } // EFBIG
        if end > size { try resize(to: end) }
        var index = geometry.extentIndex(offset: offset)
        let last = geometry.extentIndex(offset: end - 1)
        while index <= last {
            let start = geometry.extentStart(index)
            let from = max(offset, start)
            let to = min(end, start + UInt64(geometry.extentSize))
            let whole = from == start && to - start == UInt64(geometry.extentSize)
            var plain = try dirtyExtent(index, willOverwriteWhole: whole)
            plain.withUnsafeMutableBytes { p in
                UnsafeMutableRawBufferPointer(rebasing: p[Int(from - start)..<Int(to - start)])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[Int(from - offset)..<Int(to - offset)]))
            }
            dirty[index] = plain
            holes.remove(index)
            index += 1
        }
        touch()
    }

    static let maximumSize = ObjectHeader.maximumSize

    /// Grows (new extents are holes) or shrinks the file. The extent that becomes or stops
    /// being the partial last one is loaded, because its stored length changes with the size.
    func resize(to newSize: UInt64) throws {
        guard newSize != size else { return }
        guard newSize <= Self.maximumSize else { throw StoreError.system(27) } // EFBIG
        let oldCount = geometry.extentCount(size: size)
        let newCount = geometry.extentCount(size: newSize)
        if newSize > size {
            if size % UInt64(geometry.extentSize) != 0 {
                let lastOld = oldCount - 1
                dirty[lastOld] = try dirtyExtent(lastOld, willOverwriteWhole: false)
                if dirty[lastOld] != nil { holes.remove(lastOld) }
            }
            holes.insert(oldCount..<newCount)
        } else {
            for index in dirty.keys where index >= newCount { dirty[index] = nil }
            holes.clip(to: newCount)
            let tail = Int(newSize % UInt64(geometry.extentSize))
            if tail != 0 {
                let lastNew = newCount - 1
                if !holes.contains(lastNew) {
                    var plain = try dirtyExtent(lastNew, willOverwriteWhole: false)
                    _ = plain.withUnsafeMutableBytes { $0[tail...].initializeMemory(as: UInt8.self, repeating: 0) }
                    dirty[lastNew] = plain
                }
            }
        }
        size = newSize
        metadataChanged = true
        touch()
    }

    /// An explicit utimes/futimens wins over the time of the buffered writes.
    func forgetModificationTime() { modifiedAt = nil }

    private func touch() {
        if dirtySince == nil { dirtySince = .now }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        modifiedAt = now
    }

    var needsCommitForMemory: Bool { dirty.count * geometry.extentSize >= Self.dirtyLimitBytes }

    // MARK: committing

    /// A test-only switch (ENCFSD_UNSAFE_NO_JOURNAL=1) that writes in place without the journal
    /// or its fsyncs, to measure what crash safety costs. Never for real use: a crash mid-commit
    /// can then tear a file.
    static let journalingDisabled = ProcessInfo.processInfo.environment["ENCFSD_UNSAFE_NO_JOURNAL"] == "1"

    /// Commits everything buffered as one transaction (DESIGN.md, "The flush transaction").
    ///
    /// With no extent overwritten in place (appends into new extents, filled holes, size or
    /// metadata changes), the new extents are written and synced, then the header flips: a crash
    /// leaves the old header, which does not reference them. Otherwise the new extents and the final
    /// header go to the journal first, the header flips to a copy of the old one with the pending
    /// flag set, the extents are written in place, and the header flips to the final one, each step
    /// synced before the next. A crash leaves either the old state or a flagged header with a
    /// complete journal, which recovery replays.
    ///
    /// - Parameter durable: also make the result durable (fsync/fdatasync); otherwise it is
    ///   consistent but may be lost to a power loss.
    func commit(header: inout ObjectHeader, durable: Bool = false) throws {
        // A transaction that failed after its pending flag reached the disk is finished first:
        // its journal is complete, and nothing may be written on top of a pending header.
        if header.flags.contains(.pendingWrite) {
            header = try Journal.recover(journalFD: journalFD, objectFD: fd, pending: header, key: key)
        }
        guard hasUncommittedChanges else {
            if durable { try Sys.fdatasync(fd) }
            return
        }
        var final = header
        final.size = size
        final.holes = holes
        final.flags = []
        while !final.fits() {
            // Too many separate holes for one header slot: store the smallest hole range as real
            // zero extents. Reads are unchanged; only space is spent.
            guard let smallest = final.holes.ranges.min(by: { $0.count < $1.count }) else { break }
            try writeZeroExtents(smallest)
            final.holes.remove(smallest)
            holes.remove(smallest)
        }
        let records = sealDirty()
        let committedCount = geometry.extentCount(size: header.size)
        let overwrites = records.contains { $0.index < committedCount && !header.holes.contains($0.index) }
        let oldLength = geometry.backingLength(size: header.size)
        let newLength = geometry.backingLength(size: size)
        let unsafe = Self.journalingDisabled

        if !overwrites || unsafe {
            if newLength > oldLength { try Sys.ftruncate(fd, newLength) }
            try write(records)
            // The extents are made durable by the sync HeaderIO.write does before the header.
            FaultPoints.reach(.appendExtentsWritten)
            try HeaderIO.write(fd: fd, header: &final, key: key, sync: newLength < oldLength && !unsafe)
            FaultPoints.reach(.appendHeaderWritten)
            if newLength < oldLength { try Sys.ftruncate(fd, newLength) }
            if durable { try Sys.fdatasync(fd) }
        } else {
            var pending = header
            pending.flags.insert(.pendingWrite)
            final.sequence = header.sequence + 2
            let finalSlot = HeaderCodec.seal(final, key: key)
            try Journal.write(journalFD: journalFD, objectID: objectID, pendingSequence: header.sequence + 1,
                              finalSlot: finalSlot, records: records, key: key)
            usedJournal = true
            FaultPoints.reach(.shadowWritten)
            try HeaderIO.write(fd: fd, header: &pending, key: key, sync: true)
            FaultPoints.reach(.pendingFlagSet)
            do {
                if newLength > oldLength { try Sys.ftruncate(fd, newLength) }
                try write(records)
                try Sys.fdatasync(fd)
                FaultPoints.reach(.extentsApplied)
                try HeaderIO.writeSlot(fd: fd, finalSlot, sequence: final.sequence)
                // Synced even when not asked to be durable: the journal is retired next, and a
                // final header lost after that could not be replayed.
                try Sys.fdatasync(fd)
            } catch {
                // The disk now says "pending": so must memory, so that nothing is written over it
                // and the journal is kept until a replay (the next commit, or the next open) succeeds.
                header = pending
                throw error
            }
            FaultPoints.reach(.finalHeaderWritten)
            if newLength < oldLength { try Sys.ftruncate(fd, newLength) }
            Journal.retire(journalFD: journalFD, objectID: objectID)
            FaultPoints.reach(.shadowRemoved)
        }
        header = final
        // Only now: a commit that failed part way (ENOSPC, EIO) keeps its data buffered, and the
        // next flush retries the whole transaction.
        dirty.removeAll(keepingCapacity: true)
        dirtySince = nil
        if let modifiedAt {
            try Sys.futimens(fd, (Sys.omitTime, modifiedAt))
            self.modifiedAt = nil
        }
        metadataChanged = false
    }

    /// Seals every dirty extent with a fresh nonce, in index order.
    private func sealDirty() -> [Journal.Record] {
        let records = dirty.keys.sorted().map { index -> Journal.Record in
            let length = geometry.plaintextLength(index, size: size)
            var stored = [UInt8](repeating: 0, count: length + ExtentGeometry.overheadBytes)
            dirty[index]!.withUnsafeBytes { p in
                stored.withUnsafeMutableBytes { s in
                    ExtentCodec.seal(key: key, objectID: objectID, index: index,
                                     plaintext: UnsafeRawBufferPointer(rebasing: p[0..<length]), into: s)
                }
            }
            return Journal.Record(index: index, stored: stored)
        }
        return records
    }

    /// Stores a hole range as sealed zero extents, streamed 64 at a time so memory stays bounded
    /// however large the range. The range is a committed hole, so nothing references these bytes
    /// until the header that drops the hole is written (after the sync that precedes it).
    private func writeZeroExtents(_ range: Range<UInt64>) throws {
        let zeros = [UInt8](repeating: 0, count: geometry.extentSize)
        var index = range.lowerBound
        while index < range.upperBound {
            let end = min(range.upperBound, index + 64)
            let batch = (index..<end).map { i -> Journal.Record in
                let length = geometry.plaintextLength(i, size: size)
                var stored = [UInt8](repeating: 0, count: length + ExtentGeometry.overheadBytes)
                zeros.withUnsafeBytes { z in
                    stored.withUnsafeMutableBytes { s in
                        ExtentCodec.seal(key: key, objectID: objectID, index: i,
                                         plaintext: UnsafeRawBufferPointer(rebasing: z[0..<length]), into: s)
                    }
                }
                return Journal.Record(index: i, stored: stored)
            }
            try write(batch)
            index = end
        }
    }

    /// Writes sealed extents in place; contiguous ones go out in one pwrite.
    private func write(_ records: [Journal.Record]) throws {
        var i = 0
        while i < records.count {
            var j = i
            while j + 1 < records.count && records[j + 1].index == records[j].index + 1 { j += 1 }
            let run = i == j ? records[i].stored : records[i...j].flatMap(\.stored)
            try run.withUnsafeBytes { try Sys.pwrite(fd, $0, offset: geometry.backingOffset(records[i].index)) }
            i = j + 1
        }
    }

    /// Reserves backing space for plaintext `[offset, offset+length)` (fallocate mode 0).
    func allocate(offset: UInt64, length: UInt64, keepSize: Bool) throws {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= Self.maximumSize else { throw StoreError.system(27) } // EFBIG
        if !keepSize && end > size { try resize(to: end) }
        let first = geometry.extentIndex(offset: offset)
        let lastEnd = geometry.backingOffset(geometry.extentIndex(offset: end - 1) + 1)
        try Sys.fallocate(fd, mode: keepSize ? 1 : 0, offset: geometry.backingOffset(first),
                          length: lastEnd - geometry.backingOffset(first))
    }
}
