/// The one owner of an object's two header slots: which slot a new version goes to, when a sync
/// is owed before it, which slot is served, and the epoch every version is stamped with.
///
/// Invariant: the slot that does not hold the newest version is durable, so a write torn by a
/// power loss always leaves a durable version. Which slot is served when one is damaged is
/// decided by `HeaderCodec.current` on this store's `TornWriteEvidence`; every slot passed over
/// is logged here.
struct HeaderSlots: Sendable {
    /// The epoch of this mount (or fsck run), stamped into every v2 slot written.
    let epoch: UInt64
    let evidence: TornWriteEvidence
    /// Objects written in a store of a newer version than their own are rewritten in it: a v1
    /// object in an upgraded store gains what v2 records at its next write.
    let storeVersion: UInt16

    /// Slots read without writing (fsck's check, tests): no epoch is stamped by such a reader.
    static func reading(evidence: TornWriteEvidence, storeVersion: Int) -> HeaderSlots {
        HeaderSlots(epoch: 0, evidence: evidence, storeVersion: UInt16(storeVersion))
    }

    /// The version a new object of this store is created in.
    var newObjectVersion: UInt16 { min(storeVersion, ObjectHeader.newestVersion) }

    func choice(fd: Int32, key: MasterKey?) throws -> HeaderCodec.Choice {
        var region = [UInt8](repeating: 0, count: ExtentGeometry.headerBytes)
        let n = try region.withUnsafeMutableBytes { buf throws in try Sys.pread(fd, buf, offset: 0) }
        guard n == region.count else { throw StoreError.integrity("backing object is shorter than its header (\(n) bytes)") }
        return try HeaderCodec.current(region: region, key: key, evidence: evidence)
    }

    func read(fd: Int32, key: MasterKey?) throws -> ObjectHeader {
        let choice = try choice(fd: fd, key: key)
        // Logged only on the keyed read: the unverified read before it chose the same slot.
        if let torn = choice.tornSlot, key != nil {
            Diagnostics.report("header slot \(torn) of object \(Hex.encode(choice.header.objectID)) is damaged; serving sequence "
                + "\(choice.header.sequence) from the other slot as the state before a write torn by the unclean shutdown of "
                + "epoch \(evidence.lastUncleanEpoch ?? 0)")
        }
        return choice.header
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
    func write(fd: Int32, header: inout ObjectHeader, key: MasterKey, sync: Bool,
               afterData: Bool = true, currentIsDurable: Bool = false) throws {
        if afterData && !TestHooks.journalingDisabled { try Sys.fdatasync(fd) }
        var next = stamped(header)
        next.sequence = header.sequence &+ (afterData || currentIsDurable ? 1 : 2)
        let slot = HeaderCodec.seal(next, key: key)
        let offset = Int64(HeaderCodec.slotIndex(sequence: next.sequence) * ExtentGeometry.headerSlotBytes)
        try slot.withUnsafeBytes { buf throws in try Sys.pwrite(fd, buf, offset: offset) }
        // The caller's copy follows the disk as soon as the slot is written, even if the sync
        // fails: a later write computed from the older sequence could land below this one.
        header = next
        if sync { try Sys.fdatasync(fd) }
    }

    /// Writes an already sealed slot image into the slot its sequence selects (the final header of
    /// a journaled commit, or of its replay).
    static func writeSealed(fd: Int32, _ slot: [UInt8], sequence: UInt64) throws {
        let offset = Int64(HeaderCodec.slotIndex(sequence: sequence) * ExtentGeometry.headerSlotBytes)
        try slot.withUnsafeBytes { try Sys.pwrite(fd, $0, offset: offset) }
    }

    /// Writes the first header of a new object: slot of sequence 0, the other slot zero. `header`
    /// becomes what was written.
    func create(fd: Int32, header: inout ObjectHeader, key: MasterKey) throws {
        header = stamped(header)
        var region = HeaderCodec.seal(header, key: key)
        region += [UInt8](repeating: 0, count: ExtentGeometry.headerSlotBytes)
        if HeaderCodec.slotIndex(sequence: header.sequence) == 1 {
            region = Array(region[ExtentGeometry.headerSlotBytes...] + region[..<ExtentGeometry.headerSlotBytes])
        }
        try region.withUnsafeBytes { buf throws in try Sys.pwrite(fd, buf, offset: 0) }
    }

    /// fsck --repair: rewrites the damaged slot with the served version, as the next sequence, so
    /// both slots are intact again and the damage is not judged again at every read.
    func rewriteDamaged(fd: Int32, header: ObjectHeader, key: MasterKey) throws -> ObjectHeader {
        var h = header
        try write(fd: fd, header: &h, key: key, sync: true, afterData: true)
        return h
    }
}
