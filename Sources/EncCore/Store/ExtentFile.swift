import Foundation
import Synchronization
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// The plaintext view of one open backing file.
///
/// Writes land in whole plaintext extents held in memory (`dirty`) and reach the backing file
/// only at `commit`, sealed once each. Sealing per write call would re-encrypt a whole extent for
/// every small write; batching also gives the crash-safety journal one unit to protect.
///
/// Invariant making this `@unchecked Sendable`: its mutable state (`size`, `holes`, the dirty,
/// sealed and written extents, the flags) is touched only with its node's `Mutex<NodeState>`
/// held. Two things run without that lock and touch none of it: `sealWholeExtents`, which reads
/// only what never changes for an open file (key, object ID, geometry, `fd`); and
/// `ReadLease.finish`, which reads committed extents from `fd` while the lease holds `ioLock`
/// shared, so no commit rewrites or truncates them meanwhile.
final class ExtentFile: @unchecked Sendable {
    let fd: Int32
    /// The owner of `fd` when the file owns its descriptor (an open file of a mounted store): it
    /// closes with the last reference, so `fd` stays valid as long as this file does.
    let descriptor: SharedDescriptor?
    /// The store's `.journal` directory, where this file's shadow lives during a transaction.
    let journalFD: Int32
    let key: MasterKey
    /// The key of the extents a rekey has not rewritten yet (`legacy`), when it is loaded; a read
    /// of such an extent without it is ENOKEY, never EIO.
    let legacyKey: MasterKey?
    /// Committed extents still sealed under the header's `previousPolicy`. Changed only by a
    /// commit, under `ioLock` exclusive, so reads decrypting outside the node lock see the key of
    /// what is on disk; every extent a commit writes is sealed under `key` and leaves it.
    private var legacy: HoleMap
    let geometry: ExtentGeometry
    let objectID: [UInt8]
    /// Size and holes as the file is now, including uncommitted changes.
    var size: UInt64
    var holes: HoleMap
    /// Plaintext of partly written extents, each `extentSize` bytes (bytes past the file end are
    /// zero), sealed at commit.
    var dirty: [UInt64: [UInt8]] = [:]
    /// Whole extents sealed when they were written, waiting for the commit. Sealing a streaming
    /// write at once (outside the node lock, see `sealWholeExtents`) spreads the encryption over
    /// the workers serving concurrent writeback requests instead of one thread at commit, and
    /// skips a plaintext copy. Every entry is a full `extentSize` extent inside the file.
    var sealed: [UInt64: [UInt8]] = [:]
    /// Whole extents past the committed end, already written in place by `write` and waiting only
    /// for a header to cover them. The committed header does not reference them, so writing them
    /// early is as safe as at commit; it skips a copy into `sealed` and a 16 MiB stall per batch.
    var written: Set<UInt64> = []
    /// The size the committed header records: extents at or past its end are unreferenced.
    private var committedSize: UInt64
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

    /// Where the store root is, to check the journal directory is still beneath it before a
    /// shadow is written (nil for scratch files in tests).
    let storeRoot: Sys.Place?

    /// Where each header version goes and what it is stamped with.
    let slots: HeaderSlots

    convenience init(descriptor: SharedDescriptor, journalFD: Int32, key: MasterKey, legacyKey: MasterKey? = nil,
                     header: ObjectHeader, slots: HeaderSlots, storeRoot: Sys.Place) {
        self.init(fd: descriptor.descriptor.raw, journalFD: journalFD, key: key, legacyKey: legacyKey, header: header, slots: slots,
                  descriptor: descriptor, storeRoot: storeRoot)
    }

    /// A view of a backing file whose descriptor the caller keeps open for the file's lifetime.
    init(fd: Int32, journalFD: Int32, key: MasterKey, legacyKey: MasterKey? = nil, header: ObjectHeader, slots: HeaderSlots,
         descriptor: SharedDescriptor? = nil, storeRoot: Sys.Place? = nil) {
        self.fd = fd
        self.slots = slots
        self.descriptor = descriptor
        self.storeRoot = storeRoot
        self.journalFD = journalFD
        self.key = key
        self.legacyKey = legacyKey
        legacy = header.previousPolicy == nil ? HoleMap() : header.legacyRanges
        geometry = header.geometry
        objectID = header.objectID
        size = header.size
        holes = header.holes
        committedSize = header.size
    }

    var hasUncommittedChanges: Bool { metadataChanged || !dirty.isEmpty || !sealed.isEmpty || !written.isEmpty }

    // MARK: reading

    /// Reads into a new array, for callers off the data path (symlinks, fsck, tests) that hold the
    /// node lock anyway.
    func read(offset: UInt64, count: Int) throws -> [UInt8] {
        guard offset < size, count > 0 else { return [] }
        var out = [UInt8](repeating: 0, count: Int(min(size - offset, UInt64(count))))
        try out.withUnsafeMutableBytes { buffer in
            try prepareRead(offset: offset, count: count, into: buffer).finish(into: buffer)
        }
        return out
    }

    /// The second half of a read, to be done after the node lock is dropped: the committed extents
    /// still to decrypt, and the shared hold on `ioLock` that keeps a commit from rewriting them.
    /// It is a non-copyable value: the hold is released exactly once, by `finish` or, if the lease
    /// is dropped unused (an error on the way), by its `deinit`, never by anyone else.
    struct ReadLease: ~Copyable {
        let file: ExtentFile
        let plan: ReadPlan

        /// Bytes the read returns.
        var length: Int { plan.length }

        fileprivate init(file: ExtentFile, plan: ReadPlan) {
            self.file = file
            self.plan = plan
            if !plan.runs.isEmpty { file.ioLock.lockShared() }
        }

        consuming func finish(into out: UnsafeMutableRawBufferPointer) throws -> Int {
            try file.finishRead(plan, into: out)
            return plan.length
        }

        deinit {
            if !plan.runs.isEmpty { file.ioLock.unlockShared() }
        }
    }

    /// What a read still has to fetch after `prepareRead`: runs of committed extents.
    struct ReadPlan {
        var offset: UInt64
        var length: Int
        /// The file size the runs were planned against (it fixes the last extent's length).
        var size: UInt64
        var runs: [ClosedRange<UInt64>] = []
    }

    /// First half of a read, under the node lock: copies uncommitted extents and zeroes holes into
    /// `out`, and leases the committed extents still to decrypt. The caller drops the node lock and
    /// finishes the lease: decrypting outside the node lock lets reads of one file run in
    /// parallel, and the lease's shared lock keeps a commit from rewriting the extents meanwhile.
    func prepareRead(offset: UInt64, count: Int, into out: UnsafeMutableRawBufferPointer) throws -> ReadLease {
        guard offset < size, count > 0 else { return ReadLease(file: self, plan: ReadPlan(offset: offset, length: 0, size: size)) }
        let end = min(size, offset + UInt64(count))
        var plan = ReadPlan(offset: offset, length: Int(end - offset), size: size)
        var index = geometry.extentIndex(offset: offset)
        let last = geometry.extentIndex(offset: end - 1)
        while index <= last {
            let start = geometry.extentStart(index)
            let from = max(offset, start)
            let to = min(end, start + UInt64(geometry.extentSize))
            let target = UnsafeMutableRawBufferPointer(rebasing: out[Int(from - offset)..<Int(to - offset)])
            let inExtent = Int(from - start)..<Int(to - start)
            if let plain = dirty[index] {
                plain.withUnsafeBytes { target.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inExtent])) }
            } else if let stored = sealed[index] {
                let plain = ThreadScratch.current.extent(count: geometry.extentSize)
                try stored.withUnsafeBytes { try open(index, stored: $0, into: plain, committed: false) }
                target.copyMemory(from: UnsafeRawBufferPointer(rebasing: plain[inExtent]))
            } else if holes.contains(index) {
                target.initializeMemory(as: UInt8.self, repeating: 0)
            } else if let lastRun = plan.runs.last, lastRun.upperBound + 1 == index {
                plan.runs[plan.runs.count - 1] = lastRun.lowerBound...index
            } else {
                plan.runs.append(index...index)
            }
            index += 1
        }
        return ReadLease(file: self, plan: plan)
    }

    /// Second half of a read: one pread per run of committed extents, each extent decrypted
    /// straight into `out` when the read wants all of it.
    fileprivate func finishRead(_ plan: ReadPlan, into out: UnsafeMutableRawBufferPointer) throws {
        let scratch = ThreadScratch.current
        let end = plan.offset + UInt64(plan.length)
        for run in plan.runs {
            let lastLength = geometry.plaintextLength(run.upperBound, size: plan.size)
            let runBytes = Int(geometry.backingOffset(run.upperBound) - geometry.backingOffset(run.lowerBound))
                + lastLength + ExtentGeometry.overheadBytes
            let stored = scratch.ciphertext(count: runBytes)
            let n = try Sys.pread(fd, stored, offset: geometry.backingOffset(run.lowerBound))
            guard n == runBytes else { throw StoreError.integrity("extent \(run.upperBound) is truncated") }
            for index in run {
                let length = geometry.plaintextLength(index, size: plan.size)
                let at = Int(geometry.backingOffset(index) - geometry.backingOffset(run.lowerBound))
                let one = UnsafeRawBufferPointer(rebasing: stored[at..<(at + length + ExtentGeometry.overheadBytes)])
                let start = geometry.extentStart(index)
                let from = max(plan.offset, start)
                let to = min(end, start + UInt64(length))
                if from == start && to == start + UInt64(length) {
                    let target = UnsafeMutableRawBufferPointer(rebasing: out[Int(from - plan.offset)..<Int(to - plan.offset)])
                    try open(index, stored: one, into: target, committed: true)
                } else {
                    let plain = scratch.extent(count: geometry.extentSize)
                    try open(index, stored: one, into: plain, committed: true)
                    UnsafeMutableRawBufferPointer(rebasing: out[Int(from - plan.offset)..<Int(to - plan.offset)])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: plain[Int(from - start)..<Int(to - start)]))
                }
            }
        }
    }

    /// - Parameter committed: the bytes come from the backing file (they may be legacy), not from
    ///   this file's own uncommitted seals (always under `key`).
    private func open(_ index: UInt64, stored: UnsafeRawBufferPointer, into plain: UnsafeMutableRawBufferPointer,
                      committed: Bool) throws {
        var sealing = key
        if committed && legacy.contains(index) {
            guard let legacyKey else { throw StoreError.noKey }
            sealing = legacyKey
        }
        do {
            try ExtentCodec.open(key: sealing, objectID: objectID, index: index, stored: stored, into: plain)
        } catch {
            throw StoreError.integrity("extent \(index) failed authentication")
        }
    }

    /// Decrypts committed extent `index` (length from the current size) into `buffer`.
    private func loadStored(_ index: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let length = geometry.plaintextLength(index, size: size)
        let stored = ThreadScratch.current.ciphertext(count: length + ExtentGeometry.overheadBytes)
        let n = try Sys.pread(fd, stored, offset: geometry.backingOffset(index))
        guard n == stored.count else { throw StoreError.integrity("extent \(index) is truncated") }
        try open(index, stored: UnsafeRawBufferPointer(stored), into: buffer, committed: true)
        if length < buffer.count { buffer[length...].initializeMemory(as: UInt8.self, repeating: 0) }
    }

    /// Makes extent `index` a plaintext dirty buffer, loading what it holds now unless the caller
    /// overwrites all of it.
    func makeDirty(_ index: UInt64, willOverwriteWhole: Bool) throws {
        guard dirty[index] == nil else { return }
        let stored = sealed[index]
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
        sealed[index] = nil
        dirty[index] = buffer
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
    /// in parallel and only `write(offset:data:presealed:)` runs under the node lock. The result
    /// lives in this thread's scratch buffer until the next call on this thread.
    func sealWholeExtents(offset: UInt64, data: UnsafeRawBufferPointer) -> Presealed? {
        let extentSize = UInt64(geometry.extentSize)
        let (end, overflow) = offset.addingReportingOverflow(UInt64(data.count))
        guard !overflow, end <= SizeLimit.format else { return nil } // write() refuses it (EFBIG)
        let first = (offset + extentSize - 1) / extentSize
        let endIndex = end / extentSize
        guard endIndex > first else { return nil }
        let count = Int(endIndex - first)
        let bytes = ThreadScratch.current.sealing(count: count * geometry.stride)
        for i in 0..<count {
            let index = first + UInt64(i)
            let from = Int(geometry.extentStart(index) - offset)
            ExtentCodec.seal(key: key, objectID: objectID, index: index,
                             plaintext: UnsafeRawBufferPointer(rebasing: data[from..<(from + geometry.extentSize)]),
                             into: UnsafeMutableRawBufferPointer(rebasing: bytes[(i * geometry.stride)..<((i + 1) * geometry.stride)]))
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
                try ioLock.withExclusive { try Sys.pwrite(fd, run, offset: geometry.backingOffset(lower)) }
                writtenEnd = max(writtenEnd, geometry.backingOffset(upper))
            }
        }
        if end > size { try resize(to: end) }
        var index = geometry.extentIndex(offset: offset)
        let last = geometry.extentIndex(offset: end - 1)
        while index <= last {
            let start = geometry.extentStart(index)
            let from = max(offset, start)
            let to = min(end, start + UInt64(geometry.extentSize))
            let whole = from == start && to - start == UInt64(geometry.extentSize)
            if whole && direct.contains(index) {
                written.insert(index)
                sealed[index] = nil
                dirty[index] = nil
            } else if whole, let presealed, index >= presealed.first, index < presealed.first + UInt64(presealed.count) {
                sealed[index] = Array(presealed.extent(index, stride: geometry.stride))
                dirty[index] = nil
            } else {
                try makeDirty(index, willOverwriteWhole: whole)
                dirty[index]!.withUnsafeMutableBytes { p in
                    UnsafeMutableRawBufferPointer(rebasing: p[Int(from - start)..<Int(to - start)])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[Int(from - offset)..<Int(to - offset)]))
                }
            }
            holes.remove(index)
            index += 1
        }
        touch()
    }

    /// Largest size of this file (`SizeLimit`), found on the first growth that needs it.
    lazy var maximumSize = SizeLimit.maximumSize(geometry, directory: journalFD)

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
            for index in dirty.keys where index >= newCount { dirty[index] = nil }
            for index in sealed.keys where index >= newCount { sealed[index] = nil }
            written = written.filter { $0 < newCount }
            holes.clip(to: newCount)
            let tail = Int(newSize % UInt64(geometry.extentSize))
            if tail != 0 {
                let lastNew = newCount - 1
                if !holes.contains(lastNew) {
                    try makeDirty(lastNew, willOverwriteWhole: false)
                    _ = dirty[lastNew]!.withUnsafeMutableBytes { $0[tail...].initializeMemory(as: UInt8.self, repeating: 0) }
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
    var bufferedBytes: Int { (dirty.count + sealed.count) * geometry.extentSize }

    // MARK: committing

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
    @discardableResult
    func commit(header: inout ObjectHeader, durable: Bool = false) throws -> HeaderSafety? {
        // Readers decrypting committed extents outside the node lock finish first, and none start
        // until the extents and the size they were read against are consistent again.
        try ioLock.withExclusive { try commitExclusive(header: &header, durable: durable) }
    }

    private func commitExclusive(header: inout ObjectHeader, durable: Bool) throws -> HeaderSafety? {
        var recovered = false
        // A transaction that failed after its pending flag reached the disk is finished first:
        // its journal is complete, and nothing may be written on top of a pending header.
        if header.flags.contains(.pendingWrite) {
            header = try Journal.recover(journalFD: journalFD, objectFD: fd, pending: header, key: key,
                                            storeVersion: slots.storeVersion)
            recovered = true
        }
        guard hasUncommittedChanges else {
            if durable { try Sys.fdatasync(fd) }
            return recovered || durable ? .durable : nil
        }
        var safety: HeaderSafety = .durable
        var final = header
        final.size = size
        final.holes = holes
        final.flags = []
        let newCount = geometry.extentCount(size: size)
        final.legacyRanges = remainingLegacy(count: newCount)
        while header.previousPolicy != nil && !final.fits(), let smallest = final.legacyRanges.ranges.min(by: { $0.count < $1.count }) {
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
            try storeAsZeros(smallest, committedHoles: header.holes)
            final.holes.remove(smallest)
            holes.remove(smallest)
            final.legacyRanges.remove(smallest)
        }
        let records = (sealDirty() + sealed.map { Journal.Record(index: $0.key, stored: $0.value) })
            .sorted { $0.index < $1.index }
        let committedCount = geometry.extentCount(size: header.size)
        let overwrites = records.contains { $0.index < committedCount && !header.holes.contains($0.index) }
        // Direct writes may have grown the backing file past the committed length; a file that
        // was then truncated is cut back to its new length like any shrinking file.
        let oldLength = max(geometry.backingLength(size: header.size), writtenEnd)
        let newLength = geometry.backingLength(size: size)
        let unsafe = TestHooks.journalingDisabled

        if !overwrites || unsafe {
            if newLength > oldLength { try Sys.ftruncate(fd, newLength) }
            try write(records)
            // The extents are made durable by the sync HeaderSlots.write does before the header.
            FaultPoints.reach(.appendExtentsWritten)
            try slots.write(fd: fd, header: &final, key: key, sync: newLength < oldLength && !unsafe)
            FaultPoints.reach(.appendHeaderWritten)
            if newLength < oldLength { try Sys.ftruncate(fd, newLength) }
            if durable { try Sys.fdatasync(fd) }
            if !(newLength < oldLength) && !durable { safety = .replaceable }
        } else {
            var pending = header
            pending.flags.insert(.pendingWrite)
            final.sequence = header.sequence + 2
            final = slots.stamped(final)
            let finalSlot = HeaderCodec.seal(final, key: key)
            // A journal directory moved out of the store must not receive the shadow.
            if let storeRoot { try Sys.checkBeneath(journalFD, root: storeRoot) }
            try Journal.write(journalFD: journalFD, objectID: objectID, pendingSequence: header.sequence + 1,
                              finalSlot: finalSlot, records: records, key: key, storeVersion: slots.storeVersion)
            usedJournal = true
            FaultPoints.reach(.shadowWritten)
            try slots.write(fd: fd, header: &pending, key: key, sync: true)
            FaultPoints.reach(.pendingFlagSet)
            do {
                if newLength > oldLength { try Sys.ftruncate(fd, newLength) }
                try write(records)
                try Sys.fdatasync(fd)
                FaultPoints.reach(.extentsApplied)
                try HeaderSlots.writeSealed(fd: fd, finalSlot, sequence: final.sequence)
                // Synced even when not asked to be durable: the next transaction overwrites the
                // journal, and a final header lost after that could not be replayed.
                try Sys.fdatasync(fd)
            } catch {
                // The disk now says "pending": so must memory, so that nothing is written over it
                // and the journal is kept until a replay (the next commit, or the next open) succeeds.
                // Until then no write goes straight to the backing file: the replay rewrites
                // extents past the committed end that the pending transaction covers.
                header = pending
                replayPending = true
                throw error
            }
            FaultPoints.reach(.finalHeaderWritten)
            if newLength < oldLength { try Sys.ftruncate(fd, newLength) }
            // The shadow keeps its bytes: nothing replays it without a pending header, the next
            // transaction overwrites it and the last close removes it. Emptying it here freed and
            // re-allocated up to a whole batch of pages per transaction.
            FaultPoints.reach(.shadowRemoved)
        }
        header = final
        // Only now: a commit that failed part way (ENOSPC, EIO) keeps its data buffered, and the
        // next flush retries the whole transaction.
        dirty.removeAll(keepingCapacity: true)
        sealed.removeAll(keepingCapacity: true)
        written.removeAll(keepingCapacity: true)
        committedSize = final.size
        legacy = final.legacyRanges
        writtenEnd = 0
        replayPending = false
        dirtySince = nil
        if let modifiedAt {
            try Sys.restoreModificationTime(fd, modifiedAt)
            self.modifiedAt = nil
        }
        metadataChanged = false
        return safety
    }

    /// The legacy ranges once this commit's extents are written: every extent it writes (or that
    /// is a hole, or past the new end) is no longer sealed under the previous key.
    private func remainingLegacy(count: UInt64) -> HoleMap {
        var remaining = legacy
        remaining.clip(to: count)
        for index in dirty.keys { remaining.remove(index) }
        for index in sealed.keys { remaining.remove(index) }
        for index in written { remaining.remove(index) }
        for range in holes.ranges { remaining.remove(range) }
        return remaining
    }

    /// Committed extents a rekey has still to rewrite.
    var legacyExtentCount: UInt64 {
        legacy.ranges.reduce(0) { $0 + UInt64($1.count) }
    }

    /// Queues up to `limit` legacy extents for resealing under `key` by the next commit (which
    /// journals them: they are overwrites in place), loading each under the legacy key. Returns
    /// the plaintext bytes queued. Extents the file already holds dirty are left to that write.
    func queueLegacy(limit: Int) throws -> Int {
        var queued = 0
        var bytes = 0
        for range in legacy.ranges {
            for index in range where queued < limit {
                queued += 1
                guard dirty[index] == nil, sealed[index] == nil, !holes.contains(index), index < geometry.extentCount(size: size)
                else { continue }
                try makeDirty(index, willOverwriteWhole: false)
                bytes += geometry.plaintextLength(index, size: size)
            }
        }
        if queued > 0 { metadataChanged = true }
        return bytes
    }

    // MARK: rekey batches resealed without the node lock

    /// Up to `limit` committed legacy extents that a rekey can reseal without the node lock: whole
    /// (their stored length cannot change with the size), not a hole, not held dirty or sealed
    /// by a write. The rest (a partial last extent, extents a write holds) go through
    /// `queueLegacy`.
    func wholeLegacyExtents(limit: Int) -> [UInt64] {
        let wholeCount = min(size, committedSize) / UInt64(geometry.extentSize)
        var found: [UInt64] = []
        for range in legacy.ranges where found.count < limit {
            for index in range where found.count < limit {
                guard index < wholeCount else { break }
                guard dirty[index] == nil, sealed[index] == nil, !holes.contains(index) else { continue }
                found.append(index)
            }
        }
        return found
    }

    /// Reads the whole legacy extents `indices` (ascending) from the backing file, opens them under
    /// the legacy key and seals them under `key`. Runs without the node lock: it reads only what
    /// never changes for this file (descriptor, keys, object ID, geometry). A commit may rewrite
    /// the extents meanwhile; the caller installs the result only if none did (`installResealed`),
    /// and a failed open then means that, not damage.
    ///
    /// - Parameter threads: how many threads share the decryption and sealing.
    func resealLegacy(_ indices: [UInt64], threads: Int) throws -> [Journal.Record] {
        guard let legacyKey else { throw StoreError.noKey }
        let stride = geometry.stride
        let resealed = Mutex([Journal.Record]())
        let failure = Mutex<Error?>(nil)
        let parts = max(1, min(threads, indices.count / 16))
        DispatchQueue.concurrentPerform(iterations: parts) { part in
            let mine = indices[(indices.count * part / parts)..<(indices.count * (part + 1) / parts)]
            var records: [Journal.Record] = []
            records.reserveCapacity(mine.count)
            do {
                var i = mine.startIndex
                while i < mine.endIndex {
                    // Contiguous extents are read with one pread, at most 64 at a time.
                    var j = i
                    while j + 1 < mine.endIndex && j - i < 63 && mine[j + 1] == mine[j] + 1 { j += 1 }
                    let count = j - i + 1
                    let stored = ThreadScratch.current.ciphertext(count: count * stride)
                    let n = try Sys.pread(fd, stored, offset: geometry.backingOffset(mine[i]))
                    guard n == stored.count else { throw StoreError.integrity("extent \(mine[j]) is truncated") }
                    let plain = ThreadScratch.current.extent(count: geometry.extentSize)
                    for k in 0..<count {
                        let index = mine[i + k]
                        let one = UnsafeRawBufferPointer(rebasing: stored[(k * stride)..<((k + 1) * stride)])
                        do {
                            try ExtentCodec.open(key: legacyKey, objectID: objectID, index: index, stored: one, into: plain)
                        } catch {
                            throw StoreError.integrity("extent \(index) failed authentication")
                        }
                        records.append(Journal.Record(index: index, stored: sealedExtent(index, plaintext: UnsafeRawBufferPointer(plain))))
                    }
                    i = j + 1
                }
                resealed.withLock { $0 += records }
            } catch {
                failure.withLock { $0 = error }
            }
        }
        if let error = failure.withLock({ $0 }) { throw error }
        return resealed.withLock { $0 }
    }

    /// Takes resealed legacy extents for the next commit, each only if it is still what
    /// `wholeLegacyExtents` chose it for (a write or truncate meanwhile wins). The caller has
    /// checked that no header was written since they were read. Returns the plaintext bytes taken.
    func installResealed(_ records: [Journal.Record], sealedWith sealing: MasterKey) -> Int {
        guard sealing === key || sealing.identifier == key.identifier else { return 0 }
        let wholeCount = min(size, committedSize) / UInt64(geometry.extentSize)
        var taken = 0
        for record in records where record.index < wholeCount && legacy.contains(record.index)
            && dirty[record.index] == nil && sealed[record.index] == nil && !holes.contains(record.index) {
            sealed[record.index] = record.stored
            taken += geometry.extentSize
        }
        return taken
    }

    /// Extent `index` sealed with a fresh nonce. The seal writes every byte of the result, so it
    /// is not zeroed first.
    private func sealedExtent(_ index: UInt64, plaintext: UnsafeRawBufferPointer) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: plaintext.count + ExtentGeometry.overheadBytes) { bytes, count in
            ExtentCodec.seal(key: key, objectID: objectID, index: index, plaintext: plaintext, into: UnsafeMutableRawBufferPointer(bytes))
            count = bytes.count
        }
    }

    /// Seals every dirty extent with a fresh nonce, in index order.
    private func sealDirty() -> [Journal.Record] {
        let records = dirty.keys.sorted().map { index -> Journal.Record in
            let length = geometry.plaintextLength(index, size: size)
            let stored = dirty[index]!.withUnsafeBytes { sealedExtent(index, plaintext: UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
            return Journal.Record(index: index, stored: stored)
        }
        return records
    }

    /// Stores a hole range as sealed zero extents, streamed 64 at a time so memory stays bounded
    /// however large the range. The range is a committed hole, so nothing references these bytes
    /// until the header that drops the hole is written (after the sync that precedes it).
    func writeZeroExtents(_ range: Range<UInt64>) throws {
        let zeros = [UInt8](repeating: 0, count: geometry.extentSize)
        var index = range.lowerBound
        while index < range.upperBound {
            let end = min(range.upperBound, index + 64)
            let batch = (index..<end).map { i -> Journal.Record in
                let length = geometry.plaintextLength(i, size: size)
                let stored = zeros.withUnsafeBytes { sealedExtent(i, plaintext: UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
                return Journal.Record(index: i, stored: stored)
            }
            try write(batch)
            index = end
        }
    }

    /// Writes sealed extents in place; contiguous ones go out in one pwritev.
    private func write(_ records: [Journal.Record]) throws {
        var i = 0
        while i < records.count {
            var j = i
            // At most 64 per call: `withBuffers` nests one closure per record.
            while j + 1 < records.count && j - i < 63 && records[j + 1].index == records[j].index + 1 { j += 1 }
            try withBuffers(records[i...j].map(\.stored)) { try Sys.pwritev(fd, $0, offset: geometry.backingOffset(records[i].index)) }
            i = j + 1
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
        try Sys.fallocate(fd, mode: keepSize ? 1 : 0, offset: geometry.backingOffset(first),
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
