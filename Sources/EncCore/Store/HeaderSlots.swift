import Synchronization
import EncCrypto
import EncKeys
import EncFormat
/// The one owner of an object's two header slots: which slot a new version goes to, when a sync
/// is owed before it, which slot is served, and the epoch every version is stamped with.
///
/// Invariant: the slot that does not hold the newest version is durable, so a write torn by a
/// power loss always leaves a durable version. Which slot is served when one is damaged is
/// decided by `HeaderCodec.current` on this store's `TornWriteEvidence`; every slot passed over
/// is logged here.
struct HeaderSlots: Sendable {
    /// The epoch of this mount (or fsck run), stamped into every v2 slot written. A mount sets it
    /// when it opens its epoch, after every check that can refuse the mount (`Volume.openEpoch`):
    /// a refused mount must leave no open epoch, which would read as an unclean shutdown.
    var epoch: UInt64 { epochCell.value.load(ordering: .acquiring) }
    final class EpochCell: Sendable { let value: Atomic<UInt64>; init(_ v: UInt64) { value = Atomic(v) } }
    let epochCell: EpochCell
    let evidence: TornWriteEvidence
    /// Objects written in a store of a newer version than their own are rewritten in it: a v1
    /// object in an upgraded store gains what v2 records at its next write.
    let storeVersion: UInt16

    /// Slots read without writing (fsck's check, tests): no epoch is stamped by such a reader.
    static func reading(evidence: TornWriteEvidence, storeVersion: Int) -> HeaderSlots {
        HeaderSlots(epoch: 0, evidence: evidence, storeVersion: UInt16(storeVersion))
    }

    init(epoch: UInt64, evidence: TornWriteEvidence, storeVersion: UInt16) {
        epochCell = EpochCell(epoch)
        self.evidence = evidence
        self.storeVersion = storeVersion
    }

    /// The version a new object of this store is created in.
    var newObjectVersion: UInt16 { min(storeVersion, ObjectHeader.newestVersion) }

    #if ENCFSD_TEST_HOOKS
    /// Header regions read through these slots (shared by copies): tests hold the request paths to
    /// their count.
    final class ReadCount: Sendable { let value = Atomic<Int>(0) }
    let regionReads = ReadCount()
    #endif

    private func region(fd: borrowing FileDescriptor) throws -> [UInt8] {
        #if ENCFSD_TEST_HOOKS
        regionReads.value.add(1, ordering: .relaxed)
        #endif
        // Not zero-filled first (4 KiB per lookup): pread overwrites all of it, and a short read
        // is refused before any byte is looked at.
        var n = 0
        let region = try [UInt8](unsafeUninitializedCapacity: ExtentGeometry.headerBytes) { buffer, initialized throws in
            n = try fd.pread(UnsafeMutableRawBufferPointer(buffer), offset: 0)
            initialized = n
        }
        guard n == ExtentGeometry.headerBytes else { throw StoreError.integrity("backing object is shorter than its header (\(n) bytes)") }
        return region
    }

    func choice(fd: borrowing FileDescriptor, key: MasterKey?) throws -> HeaderCodec.Choice {
        try HeaderCodec.current(region: try region(fd: fd), key: key, evidence: evidence)
    }

    func read(fd: borrowing FileDescriptor, key: MasterKey?) throws -> ObjectHeader {
        let choice = try choice(fd: fd, key: key)
        if key != nil { report(choice) }
        return choice.header
    }

    /// One read of the header, verified when `keyFor` has the key that authenticates it.
    func read(fd: borrowing FileDescriptor, keyFor: (KeyIdentifier) -> MasterKey?) throws -> (ObjectHeader, verified: Bool) {
        let (choice, verified) = try HeaderCodec.current(region: try region(fd: fd), evidence: evidence, keyFor: keyFor)
        if verified { report(choice) }
        return (choice.header, verified)
    }

    /// Every slot passed over is logged, once: on the read that verified it (an unverified read
    /// before it chose the same slot).
    private func report(_ choice: HeaderCodec.Choice) {
        guard let torn = choice.tornSlot else { return }
        Diagnostics.report("header slot \(torn) of object \(Hex.encode(choice.header.objectID)) is damaged; serving sequence "
            + "\(choice.header.sequence) from the other slot as the state before a write torn by the unclean shutdown of "
            + "epoch \(evidence.lastUncleanEpoch ?? 0)")
    }

    /// `header` as it is written now: stamped with this epoch, in the store's version if newer.
    func stamped(_ header: ObjectHeader) -> ObjectHeader {
        var h = header
        h.version = max(h.version, newObjectVersion)
        h.epoch = epoch
        return h
    }

    func seal(_ header: ObjectHeader, key: MasterKey) -> [UInt8] {
        HeaderCodec.seal(stamped(header), key: key)
    }

    /// Writes a new version of `header`, then updates `header`. A torn write leaves the other
    /// slot intact, and the invariant every writer keeps is that the slot not holding the
    /// newest version is durable.
    ///
    /// - `afterData`: the header references extents written since the last sync. The file is
    ///   synced first, which orders those extents before it and makes the current version durable;
    ///   the new one then goes to the other slot (sequence + 1).
    /// - Otherwise (a metadata change: mode, owner, times, names) nothing needs ordering. If the
    ///   current version is known durable the new one goes to the other slot; if not, it replaces
    ///   the current one in its own slot (sequence + 2, same parity) and the durable older slot is
    ///   left alone. Either way no sync is spent: untar's chown, chmod and utimens per file cost
    ///   three fdatasyncs on a disk before.
    func write(fd: borrowing FileDescriptor, header: inout ObjectHeader, key: MasterKey, sync: Bool,
               afterData: Bool, currentIsDurable: Bool = false) throws {
        if afterData && !TestHooks.journalingDisabled { try fd.fdatasync() }
        var next = stamped(header)
        next.sequence = header.sequence &+ (afterData || currentIsDurable ? 1 : 2)
        let slot = HeaderCodec.seal(next, key: key)
        let offset = Int64(HeaderCodec.slotIndex(sequence: next.sequence) * ExtentGeometry.headerSlotBytes)
        try slot.withUnsafeBytes { buf throws in try fd.pwrite(buf, offset: offset) }
        // The caller's copy follows the disk as soon as the slot is written, even if the sync
        // fails: a later write computed from the older sequence could land below this one.
        header = next
        if sync { try fd.fdatasync() }
    }

    /// Writes an already sealed slot image into the slot its sequence selects (the final header of
    /// a journaled commit, or of its replay).
    static func writeSealed(fd: borrowing FileDescriptor, _ slot: [UInt8], sequence: UInt64) throws {
        let offset = Int64(HeaderCodec.slotIndex(sequence: sequence) * ExtentGeometry.headerSlotBytes)
        try slot.withUnsafeBytes { try fd.pwrite($0, offset: offset) }
    }

    /// Writes the first header of a new object: slot of sequence 0, the other slot zero. `header`
    /// becomes what was written.
    func create(fd: borrowing FileDescriptor, header: inout ObjectHeader, key: MasterKey) throws {
        header = stamped(header)
        var region = HeaderCodec.seal(header, key: key)
        region += [UInt8](repeating: 0, count: ExtentGeometry.headerSlotBytes)
        if HeaderCodec.slotIndex(sequence: header.sequence) == 1 {
            region = Array(region[ExtentGeometry.headerSlotBytes...] + region[..<ExtentGeometry.headerSlotBytes])
        }
        try region.withUnsafeBytes { buf throws in try fd.pwrite(buf, offset: 0) }
    }

    /// Completes the interrupted transaction a pending header marks, from its journal, and returns
    /// the final header (now durable). The one place a pending header is replayed: by a mount, the
    /// first time the object is used with its key or when a commit finds its own failed
    /// transaction; by fsck, with `--repair`. Each replay is logged.
    ///
    /// - Throws: `StoreError.integrity` when the journal is missing, damaged or of another
    ///   transaction: the object is refused, never served half-written.
    func completeInterruptedWrite(fd: borrowing FileDescriptor, journalFD: borrowing FileDescriptor, pending: ObjectHeader, key: MasterKey) throws -> ObjectHeader {
        precondition(pending.flags.contains(.pendingWrite))
        let final = try Journal.recover(journalFD: journalFD, objectFD: fd, pending: pending, key: key, storeVersion: storeVersion)
        Diagnostics.report("recovered an interrupted write of object \(Hex.encode(pending.objectID)) from its journal")
        return final
    }

    /// fsck --repair: rewrites the damaged slot with the served version, as the next sequence, so
    /// both slots are intact again and the damage is not judged again at every read.
    func rewriteDamaged(fd: borrowing FileDescriptor, header: ObjectHeader, key: MasterKey) throws -> ObjectHeader {
        var h = header
        try write(fd: fd, header: &h, key: key, sync: true, afterData: true)
        return h
    }
}

/// What a commit leaves of the header's safety (`ExtentFile.commit`).
enum HeaderSafety { case durable, replaceable }

/// What is known of an object's two slots beyond what the disk shows, kept with the node: which
/// header version is durable (synced since written), and which may be replaced in its own slot
/// because the other slot holds a durable state with the same extents. Together with
/// `HeaderSlots.writeMetadata` this is the one place that decides when a header write owes a sync.
struct SlotSafety: Sendable {
    /// A metadata update of this version may use the other slot without a sync first.
    private(set) var durable: UInt64?
    /// A metadata update of this version may replace it in its own slot without a sync: set after
    /// an append-only commit and after metadata writes; never after a journaled or shrinking
    /// commit, nor for a header merely read from disk.
    private(set) var replaceable: UInt64?

    mutating func madeDurable(_ sequence: UInt64) { durable = sequence }

    mutating func record(_ safety: HeaderSafety?, sequence: UInt64) {
        switch safety {
        case .durable?: durable = sequence
        case .replaceable?: replaceable = sequence
        case nil: break
        }
    }
}

extension HeaderSlots {
    /// Writes a metadata change (mode, owner, bindings, policy: no new extents) of the header whose
    /// current version is `header`, syncing only where the slot rules need it, and records what the
    /// write leaves in `safety`.
    ///
    /// The other slot may be overwritten without a sync only if the current version is durable;
    /// the current one may be replaced in place only if the other slot is a durable state the
    /// object can fall back to (not a pending copy whose journal may be gone, nor a size whose
    /// extents a shrink or later appends rewrote). Otherwise: sync, then the other slot.
    func writeMetadata(fd: borrowing FileDescriptor, header: inout ObjectHeader, key: MasterKey, sync: Bool, safety: inout SlotSafety) throws {
        let durable = safety.durable == header.sequence
        let replaceable = safety.replaceable == header.sequence
        try write(fd: fd, header: &header, key: key, sync: sync, afterData: !(durable || replaceable), currentIsDurable: durable)
        // Either way the other slot now holds a durable version consistent with the data.
        if sync { safety.madeDurable(header.sequence) } else { safety.record(.replaceable, sequence: header.sequence) }
    }
}
