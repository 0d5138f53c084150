/// Reads and writes the two header slots of a backing object.
enum HeaderIO {
    static func read(fd: Int32, key: MasterKey?) throws -> ObjectHeader {
        var region = [UInt8](repeating: 0, count: ExtentGeometry.headerBytes)
        let n = try region.withUnsafeMutableBytes { buf throws in try Sys.pread(fd, buf, offset: 0) }
        guard n == region.count else { throw StoreError.integrity("backing object is shorter than its header (\(n) bytes)") }
        return try HeaderCodec.current(region: region, key: key)
    }

    /// Writes a new version of `header`, then updates `header.sequence`. A torn write leaves the
    /// other slot intact, and the invariant every writer keeps is that the slot not holding the
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
    static func write(fd: Int32, header: inout ObjectHeader, key: MasterKey, sync: Bool,
                      afterData: Bool = true, currentIsDurable: Bool = false) throws {
        if afterData && !ExtentFile.journalingDisabled { try Sys.fdatasync(fd) }
        var next = header
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
    static func writeSlot(fd: Int32, _ slot: [UInt8], sequence: UInt64) throws {
        let offset = Int64(HeaderCodec.slotIndex(sequence: sequence) * ExtentGeometry.headerSlotBytes)
        try slot.withUnsafeBytes { try Sys.pwrite(fd, $0, offset: offset) }
    }

    /// Writes the first header of a new object: slot of sequence 0, the other slot zero.
    static func create(fd: Int32, header: ObjectHeader, key: MasterKey) throws {
        var region = HeaderCodec.seal(header, key: key)
        region += [UInt8](repeating: 0, count: ExtentGeometry.headerSlotBytes)
        if HeaderCodec.slotIndex(sequence: header.sequence) == 1 {
            region = Array(region[ExtentGeometry.headerSlotBytes...] + region[..<ExtentGeometry.headerSlotBytes])
        }
        try region.withUnsafeBytes { buf throws in try Sys.pwrite(fd, buf, offset: 0) }
    }
}
