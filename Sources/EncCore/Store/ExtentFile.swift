import Locking
import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// The plaintext view of one open backing file: its size and holes as they are now, and the
/// changes not yet committed (`changes`, a `DirtyExtents`).
///
/// Writes land in whole plaintext extents held in memory and reach the backing file only at
/// `commit`, sealed once each: sealing per write call would re-encrypt a whole extent for every
/// small write; batching also gives the crash-safety journal one unit to protect. A commit hands
/// its extents and headers to a `FlushTransaction`; reads are in `ExtentFile+Read.swift`, rekey
/// batches in `ExtentFile+Rekey.swift`, fallocate's modes in `ExtentFile+Fallocate.swift`.
///
/// Invariant making this `@unchecked Sendable`: its mutable state (`size`, `holes`, `changes`,
/// the legacy ranges, the flags) is touched only with its node's `Lock<NodeState>` held. Three
/// things run without that lock and touch none of it: `sealWholeExtents` and `resealLegacy`, which
/// read only `object` (what never changes for an open file) and `legacyKey`; and
/// `ReadLease.finish`, which reads committed extents and the legacy ranges while the lease holds
/// `ioLock` shared, so no commit rewrites them meanwhile.
final class ExtentFile: @unchecked Sendable {
    let object: OpenObject
    var key: MasterKey { object.key }
    var geometry: ExtentGeometry { object.geometry }
    var objectID: [UInt8] { object.objectID }
    var slots: HeaderSlots { object.slots }
    /// The owner of the backing descriptor, shared with the node that opened it.
    var backing: SharedDescriptor { object.backing }
    /// The key of the extents a rekey has not rewritten yet (`legacy`), when it is loaded; a read
    /// of such an extent without it is ENOKEY, never EIO.
    let legacyKey: MasterKey?
    /// The device of the journal directory's filesystem (`SizeLimit`), when the volume knows it.
    let journalDevice: UInt64?
    /// Committed extents still sealed under the header's `previousPolicy`. Changed only by a
    /// commit, under `ioLock` exclusive, so reads decrypting outside the node lock see the key of
    /// what is on disk; every extent a commit writes is sealed under `key` and leaves it.
    private(set) var legacy: HoleMap
    /// Size and holes as the file is now, including uncommitted changes.
    var size: UInt64
    var holes: HoleMap
    /// What the next commit writes.
    var changes = DirtyExtents()
    /// The size the committed header records: extents at or past its end are unreferenced.
    private(set) var committedSize: UInt64
    /// Where direct writes have extended the backing file, for the commit to cut back to the
    /// header's length if the file was truncated meanwhile.
    private var writtenEnd: Int64 = 0
    /// A failed commit left a pending header: direct writes wait for its replay.
    private var replayPending = false
    /// Held shared while a read decrypts committed extents without the node lock, exclusive
    /// while a commit rewrites or truncates them.
    let ioLock = ReadWriteLock()
    var metadataChanged = false
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

    /// A view of the backing object `backing` (read-write to write), whose transactions go to the
    /// journal directory `journal`.
    /// - Parameter storeRoot: checked before each shadow is written (nil for scratch files in tests).
    init(backing: SharedDescriptor, journal: SharedDescriptor, key: MasterKey, legacyKey: MasterKey? = nil,
         header: ObjectHeader, slots: HeaderSlots, storeRoot: Sys.Place? = nil, journalDevice: UInt64? = nil) {
        self.journalDevice = journalDevice
        object = OpenObject(backing: backing, journal: journal, key: key, geometry: header.geometry,
                            objectID: header.objectID, slots: slots, storeRoot: storeRoot)
        self.legacyKey = legacyKey
        legacy = header.previousPolicy == nil ? HoleMap() : header.legacyRanges
        size = header.size
        holes = header.holes
        committedSize = header.size
    }

    var hasUncommittedChanges: Bool { metadataChanged || !changes.isEmpty }


    /// - Parameter committed: the bytes come from the backing file (they may be legacy), not from
    ///   this file's own uncommitted seals (always under `key`).
    func open(_ index: UInt64, stored: UnsafeRawBufferPointer, into plain: UnsafeMutableRawBufferPointer,
                      committed: Bool) throws {
        var sealing = key
        if committed && legacy.contains(index) {
            guard let legacyKey else { throw StoreError.noKey }
            sealing = legacyKey
        }
        do {
            try ExtentCodec.open(key: sealing, objectID: objectID, index: index, member: geometry.keyGroupMember(index),
                                 stored: stored, into: plain)
        } catch {
            throw StoreError.integrity("extent \(index) failed authentication")
        }
    }

    /// Decrypts committed extent `index` (length from the current size) into `buffer`.
    private func loadStored(_ index: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let length = geometry.plaintextLength(index, size: size)
        let stored = ThreadScratch.current.ciphertext(count: length + ExtentGeometry.overheadBytes)
        let n = try backing.descriptor.pread(stored, offset: geometry.backingOffset(index))
        guard n == stored.count else { throw StoreError.integrity("extent \(index) is truncated") }
        try open(index, stored: UnsafeRawBufferPointer(stored), into: buffer, committed: true)
        if length < buffer.count { buffer[length...].initializeMemory(as: UInt8.self, repeating: 0) }
    }

    /// Makes extent `index` a plaintext dirty buffer, loading what it holds now unless the caller
    /// overwrites all of it.
    func makeDirty(_ index: UInt64, willOverwriteWhole: Bool) throws {
        guard changes.plain[index] == nil else { return }
        let stored = changes.sealed[index]
        let load = !willOverwriteWhole && (stored != nil || (!holes.contains(index) && index < geometry.extentCount(size: size)))
        // Filled by the decryption (and its zero tail) or zeroed here; never read uninitialized.
        let buffer = try [UInt8](unsafeUninitializedCapacity: geometry.extentSize) { bytes, count in
            let raw = UnsafeMutableRawBufferPointer(bytes)
            if !load {
                raw.initializeMemory(as: UInt8.self, repeating: 0)
            } else if let stored {
                try stored.withUnsafeBytes { try open(index, stored: $0, into: raw, committed: false) }
            } else {
                try loadStored(index, into: raw)
            }
            count = bytes.count
        }
        changes.setPlain(index, buffer)
    }


    // MARK: writing

    /// Whole extents sealed by `sealWholeExtents`: `count` extents from index `first`, back to back
    /// at the backing stride in the calling thread's scratch buffer.
    struct Presealed {
        var first: UInt64
        var count: Int
        var bytes: UnsafeMutableRawBufferPointer

        func extent(_ index: UInt64, stride: Int) -> UnsafeRawBufferPointer {
            let at = Int(index - first) * stride
            return UnsafeRawBufferPointer(rebasing: bytes[at..<(at + stride)])
        }
    }

    /// Seals the extents `[offset, offset + data.count)` covers whole. Needs no lock: it reads only
    /// what never changes for an open file (key, object, geometry), so concurrent writers encrypt
    /// in parallel and only `write(offset:data:presealed:)` runs under the node lock; a large write
    /// is spread over the fan-out helpers (`ExtentFanOut`). The result lives in this thread's
    /// scratch buffer until the next call on this thread.
    func sealWholeExtents(offset: UInt64, data: UnsafeRawBufferPointer) -> Presealed? {
        let extentSize = UInt64(geometry.extentSize)
        let (end, overflow) = offset.addingReportingOverflow(UInt64(data.count))
        guard !overflow, end <= SizeLimit.format else { return nil } // write() refuses it (EFBIG)
        let first = (offset + extentSize - 1) / extentSize
        let endIndex = end / extentSize
        guard endIndex > first else { return nil }
        let count = Int(endIndex - first)
        let bytes = ThreadScratch.current.sealing(count: count * geometry.stride)
        let (key, objectID, geometry) = (key, objectID, geometry)
        ExtentFanOut.forEach(count, extentSize: geometry.extentSize, first: first, keyGroup: geometry.keyGroup) { range in
            var sealer = ExtentGroupSealer(key: key, objectID: objectID, geometry: geometry)
            for i in range {
                let index = first + UInt64(i)
                let from = Int(geometry.extentStart(index) - offset)
                sealer.seal(index: index, plaintext: UnsafeRawBufferPointer(rebasing: data[from..<(from + geometry.extentSize)]),
                            into: UnsafeMutableRawBufferPointer(rebasing: bytes[(i * geometry.stride)..<((i + 1) * geometry.stride)]))
            }
        }
        return Presealed(first: first, count: count, bytes: bytes)
    }

    /// Applies a write. Extents in `presealed` (from `sealWholeExtents` over the same range, on
    /// this thread) are taken as they are: written in place at once when they lie past the
    /// committed end, kept for the commit otherwise. The partly covered extents at either end
    /// become dirty plaintext.
    func write(offset: UInt64, data: UnsafeRawBufferPointer, presealed: Presealed? = nil) throws {
        guard data.count > 0 else { return }
        let end = try checkedEnd(offset: offset, length: UInt64(data.count))
        // The appended run goes out first, in one pwrite: if it fails, nothing here has changed.
        var direct: Range<UInt64> = 0..<0
        if let presealed {
            let committedCount = geometry.extentCount(size: committedSize)
            let lower = max(presealed.first, committedCount)
            let upper = presealed.first + UInt64(presealed.count)
            if lower < upper && !TestHooks.journalingDisabled && !replayPending {
                direct = lower..<upper
                let at = Int(lower - presealed.first) * geometry.stride
                let run = UnsafeRawBufferPointer(rebasing: presealed.bytes[at..<(Int(upper - presealed.first) * geometry.stride)])
                try ioLock.withExclusive { try backing.descriptor.pwrite(run, offset: geometry.backingOffset(lower)) }
                writtenEnd = max(writtenEnd, geometry.backingOffset(upper))
            }
        }
        if end > size { try resize(to: end) }
        // Each extent stops being a hole once its bytes are held; a throw part way (the head
        // extent's load) leaves it and every extent after it as they were.
        let first = geometry.extentIndex(offset: offset)
        var held = first
        defer { holes.remove(first..<held) }
        try forEachExtent(offset: offset, end: end) { index, start, from, to in
            let whole = from == start && to - start == UInt64(geometry.extentSize)
            if direct.contains(index) {
                // Written above, whole (presealed extents are): taken in one range.
                if index == direct.lowerBound { changes.setWritten(direct) }
            } else if whole, let presealed, index >= presealed.first, index < presealed.first + UInt64(presealed.count) {
                changes.setSealed(index, Array(presealed.extent(index, stride: geometry.stride)))
            } else {
                try makeDirty(index, willOverwriteWhole: whole)
                changes.modifyPlain(index) { p in
                    UnsafeMutableRawBufferPointer(rebasing: p[Int(from - start)..<Int(to - start)])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[Int(from - offset)..<Int(to - offset)]))
                }
            }
            held = index + 1
        }
        touch()
    }

    /// Calls `body` for each extent `[offset, end)` touches (`end > offset`), in order, with the
    /// extent's start and the part of the range inside it, `[from, to)`.
    func forEachExtent(offset: UInt64, end: UInt64,
                       _ body: (_ index: UInt64, _ start: UInt64, _ from: UInt64, _ to: UInt64) throws -> Void) rethrows {
        var index = geometry.extentIndex(offset: offset)
        let last = geometry.extentIndex(offset: end - 1)
        while index <= last {
            let start = geometry.extentStart(index)
            try body(index, start, max(offset, start), min(end, start + UInt64(geometry.extentSize)))
            index += 1
        }
    }

    /// Largest size of this file (`SizeLimit`), found on the first growth that needs it.
    lazy var maximumSize = SizeLimit.maximumSize(geometry, device: journalDevice, directory: object.journal.descriptor)

    /// Grows (new extents are holes) or shrinks the file. The extent that becomes or stops
    /// being the partial last one is loaded, because its stored length changes with the size.
    func resize(to newSize: UInt64) throws {
        guard newSize != size else { return }
        _ = try checkedEnd(offset: newSize, length: 0)
        let oldCount = geometry.extentCount(size: size)
        let newCount = geometry.extentCount(size: newSize)
        if newSize > size {
            if size % UInt64(geometry.extentSize) != 0 && !holes.contains(oldCount - 1) {
                // The partial last extent grows: its stored length changes, so it is resealed.
                // A hole there stays one (nothing is stored; SEEK_HOLE finds it as ext4 would).
                let lastOld = oldCount - 1
                try makeDirty(lastOld, willOverwriteWhole: false)
                holes.remove(lastOld)
            }
            holes.insert(oldCount..<newCount)
        } else {
            changes.clip(to: newCount)
            holes.clip(to: newCount)
            let tail = Int(newSize % UInt64(geometry.extentSize))
            if tail != 0 {
                let lastNew = newCount - 1
                if !holes.contains(lastNew) {
                    try makeDirty(lastNew, willOverwriteWhole: false)
                    _ = changes.modifyPlain(lastNew) { $0[tail...].initializeMemory(as: UInt8.self, repeating: 0) }
                }
            }
        }
        size = newSize
        metadataChanged = true
        touch()
    }

    /// An explicit utimes/futimens wins over the time of the buffered writes.
    func forgetModificationTime() { modifiedAt = nil }

    func touch() {
        if dirtySince == nil { dirtySince = .now }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        modifiedAt = now
    }

    var needsCommitForMemory: Bool { bufferedBytes >= Self.dirtyLimitBytes }
    /// Plaintext bytes of whole extents held uncommitted (reported by `encfsd status`).
    var bufferedBytes: Int { changes.bufferedBytes(extentSize: geometry.extentSize) }
    // MARK: committing

    /// What a commit makes durable before it returns.
    enum Durability {
        /// Consistent, but a power loss may take it back to the header before.
        case consistent
        /// Data and size (fdatasync(2) semantics).
        case data
        /// Data, size and timestamps (fsync(2)): one fsync after the modification time is put
        /// back, in place of the transaction's own fdatasync and a second sync for the times.
        case all
    }

    /// Commits everything buffered as one `FlushTransaction`, and returns what the new header
    /// leaves of the slot rules (nil when nothing was written).
    @discardableResult
    func commit(header: inout ObjectHeader, durability: Durability = .consistent) throws -> HeaderSafety? {
        // Readers decrypting committed extents outside the node lock finish first, and none start
        // until the extents and the size they were read against are consistent again.
        try ioLock.withExclusive { try commitExclusive(header: &header, durability: durability) }
    }

    private func commitExclusive(header: inout ObjectHeader, durability: Durability) throws -> HeaderSafety? {
        let durable = durability != .consistent
        var recovered = false
        // A transaction that failed after its pending flag reached the disk is finished first:
        // its journal is complete, and nothing may be written on top of a pending header.
        if header.flags.contains(.pendingWrite) {
            header = try slots.completeInterruptedWrite(fd: backing.descriptor, journalFD: object.journal.descriptor, pending: header, key: key)
            recovered = true
        }
        guard hasUncommittedChanges else {
            switch durability {
            case .consistent: break
            case .data: try backing.descriptor.fdatasync()
            case .all: try backing.descriptor.fsync()
            }
            return recovered || durable ? .durable : nil
        }
        let transaction = try prepareTransaction(committed: header, durable: durability == .data)
        // A shadow this file wrote is removed at its last close; a name the journal could not
        // write through (a planted link, say) is not this file's to remove.
        let journaled = transaction.overwrites && !TestHooks.journalingDisabled
        let final: ObjectHeader
        var safety: HeaderSafety
        do {
            (final, safety) = try transaction.run()
            if journaled { usedJournal = true }
        } catch let interrupted as FlushTransaction.Interrupted {
            usedJournal = true
            // The disk now says "pending": so must memory, so that nothing is written over it and
            // the journal is kept until a replay (the next commit, or the next open) succeeds.
            // Until then no write goes straight to the backing file: the replay rewrites extents
            // past the committed end that the pending transaction covers.
            header = interrupted.pending
            replayPending = true
            throw interrupted.underlying
        }
        header = final
        // Only now: a commit that failed part way (ENOSPC, EIO) keeps its data buffered, and the
        // next flush retries the whole transaction.
        changes.removeAll()
        committedSize = final.size
        legacy = final.legacyRanges
        writtenEnd = 0
        replayPending = false
        dirtySince = nil
        metadataChanged = false
        let modified = modifiedAt
        do {
            if let modified {
                try backing.descriptor.restoreModificationTime(modified)
                modifiedAt = nil
            }
            if durability == .all {
                try backing.descriptor.fsync()
                safety = .durable
            }
        } catch {
            // The header is written but not known durable, and the kernel reports a writeback
            // error once: a retried fsync must write the header again and sync it, not find
            // nothing to do, and put back the mtime that write moves.
            metadataChanged = true
            modifiedAt = modified
            dirtySince = .now // the timer retries it too
            throw error
        }
        return safety
    }

    /// The transaction that writes the buffered state over `committed`: the final header's size,
    /// holes and legacy ranges, made to fit one header slot, and every changed extent sealed.
    private func prepareTransaction(committed: ObjectHeader, durable: Bool) throws -> FlushTransaction {
        var final = committed
        final.size = size
        final.holes = holes
        final.flags.remove(.pendingWrite)
        let newCount = geometry.extentCount(size: size)
        final.legacyRanges = remainingLegacy(count: newCount)
        while committed.previousPolicy != nil && !final.fits(), let smallest = final.legacyRanges.ranges.min(by: { $0.count < $1.count }) {
            // Foreground writes split the legacy ranges until they no longer fit the slot: the
            // smallest range is resealed under the new key in this transaction (an overwrite, so
            // journaled), exactly as a rekey batch would.
            for index in smallest where !holes.contains(index) { try makeDirty(index, willOverwriteWhole: false) }
            final.legacyRanges.remove(smallest)
        }
        while !final.fits() {
            // Too many separate holes for one header slot: store the smallest hole range as real
            // zero extents. Reads are unchanged; only space is spent.
            guard let smallest = final.holes.ranges.min(by: { $0.count < $1.count }) else { break }
            try storeAsZeros(smallest, committedHoles: committed.holes)
            final.holes.remove(smallest)
            holes.remove(smallest)
            final.legacyRanges.remove(smallest)
        }
        let (object, geometry, size) = (object, geometry, size)
        let records = changes.records(extentSize: geometry.extentSize, makeSealer: object.groupSealer) { index, plain, sealer in
            let length = geometry.plaintextLength(index, size: size)
            return plain.withUnsafeBytes { object.seal(index, plaintext: UnsafeRawBufferPointer(rebasing: $0[0..<length]), using: &sealer) }
        }
        // Direct writes may have grown the backing file past the committed length; a file that
        // was then truncated is cut back to its new length like any shrinking file.
        return FlushTransaction(object: object, committed: committed, final: final, records: records,
                                oldLength: max(geometry.backingLength(size: committed.size), writtenEnd),
                                newLength: geometry.backingLength(size: size), durable: durable)
    }

    /// The legacy ranges once this commit's extents are written: every extent it writes (or that
    /// is a hole, or past the new end) is no longer sealed under the previous key.
    private func remainingLegacy(count: UInt64) -> HoleMap {
        var remaining = legacy
        remaining.clip(to: count)
        changes.removeChanged(from: &remaining)
        for range in holes.ranges { remaining.remove(range) }
        return remaining
    }

    /// Stores a hole range as sealed zero extents, streamed 64 at a time so memory stays bounded
    /// however large the range. The range is a committed hole, so nothing references these bytes
    /// until the header that drops the hole is written (after the sync that precedes it).
    func writeZeroExtents(_ range: Range<UInt64>) throws {
        let zeros = [UInt8](repeating: 0, count: geometry.extentSize)
        var index = range.lowerBound
        var sealer = object.groupSealer()
        while index < range.upperBound {
            let end = min(range.upperBound, index + 64)
            let batch = (index..<end).map { i -> Journal.Record in
                let length = geometry.plaintextLength(i, size: size)
                let stored = zeros.withUnsafeBytes { object.seal(i, plaintext: UnsafeRawBufferPointer(rebasing: $0[0..<length]), using: &sealer) }
                return Journal.Record(index: i, stored: stored)
            }
            try object.writeInPlace(batch)
            index = end
        }
    }

    /// Reserves backing space for plaintext `[offset, offset+length)` (fallocate mode 0).
    func allocate(offset: UInt64, length: UInt64, keepSize: Bool) throws {
        let end = try checkedEnd(offset: offset, length: length)
        if !keepSize && end > size { try resize(to: end) }
        let first = geometry.extentIndex(offset: offset)
        // Whole strides, except where the backing file cannot be that long (a last extent of a
        // file at its largest size is partial).
        let lastEnd = min(geometry.backingOffset(geometry.extentIndex(offset: end - 1) + 1), geometry.backingLength(size: maximumSize))
        try backing.descriptor.fallocate(mode: keepSize ? 1 : 0, offset: geometry.backingOffset(first),
                          length: lastEnd - geometry.backingOffset(first))
    }
}

/// The arrays' bytes as buffer pointers, valid inside `body` (one nested closure per array).
func withBuffers<R>(_ arrays: [[UInt8]], _ body: ([UnsafeRawBufferPointer]) throws -> R) rethrows -> R {
    var pointers: [UnsafeRawBufferPointer] = []
    pointers.reserveCapacity(arrays.count)
    func nest(_ at: Int) throws -> R {
        guard at < arrays.count else { return try body(pointers) }
        return try arrays[at].withUnsafeBytes { buffer in
            pointers.append(buffer)
            return try nest(at + 1)
        }
    }
    return try nest(0)
}
