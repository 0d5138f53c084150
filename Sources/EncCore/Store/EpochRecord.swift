import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// `encfsd.epoch`: which mount of the store is running, and the last one that did not end with a
/// clean unmount (FORMAT.md 15.2).
///
/// It is the evidence a damaged header slot is judged by. A header write can be torn only by an
/// unclean shutdown while it was in flight, so a damaged slot may be passed over for the other
/// one only if some epoch at or after the one the other slot was written in ended uncleanly
/// (`TornWriteEvidence`). The record is made durable before the first header write of an epoch,
/// and marked clean only after the last one is durable, so it never claims a clean end that was
/// not.
///
/// Two 32-byte slots, like a header: a record version goes to slot 0 when an epoch opens and to
/// slot 1 when it closes cleanly, so a torn record write leaves the other slot intact. A damaged
/// record slot is never read as new evidence of an unclean shutdown (that would widen what may be
/// passed over): the record then only keeps the unclean epoch it already knew.
struct EpochRecord: Equatable, Sendable {
    static let fileName = "encfsd.epoch"
    static let magic: [UInt8] = Array("EFSE".utf8)
    static let slotBytes = 32

    enum State: UInt8 { case open = 1, clean = 2 }

    var epoch: UInt64
    var state: State
    var lastUncleanEpoch: UInt64?

    /// Epochs count mounts, or start from the clock's seconds: anything near the top of the range
    /// is not one encfsd wrote, and would overflow the next epoch.
    static let largestEpoch: UInt64 = 1 << 62

    /// Whether this version was written after `other`: every open and every clean end of an epoch
    /// is one step.
    func isLater(than other: EpochRecord) -> Bool {
        (epoch, state == .clean ? 1 : 0) > (other.epoch, other.state == .clean ? 1 : 0)
    }

    func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: Self.slotBytes)
        w.raw(Self.magic)
        w.u16(1)
        w.u8(state.rawValue)
        w.u8(0)
        w.u64(epoch)
        w.u64(lastUncleanEpoch.map { $0 &+ 1 } ?? 0)
        w.raw(Array(OpenSSL.sha256(w.bytes).prefix(8)))
        return w.bytes
    }

    static func decode(_ slot: ArraySlice<UInt8>) -> EpochRecord? {
        guard slot.count == slotBytes, OpenSSL.sha256(Array(slot.prefix(24))).prefix(8).elementsEqual(slot.suffix(8)) else { return nil }
        var r = ByteReader(slot)
        guard r.raw(4) == magic, r.u16() == 1, let raw = r.u8(), let state = State(rawValue: raw), r.u8() == 0,
              let epoch = r.u64(), epoch < largestEpoch, let unclean = r.u64(), unclean <= epoch + 1 else { return nil }
        return EpochRecord(epoch: epoch, state: state, lastUncleanEpoch: unclean == 0 ? nil : unclean - 1)
    }

    /// What a store's record says, read without changing it.
    struct Reading: Sendable {
        /// The newest intact record version; nil when there is none.
        var newest: EpochRecord?
        var damaged: Bool
        var missing: Bool

        /// The evidence for judging damaged header slots. An epoch left open ended uncleanly, unless
        /// the record is damaged (an open version may then be an older one than a lost clean end).
        /// A store from before the record existed (a v1 store's first mount by this build) cannot
        /// show how its last mount ended, so v1 slots (epoch 0) keep the v1 rule: passed over,
        /// and logged.
        func evidence(storeVersion: Int) -> TornWriteEvidence {
            guard let newest else { return TornWriteEvidence(lastUncleanEpoch: missing && storeVersion < 2 ? 0 : nil) }
            if newest.state == .open && !damaged { return TornWriteEvidence(lastUncleanEpoch: newest.epoch) }
            return TornWriteEvidence(lastUncleanEpoch: newest.lastUncleanEpoch)
        }
    }

    /// The record file, refused if it has other hard links; nil if there is none.
    private static func openRecord(_ storeFD: borrowing FileDescriptor) throws -> FileDescriptor? {
        do {
            let opened = try storeFD.openEntryStat(Array(fileName.utf8), .regularFile, .readOnly)
            guard opened.stat.st_nlink == 1 else { throw StoreError.unusableObject(name: fileName, what: "a file with other hard links") }
            return opened.descriptor
        } catch StoreError.system(ENOENT) {
            return nil
        }
    }

    static func read(storeFD: borrowing FileDescriptor) throws -> Reading {
        guard let fd = try openRecord(storeFD) else { return Reading(newest: nil, damaged: false, missing: true) }
        var bytes = [UInt8](repeating: 0, count: 2 * slotBytes)
        let n = try bytes.withUnsafeMutableBytes { try fd.pread($0, offset: 0) }
        let slots = [bytes[0..<slotBytes], bytes[slotBytes..<(2 * slotBytes)]]
        let records = slots.map { decode($0) }
        let damaged = n != bytes.count || zip(slots, records).contains { slot, record in record == nil && !isAllZero(slot) }
        let newest = records.compactMap { $0 }.max { $1.isLater(than: $0) }
        return Reading(newest: newest, damaged: damaged || newest == nil, missing: false)
    }

    /// Opens a new epoch for a process that will write headers (a mount, `fsck --repair`): the
    /// record says "open" durably before this returns. Returns the new epoch and the evidence.
    static func open(storeFD: borrowing FileDescriptor, storeVersion: Int) throws -> (epoch: UInt64, evidence: TornWriteEvidence, reading: Reading) {
        let reading = try read(storeFD: storeFD)
        let evidence = reading.evidence(storeVersion: storeVersion)
        // Without an intact record the previous epoch number is unknown; the clock's seconds are
        // far beyond any count of mounts, so the new epoch is still later than every slot's.
        let epoch = reading.newest.map { $0.epoch + 1 } ?? max(1, UInt64(time(nil)))
        let record = EpochRecord(epoch: epoch, state: .open, lastUncleanEpoch: evidence.lastUncleanEpoch)
        try write(record, storeFD: storeFD, create: reading.missing)
        if reading.damaged {
            Diagnostics.report("\(fileName) is damaged: no damaged header slot will be passed over as a torn write this mount")
        }
        return (epoch, evidence, reading)
    }

    /// Marks `epoch` as ended cleanly: every header write of it is durable (the caller synced).
    static func close(storeFD: borrowing FileDescriptor, epoch: UInt64, evidence: TornWriteEvidence) throws {
        try write(EpochRecord(epoch: epoch, state: .clean, lastUncleanEpoch: evidence.lastUncleanEpoch), storeFD: storeFD, create: false)
    }

    /// The record of a new store: epoch 0, ended cleanly, no unclean shutdown ever.
    static func create(storeFD: borrowing FileDescriptor) throws {
        try write(EpochRecord(epoch: 0, state: .clean, lastUncleanEpoch: nil), storeFD: storeFD, create: true)
    }

    private static func write(_ record: EpochRecord, storeFD: borrowing FileDescriptor, create: Bool) throws {
        let name = Array(fileName.utf8)
        let fd = create ? try storeFD.createEntry(name, mode: 0o600) : try storeFD.openPrivateFile(name)
        let slot = record.state == .open ? 0 : 1
        try record.encoded().withUnsafeBytes { try fd.pwrite($0, offset: Int64(slot * slotBytes)) }
        if create {
            try [UInt8](repeating: 0, count: slotBytes).withUnsafeBytes { try fd.pwrite($0, offset: Int64((1 - slot) * slotBytes)) }
        }
        try fd.fdatasync()
        if create {
            let dir = try storeFD.listingDescriptor()
            try dir.fsync()
        }
    }
}
