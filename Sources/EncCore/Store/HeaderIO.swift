/// Reads and writes the two header slots of a backing object.
enum HeaderIO {
    static func read(fd: Int32, key: MasterKey?) throws -> ObjectHeader {
        var region = [UInt8](repeating: 0, count: ExtentGeometry.headerBytes)
        let n = try region.withUnsafeMutableBytes { buf throws in try Sys.pread(fd, buf, offset: 0) }
        guard n == region.count else { throw StoreError.integrity("backing object is shorter than its header (\(n) bytes)") }
        return try HeaderCodec.current(region: region, key: key)
    }

    /// Writes `header` with the next sequence number into the slot the current version does not
    /// occupy, then updates `header.sequence`. A torn write leaves the previous slot intact.
    ///
    /// The file is synced first: the slot about to be overwritten holds the version before the
    /// current one, so the current one must be durable before it becomes the only good slot
    /// (two unsynced header writes in a row could otherwise lose both to a power loss).
    static func write(fd: Int32, header: inout ObjectHeader, key: MasterKey, sync: Bool) throws {
        if !ExtentFile.journalingDisabled { try Sys.fdatasync(fd) }
        var next = header
        next.sequence = header.sequence &+ 1
        let slot = HeaderCodec.seal(next, key: key)
        let offset = Int64(HeaderCodec.slotIndex(sequence: next.sequence) * ExtentGeometry.headerSlotBytes)
        try slot.withUnsafeBytes { buf throws in try Sys.pwrite(fd, buf, offset: offset) }
        if sync { try Sys.fdatasync(fd) }
        header = next
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
