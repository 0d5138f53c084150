import EncCrypto
import EncKeys

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
        let state = parse(slot: slot, position: position)
        guard let key, case .valid(let header) = state else { return state }
        return verify(slot: slot, header: header, key: key) ? state : .forged
    }

    /// Checksum and structure of one slot, without the key.
    private static func parse(slot: ArraySlice<UInt8>, position: Int?) -> SlotState {
        guard slot.count == ExtentGeometry.headerSlotBytes else { return .damaged }
        if isAllZero(slot) { return .empty }
        var r = ByteReader(slot)
        _ = r.raw(6)
        guard let length = r.u16().map(Int.init), length >= ObjectHeader.smallestFixedBytes,
              length + ObjectHeader.macBytes + ObjectHeader.checksumBytes <= slot.count
        else { return .damaged }
        let start = slot.startIndex
        let body = slot[start..<(start + length)]
        let checksumEnd = start + length + ObjectHeader.macBytes + ObjectHeader.checksumBytes
        guard checksumMatches(slot: slot, length: length), isAllZero(slot[checksumEnd...]) else { return .damaged }
        let header: ObjectHeader
        switch ObjectHeader.decodeBody(body) {
        case .success(let decoded): header = decoded
        case .failure(.unsupported(let version, let sequence)): return .unsupported(version: version, sequence: sequence)
        case .failure(.malformed): return .damaged
        }
        if let position, slotIndex(sequence: header.sequence) != position { return .damaged }
        return .valid(header)
    }

    /// Whether the checksum of a slot whose body is `length` bytes matches, computed in place:
    /// both slots are checked on every header read.
    private static func checksumMatches(slot: ArraySlice<UInt8>, length: Int) -> Bool {
        slot.withUnsafeBytes { raw in
            withUnsafeTemporaryAllocation(byteCount: 32, alignment: 16) { digest in
                let macEnd = length + ObjectHeader.macBytes
                OpenSSL.sha256(UnsafeRawBufferPointer(rebasing: raw[0..<macEnd]), into: digest)
                return digest[0..<ObjectHeader.checksumBytes].elementsEqual(raw[macEnd..<(macEnd + ObjectHeader.checksumBytes)])
            }
        }
    }

    /// Whether the MAC of an intact slot verifies under `key`.
    private static func verify(slot: ArraySlice<UInt8>, header: ObjectHeader, key: MasterKey) -> Bool {
        guard key.identifier == header.macPolicy else { return false }
        return key.withHeaderKey(objectID: header.objectID) { headerKey in
            OpenSSL.withHMACSHA256(key: headerKey) { macMatches(slot: slot, hmac: $0) }
        }
    }

    /// Whether an intact slot's MAC is the one `hmac` (keyed with its object's header key) gives.
    private static func macMatches(slot: ArraySlice<UInt8>, hmac: borrowing OpenSSL.KeyedHMACSHA256) -> Bool {
        slot.withUnsafeBytes { raw in
            let length = Int(raw[6]) | Int(raw[7]) << 8
            return hmac.matches(UnsafeRawBufferPointer(rebasing: raw[0..<length]),
                                expected: UnsafeRawBufferPointer(rebasing: raw[length..<(length + ObjectHeader.macBytes)]))
        }
    }

    /// The current header of a region, and the slot (if any) that was damaged and passed over
    /// as a write torn by an unclean shutdown. The caller logs every such fallback.
    public struct Choice: Equatable, Sendable {
        public var header: ObjectHeader
        public var tornSlot: Int?
    }

    /// Picks the current header from the 4096-byte header region: the newest intact slot, which
    /// must verify under `key` when one is given.
    ///
    /// A damaged slot cannot say whether it was the newer version. Passing over it is therefore
    /// allowed only when `evidence` shows an unclean shutdown at or after the epoch the intact slot
    /// was written in: only then can the damage be a write that was in flight and torn. Otherwise a
    /// damaged byte would silently serve an older state, and the object is refused. A newest
    /// intact slot that fails its MAC is refused outright: a torn write cannot pass the checksum.
    ///
    /// With a key, both intact slots' MACs are computed (see below): the cost of one more HMAC per
    /// header read is what makes a rewritten sequence number visible.
    ///
    /// - Throws: `FormatError.integrity` when no slot may be served.
    public static func current(region: [UInt8], key: MasterKey?, evidence: TornWriteEvidence) throws -> Choice {
        // Only `key` is known here: an older slot sealed under another key (a rekey's previous
        // one) cannot be checked, rather than failing under this one.
        let (choice, verified) = try current(region: region, evidence: evidence) { $0 == key?.identifier ? key : nil }
        if key != nil && !verified { throw FormatError.integrity("header failed authentication") }
        return choice
    }

    /// `current`, asking `keyFor` for the key of the newest intact slot's `macPolicy`: one read
    /// and one parse of the region whether or not the key is loaded. `verified` says whether the
    /// choice was authenticated (false: the locked view, 4.8).
    public static func current(region: [UInt8], evidence: TornWriteEvidence,
                               keyFor: (KeyIdentifier) -> MasterKey?) throws -> (choice: Choice, verified: Bool) {
        guard region.count == ExtentGeometry.headerBytes else {
            throw FormatError.integrity("header region is \(region.count) bytes, not \(ExtentGeometry.headerBytes)")
        }
        let slotBytes = ExtentGeometry.headerSlotBytes
        let slots = [region[0..<slotBytes], region[slotBytes..<(2 * slotBytes)]]
        var states = [parse(slot: slots[0], position: 0), parse(slot: slots[1], position: 1)]
        var newest: (slot: ArraySlice<UInt8>, header: ObjectHeader)?
        for (slot, state) in zip(slots, states) {
            if case .valid(let h) = state, h.sequence > (newest?.header.sequence ?? 0) || newest == nil { newest = (slot, h) }
        }
        // A newer slot in a format this build does not know is refused outright: falling back to
        // the older slot would silently serve a rolled-back version of the object.
        for case .unsupported(let version, let sequence) in states where newest == nil || sequence > newest!.header.sequence {
            throw FormatError.integrity("header written in format version \(version), newer than this encfsd reads")
        }
        guard let newest else {
            throw FormatError.integrity(states.contains(.empty) && !states.contains(.damaged) ? "header is empty" : "header is damaged")
        }
        let key = keyFor(newest.header.macPolicy)
        // The other intact slot is authenticated too: without that, rewriting the newest slot's
        // sequence below the other's (checksum recomputed, which needs no key) would make the
        // older version current with no damage to be seen. A torn write never yields a good
        // checksum, so a slot that fails its MAC is forged: refused. One that cannot be checked
        // (its key absent, and not the rekey's previous key) is judged as damage. Both slots of
        // one object under one key share the derived header key and its keyed HMAC: one
        // derivation and one keying per lookup, not two.
        if let key {
            guard key.identifier == newest.header.macPolicy else { throw FormatError.integrity("header failed authentication") }
            var underOtherHeaderKey: [Int] = []
            try key.withHeaderKey(objectID: newest.header.objectID) { headerKey in
                try OpenSSL.withHMACSHA256(key: headerKey) { hmac in
                    guard macMatches(slot: newest.slot, hmac: hmac) else { throw FormatError.integrity("header failed authentication") }
                    for index in 0..<2 {
                        guard case .valid(let other) = states[index], other.sequence != newest.header.sequence else { continue }
                        guard other.macPolicy == newest.header.macPolicy && other.objectID == newest.header.objectID else {
                            // Checked below: its own keyed HMAC would re-key this thread's context under `hmac`.
                            underOtherHeaderKey.append(index)
                            continue
                        }
                        guard macMatches(slot: slots[index], hmac: hmac) else {
                            throw FormatError.integrity("header slot \(index) failed authentication")
                        }
                    }
                }
            }
            for index in underOtherHeaderKey {
                guard case .valid(let other) = states[index] else { continue }
                guard let otherKey = other.macPolicy == newest.header.macPolicy ? key : keyFor(other.macPolicy) else {
                    if other.macPolicy != newest.header.previousPolicy { states[index] = .damaged }
                    continue
                }
                guard verify(slot: slots[index], header: other, key: otherKey) else {
                    throw FormatError.integrity("header slot \(index) failed authentication")
                }
            }
        }
        guard let damaged = states.firstIndex(of: .damaged) else { return (Choice(header: newest.header, tornSlot: nil), key != nil) }
        guard evidence.tornWritePossible(sinceEpoch: newest.header.epoch) else {
            throw FormatError.integrity("header slot \(damaged) is damaged, and the store has shut down cleanly since the other slot "
                + "was written (epoch \(newest.header.epoch)): refusing to serve what may be an older version")
        }
        return (Choice(header: newest.header, tornSlot: damaged), key != nil)
    }

}

/// What a reader knows of unclean shutdowns (the store's `encfsd.epoch`, FORMAT.md 15.2): the only
/// evidence on which a damaged header slot may be passed over as a torn write.
public struct TornWriteEvidence: Equatable, Sendable {
    /// The highest epoch that ended without a clean unmount; nil when every epoch known ended cleanly.
    public var lastUncleanEpoch: UInt64?

    public init(lastUncleanEpoch: UInt64?) { self.lastUncleanEpoch = lastUncleanEpoch }

    /// No unclean shutdown known: every damaged slot is refused.
    public static let cleanHistory = TornWriteEvidence(lastUncleanEpoch: nil)

    /// Whether a write begun in `epoch` or later can have been torn by an unclean shutdown.
    public func tornWritePossible(sinceEpoch epoch: UInt64) -> Bool {
        lastUncleanEpoch.map { $0 >= epoch } ?? false
    }
}

/// Whether every byte is zero, a word at a time (slot images are checked on every header read).
package func isAllZero(_ bytes: ArraySlice<UInt8>) -> Bool {
    bytes.withUnsafeBytes { raw in
        var words = 0
        var acc: UInt64 = 0
        let count = raw.count / 8
        while words < count {
            acc |= raw.loadUnaligned(fromByteOffset: words * 8, as: UInt64.self)
            words += 1
        }
        var tail = count * 8
        var rest: UInt8 = 0
        while tail < raw.count {
            rest |= raw[tail]
            tail += 1
        }
        return acc == 0 && rest == 0
    }
}

package func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    var diff: UInt8 = 0
    for i in 0..<a.count { diff |= a[i] ^ b[i] }
    return diff == 0
}
