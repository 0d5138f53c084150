/// Seals and opens object headers in their two slots.
///
/// Two slots let a header update be atomic even when a power loss tears the write: the new
/// version goes to the slot the current one does not occupy (slot = sequence mod 2), and a
/// reader takes the newest slot that verifies. The MAC needs the key; the plain checksum lets
/// a locked view (stat without the key) still tell a torn slot from a good one.
public enum HeaderCodec {
    public static func slotIndex(sequence: UInt64) -> Int { Int(sequence & 1) }

    /// The full 2048-byte slot image for `header` (whose `sequence` picks the slot).
    public static func seal(_ header: ObjectHeader, key: MasterKey) -> [UInt8] {
        precondition(header.fits() && key.identifier == header.macPolicy)
        var slot = header.encodeBody()
        let mac = key.withHeaderKey(objectID: header.objectID) { OpenSSL.hmacSHA256(key: $0, slot) }
        slot += mac
        slot += OpenSSL.sha256(slot).prefix(ObjectHeader.checksumBytes)
        slot += [UInt8](repeating: 0, count: ExtentGeometry.headerSlotBytes - slot.count)
        return slot
    }

    public enum SlotState: Equatable {
        case empty
        case damaged
        /// Intact, but in a format version (or with flags) this build does not know.
        case unsupported(version: UInt16, sequence: UInt64)
        /// Checksum and structure are fine but the MAC did not verify under the given key.
        case forged
        case valid(ObjectHeader)
    }

    /// Reads one slot. With `key == nil` only the checksum and structure are checked.
    /// `position` is the slot the bytes were read from (0 or 1), whose parity the sequence must
    /// have; nil for a slot image kept elsewhere (a journal's final header).
    public static func open(slot: ArraySlice<UInt8>, key: MasterKey?, position: Int? = nil) -> SlotState {
        guard slot.count == ExtentGeometry.headerSlotBytes else { return .damaged }
        if slot.allSatisfy({ $0 == 0 }) { return .empty }
        var r = ByteReader(slot)
        _ = r.raw(6)
        guard let length = r.u16().map(Int.init), length >= ObjectHeader.fixedBytes,
              length + ObjectHeader.macBytes + ObjectHeader.checksumBytes <= slot.count
        else { return .damaged }
        let start = slot.startIndex
        let body = slot[start..<(start + length)]
        let macEnd = start + length + ObjectHeader.macBytes
        let checksum = OpenSSL.sha256(Array(slot[start..<macEnd])).prefix(ObjectHeader.checksumBytes)
        let checksumEnd = macEnd + ObjectHeader.checksumBytes
        guard Array(checksum) == Array(slot[macEnd..<checksumEnd]), slot[checksumEnd...].allSatisfy({ $0 == 0 })
        else { return .damaged }
        let header: ObjectHeader
        switch ObjectHeader.decodeBody(body) {
        case .success(let decoded): header = decoded
        case .failure(.unsupported(let version, let sequence)): return .unsupported(version: version, sequence: sequence)
        case .failure(.malformed): return .damaged
        }
        if let position, slotIndex(sequence: header.sequence) != position { return .damaged }
        if let key {
            guard key.identifier == header.macPolicy else { return .forged }
            let mac = key.withHeaderKey(objectID: header.objectID) { OpenSSL.hmacSHA256(key: $0, Array(body)) }
            guard constantTimeEqual(mac, Array(slot[(start + length)..<macEnd])) else { return .forged }
        }
        return .valid(header)
    }

    /// Picks the current header from the 4096-byte header region.
    ///
    /// - Throws: `StoreError.integrity` when no slot verifies.
    public static func current(region: [UInt8], key: MasterKey?) throws -> ObjectHeader {
        guard region.count == ExtentGeometry.headerBytes else {
            throw StoreError.integrity("header region is \(region.count) bytes, not \(ExtentGeometry.headerBytes)")
        }
        let slotBytes = ExtentGeometry.headerSlotBytes
        let states = [open(slot: region[0..<slotBytes], key: key, position: 0),
                      open(slot: region[slotBytes..<(2 * slotBytes)], key: key, position: 1)]
        let valid = states.compactMap { state -> ObjectHeader? in
            if case .valid(let h) = state { return h }
            return nil
        }
        let newestValid = valid.max(by: { $0.sequence < $1.sequence })
        // A newer slot in a format this build does not know is refused outright: falling back to
        // the older slot would silently serve a rolled-back version of the object.
        for case .unsupported(let version, let sequence) in states where sequence > (newestValid?.sequence ?? 0) || newestValid == nil {
            throw StoreError.integrity("header written in format version \(version), newer than this encfsd reads")
        }
        guard let newestValid else {
            throw StoreError.integrity(states.contains(.forged) ? "header failed authentication" : "header is damaged")
        }
        return newestValid
    }

}

func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    var diff: UInt8 = 0
    for i in 0..<a.count { diff |= a[i] ^ b[i] }
    return diff == 0
}
