import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// What never changes while a backing object is open: its descriptor, keys, identity and the
/// places its transactions write. Reads, seals and commits of the object share it without a lock.
///
/// Every stored property is immutable and `Sendable`, so the compiler checks what sharing it needs;
/// the descriptors are held through their owners, so each stays open for as long as any copy.
struct OpenObject: Sendable {
    /// The backing object, read-write for a file that writes (read-only for a view that reads).
    let backing: SharedDescriptor
    /// The store's `.journal` directory, where the object's shadow lives during a transaction.
    let journal: SharedDescriptor
    let key: MasterKey
    let geometry: ExtentGeometry
    let objectID: [UInt8]
    /// Where each header version goes and what it is stamped with.
    let slots: HeaderSlots
    /// Where the store root is, to check the journal directory is still beneath it before a shadow
    /// is written (nil for scratch files in tests).
    let storeRoot: Sys.Place?

    /// Extent `index` sealed under `key` with a fresh nonce. The seal writes every byte of the
    /// result, so it is not zeroed first.
    func seal(_ index: UInt64, plaintext: UnsafeRawBufferPointer) -> [UInt8] {
        var sealer = groupSealer()
        return seal(index, plaintext: plaintext, using: &sealer)
    }

    /// Extent `index` sealed by `sealer`, which shares a nonce among the members of a key group
    /// sealed through it in a row (one sealer per thread and batch).
    func seal(_ index: UInt64, plaintext: UnsafeRawBufferPointer, using sealer: inout ExtentGroupSealer) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: plaintext.count + ExtentGeometry.overheadBytes) { bytes, count in
            sealer.seal(index: index, plaintext: plaintext, into: UnsafeMutableRawBufferPointer(bytes))
            count = bytes.count
        }
    }

    func groupSealer() -> ExtentGroupSealer { ExtentGroupSealer(key: key, objectID: objectID, geometry: geometry) }

    /// Writes sealed extents in place; contiguous ones go out in one pwritev.
    func writeInPlace(_ records: [Journal.Record]) throws {
        var i = 0
        while i < records.count {
            var j = i
            // At most 64 per call: `withBuffers` nests one closure per record.
            while j + 1 < records.count && j - i < 63 && records[j + 1].index == records[j].index + 1 { j += 1 }
            try withBuffers(records[i...j].map(\.stored)) { try backing.descriptor.pwritev($0, offset: geometry.backingOffset(records[i].index)) }
            i = j + 1
        }
    }
}

/// One commit's writes to the backing object, in DESIGN.md's order ("The flush transaction"),
/// each step's sync before the next.
///
/// With no extent overwritten in place (appends into new extents, filled holes, size or metadata
/// changes), the extents are written and synced, then the header flips: a crash leaves the old
/// header, which does not reference them. Otherwise the extents and the final header go to the
/// journal first, the header flips to a copy of the old one with the pending flag set, the extents
/// are written in place, and the header flips to the final one. A crash leaves either the old
/// state or a flagged header with a complete journal, which recovery replays.
struct FlushTransaction {
    let object: OpenObject
    /// The header on disk now.
    let committed: ObjectHeader
    /// The header the transaction leaves (size, holes, legacy ranges of the new state).
    var final: ObjectHeader
    /// Sealed extents to write in place, in index order.
    let records: [Journal.Record]
    /// The backing length before (direct writes past the committed end included) and after.
    let oldLength: Int64
    let newLength: Int64
    /// Also make the result durable; otherwise it is consistent but may be lost to a power loss.
    let durable: Bool

    /// The transaction failed after its pending header reached the disk: the object must be
    /// treated as `pending` (nothing written over it, the journal kept) until a replay succeeds.
    struct Interrupted: Error {
        let pending: ObjectHeader
        let underlying: Error
    }

    /// Whether any record overwrites an extent the committed header references.
    var overwrites: Bool {
        let committedCount = object.geometry.extentCount(size: committed.size)
        return records.contains { $0.index < committedCount && !committed.holes.contains($0.index) }
    }

    /// Whether the backing file must be extended before the records go in place: not when the
    /// last record ends at the new length, since writing it extends the file (one system call
    /// and one metadata change fewer per appending commit, the common one).
    private var needsExtending: Bool {
        guard newLength > oldLength else { return false }
        guard let last = records.last else { return true }
        return object.geometry.backingOffset(last.index) + Int64(last.stored.count) != newLength
    }

    /// Runs the transaction; returns the header now current and what is owed before its slot's
    /// sibling may be overwritten.
    consuming func run() throws -> (ObjectHeader, HeaderSafety) {
        if !overwrites || TestHooks.journalingDisabled { return try runAppending() }
        return try runJournaled()
    }

    private mutating func runAppending() throws -> (ObjectHeader, HeaderSafety) {
        let unsafe = TestHooks.journalingDisabled
        let file = object.backing
        if needsExtending { try file.descriptor.ftruncate(newLength) }
        try object.writeInPlace(records)
        // The extents are made durable by the sync HeaderSlots.write does before the header.
        FaultPoints.reach(.appendExtentsWritten)
        try object.slots.write(fd: file.descriptor, header: &final, key: object.key, sync: newLength < oldLength && !unsafe, afterData: true)
        FaultPoints.reach(.appendHeaderWritten)
        if newLength < oldLength { try file.descriptor.ftruncate(newLength) }
        if durable { try file.descriptor.fdatasync() }
        return (final, newLength < oldLength || durable ? .durable : .replaceable)
    }

    private mutating func runJournaled() throws -> (ObjectHeader, HeaderSafety) {
        let file = object.backing
        var pending = committed
        pending.flags.insert(.pendingWrite)
        final.sequence = committed.sequence + 2
        final = object.slots.stamped(final)
        let finalSlot = HeaderCodec.seal(final, key: object.key)
        // A journal directory moved out of the store must not receive the shadow.
        if let storeRoot = object.storeRoot { try object.journal.descriptor.checkBeneath(root: storeRoot) }
        try Journal.write(journalFD: object.journal.descriptor, objectID: object.objectID, pendingSequence: committed.sequence + 1,
                          finalSlot: finalSlot, records: records, key: object.key, storeVersion: object.slots.storeVersion)
        FaultPoints.reach(.shadowWritten)
        try object.slots.write(fd: file.descriptor, header: &pending, key: object.key, sync: true, afterData: true)
        FaultPoints.reach(.pendingFlagSet)
        do {
            if needsExtending { try file.descriptor.ftruncate(newLength) }
            try object.writeInPlace(records)
            try file.descriptor.fdatasync()
            FaultPoints.reach(.extentsApplied)
            try HeaderSlots.writeSealed(fd: file.descriptor, finalSlot, sequence: final.sequence)
            // Synced even when not asked to be durable: the next transaction overwrites the
            // journal, and a final header lost after that could not be replayed.
            try file.descriptor.fdatasync()
        } catch {
            throw Interrupted(pending: pending, underlying: error)
        }
        FaultPoints.reach(.finalHeaderWritten)
        if newLength < oldLength { try file.descriptor.ftruncate(newLength) }
        // The shadow keeps its bytes: nothing replays it without a pending header, the next
        // transaction overwrites it and the last close removes it. Emptying it here freed and
        // re-allocated up to a whole batch of pages per transaction.
        FaultPoints.reach(.shadowRemoved)
        return (final, .durable)
    }
}
