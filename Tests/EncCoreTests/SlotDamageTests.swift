import Foundation
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// No silent reversion: a damaged header slot is passed over for the older one only when an
/// unclean shutdown at or after the older slot's epoch can have torn it; otherwise the object is
/// refused. Checked for a byte flipped or zeroed in every part of the newest slot.
@Suite struct SlotDamageTests {
    static let key = try! MasterKey(raw: (1...64).map { UInt8($0) })

    /// A region whose slot 1 holds the newest version (sequence 3, epoch 7) and slot 0 the older
    /// one (sequence 2, epoch 5).
    func region() -> (region: [UInt8], older: ObjectHeader, newest: ObjectHeader) {
        var older = ObjectHeader(type: .regular, mode: 0o644, uid: 1, gid: 2, extentSize: 4096,
                                 objectID: Array(repeating: 7, count: 16), policy: Self.key.identifier)
        older.size = 10000
        older.sequence = 2
        older.epoch = 5
        var newest = older
        newest.size = 20000
        newest.sequence = 3
        newest.epoch = 7
        return (HeaderCodec.seal(older, key: Self.key) + HeaderCodec.seal(newest, key: Self.key), older, newest)
    }

    /// Offsets into slot 1 of each part: body (fixed part, sequence, size), MAC, checksum, padding.
    static let offsets: [(String, Int)] = [("magic", 0), ("sequence", 8), ("size", 48), ("epoch", 112), ("birth time", 136),
                                           ("MAC", 144), ("MAC end", 175), ("checksum", 176), ("padding", 184), ("last byte", 2047)]

    @Test(arguments: offsets, [true, false])
    func damagedNewestSlot(_ part: (String, Int), flip: Bool) throws {
        var (region, older, newest) = region()
        let at = 2048 + part.1
        if !flip && region[at] == 0 {
            // Zeroing a zero byte changes nothing: the newest version is still served.
            #expect(try HeaderCodec.current(region: region, key: Self.key, evidence: .cleanHistory).header == newest)
            return
        }
        region[at] = flip ? region[at] ^ 0x01 : 0
        for key in [Self.key, nil] as [MasterKey?] {
            // A clean history, or an unclean end before the older slot was written: damage, refused.
            for evidence in [TornWriteEvidence.cleanHistory, TornWriteEvidence(lastUncleanEpoch: 4)] {
                expectIntegrityError("\(part.0) \(flip ? "flipped" : "zeroed"), \(evidence)") {
                    try HeaderCodec.current(region: region, key: key, evidence: evidence)
                }
            }
            // An unclean end at or after it: possibly a torn write, so the older state, reported.
            for unclean in [5, 6, 9] as [UInt64] {
                let choice = try HeaderCodec.current(region: region, key: key, evidence: TornWriteEvidence(lastUncleanEpoch: unclean))
                #expect(choice == HeaderCodec.Choice(header: older, tornSlot: 1), "\(part.0), unclean epoch \(unclean)")
            }
        }
    }

    @Test func damagedOlderSlotIsJudgedTheSame() throws {
        var (region, _, newest) = region()
        region[100] ^= 0x40
        // The damaged slot cannot say it was the older one, so the same evidence is needed.
        expectIntegrityError { try HeaderCodec.current(region: region, key: Self.key, evidence: .cleanHistory) }
        let choice = try HeaderCodec.current(region: region, key: Self.key, evidence: TornWriteEvidence(lastUncleanEpoch: 7))
        #expect(choice == HeaderCodec.Choice(header: newest, tornSlot: 0))
    }

    @Test func forgedNewestSlotIsNeverPassedOver() throws {
        var (region, older, newest) = region()
        let otherKey = try MasterKey(raw: (1...64).map { UInt8($0 ^ 0x5a) })
        var forged = newest
        forged.macPolicy = Self.key.identifier
        forged.policy = Self.key.identifier
        // Intact checksum, MAC under another key: not a torn write whatever the evidence.
        var slot = forged.encodeBody()
        slot += otherKey.withHeaderKey(objectID: forged.objectID) { OpenSSL.hmacSHA256(key: $0, slot) }
        slot += OpenSSL.sha256(slot).prefix(8)
        slot += [UInt8](repeating: 0, count: 2048 - slot.count)
        region.replaceSubrange(2048..<4096, with: slot)
        expectIntegrityError {
            try HeaderCodec.current(region: region, key: Self.key, evidence: TornWriteEvidence(lastUncleanEpoch: .max))
        }
        _ = older
    }

    @Test func emptyOtherSlotIsNotDamage() throws {
        var header = ObjectHeader(type: .regular, mode: 0o600, uid: 0, gid: 0, extentSize: 4096,
                                  objectID: Array(repeating: 1, count: 16), policy: Self.key.identifier)
        header.epoch = 3
        let region = HeaderCodec.seal(header, key: Self.key) + [UInt8](repeating: 0, count: 2048)
        #expect(try HeaderCodec.current(region: region, key: Self.key, evidence: .cleanHistory) == .init(header: header, tornSlot: nil))
    }

    // MARK: the v2 body

    @Test func version2FieldsRoundTrip() throws {
        let previous = try MasterKey(raw: (1...64).map { UInt8($0 ^ 0x33) })
        var header = ObjectHeader(type: .regular, mode: 0o640, uid: 1, gid: 2, extentSize: 4096,
                                  objectID: OpenSSL.random(count: 16), policy: Self.key.identifier)
        header.size = 100 * 4096
        header.holes = HoleMap(ranges: [3..<9])
        header.legacyRanges = ExtentRangeSet(ranges: [0..<3, 20..<40])
        header.previousPolicy = previous.identifier
        header.epoch = 0x0102_0304_0506_0708
        header.birthTime = 1_790_000_000_123_456_789
        header.sequence = 4
        let slot = HeaderCodec.seal(header, key: Self.key)
        #expect(HeaderCodec.open(slot: slot[...], key: Self.key) == .valid(header))
        #expect(header.sealingPolicy(ofExtent: 2) == previous.identifier)
        #expect(header.sealingPolicy(ofExtent: 10) == Self.key.identifier)
        #expect(Array(slot[112..<120]) == [8, 7, 6, 5, 4, 3, 2, 1])
        #expect(Array(slot[120..<136]) == previous.identifier.bytes)
        #expect(slot[108] == 2 && slot[104] == 1)
    }

    @Test func version2StructuralRules() throws {
        let previous = try MasterKey(raw: (1...64).map { UInt8($0 ^ 0x33) })
        var base = ObjectHeader(type: .regular, mode: 0o640, uid: 1, gid: 2, extentSize: 4096,
                                objectID: OpenSSL.random(count: 16), policy: Self.key.identifier)
        base.size = 10 * 4096
        var overlapping = base
        overlapping.previousPolicy = previous.identifier
        overlapping.holes = HoleMap(ranges: [2..<4])
        overlapping.legacyRanges = ExtentRangeSet(ranges: [3..<5])
        var withoutKey = base
        withoutKey.legacyRanges = ExtentRangeSet(ranges: [0..<1])
        var samePolicy = base
        samePolicy.previousPolicy = Self.key.identifier
        var pastEnd = base
        pastEnd.previousPolicy = previous.identifier
        pastEnd.legacyRanges = ExtentRangeSet(ranges: [9..<11])
        for bad in [overlapping, withoutKey, samePolicy, pastEnd] {
            #expect(HeaderCodec.open(slot: HeaderCodec.seal(bad, key: Self.key)[...], key: Self.key) == .damaged)
        }
        var reserved = HeaderCodec.seal(base, key: Self.key)
        reserved[110] = 1
        #expect(HeaderCodec.open(slot: reserved[...], key: nil) == .damaged)
    }

    // MARK: the v3 body

    @Test func version3StructuralRules() throws {
        var file = ObjectHeader(type: .regular, mode: 0o640, uid: 1, gid: 2, extentSize: 4096,
                                objectID: OpenSSL.random(count: 16), policy: Self.key.identifier, version: 3)
        file.inodeFlags = [.appendOnly, .noDump]
        file.accessTime = 42
        file.xattrGeneration = 3
        file.changeTime = 1_700_000_000_000_000_001
        let body = file.encodeBody()
        #expect(body.count == 176)
        #expect(ObjectHeader.decodeBody(body[...]) == .success(file))
        // Reserved bytes, a flag no version stores, and a directory-only flag on a file.
        for (offset, byte) in [(148, 1), (151, 0x80), (146, 1), (144, 1), (145, 2)] {
            var bad = body
            bad[offset] |= UInt8(byte)
            #expect(ObjectHeader.decodeBody(bad[...]) == .failure(.malformed), "offset \(offset)")
        }
        var directory = ObjectHeader(type: .directory, mode: 0o755, uid: 1, gid: 2, extentSize: 0,
                                     objectID: OpenSSL.random(count: 16), policy: Self.key.identifier, version: 3)
        directory.inodeFlags = [.directorySync, .immutable]
        #expect(ObjectHeader.decodeBody(directory.encodeBody()[...]) == .success(directory))
    }

    @Test func version2HeadersMoveToVersion3InAVersion3Store() throws {
        var header = ObjectHeader(type: .regular, mode: 0o640, uid: 1, gid: 2, extentSize: 4096,
                                  objectID: OpenSSL.random(count: 16), policy: Self.key.identifier, version: 2)
        header.birthTime = 77
        let slot = HeaderCodec.seal(header, key: Self.key)
        #expect(slot[4] == 2 && slot[6] == 144)
        #expect(HeaderSlots(epoch: 4, evidence: .cleanHistory, storeVersion: 3).stamped(header).version == 3)
        #expect(HeaderSlots(epoch: 4, evidence: .cleanHistory, storeVersion: 2).stamped(header).version == 2)
    }

    @Test func version1HeadersStayVersion1() throws {
        var header = ObjectHeader(type: .regular, mode: 0o640, uid: 1, gid: 2, extentSize: 4096,
                                  objectID: OpenSSL.random(count: 16), policy: Self.key.identifier, version: 1)
        header.epoch = 9 // not stored in a v1 slot
        let slot = HeaderCodec.seal(header, key: Self.key)
        #expect(slot[4] == 1 && slot[6] == 112)
        var read = header
        read.epoch = 0
        #expect(HeaderCodec.open(slot: slot[...], key: Self.key) == .valid(read))
        // A writer in a v2 store moves it to v2 at its next write.
        let slots = HeaderSlots(epoch: 4, evidence: .cleanHistory, storeVersion: 2)
        #expect(slots.stamped(header).version == 2 && slots.stamped(header).epoch == 4)
        let v1Slots = HeaderSlots(epoch: 4, evidence: .cleanHistory, storeVersion: 1)
        #expect(v1Slots.stamped(header).version == 1)
    }
}

/// The epoch record: each mount opens an epoch durably before writing a header, and only a clean
/// unmount closes it; an epoch left open is the evidence of an unclean end.
@Suite struct EpochRecordTests {
    let base = FileManager.default.temporaryDirectory.path + "/encfsd-epoch-\(UUID().uuidString)"

    func store() throws -> FileDescriptor {
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        return try openPath(base, O_RDONLY | O_DIRECTORY)
    }

    @Test func openCloseAndUncleanEnds() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let fd = try store()
        try EpochRecord.create(storeFD: fd)
        var opened = try EpochRecord.open(storeFD: fd, storeVersion: 2)
        #expect(opened.epoch == 1 && opened.evidence == .cleanHistory)
        try EpochRecord.close(storeFD: fd, epoch: 1, evidence: opened.evidence)
        opened = try EpochRecord.open(storeFD: fd, storeVersion: 2)
        #expect(opened.epoch == 2 && opened.evidence == .cleanHistory)
        // Epoch 2 is never closed: a crash.
        opened = try EpochRecord.open(storeFD: fd, storeVersion: 2)
        #expect(opened.epoch == 3 && opened.evidence == TornWriteEvidence(lastUncleanEpoch: 2))
        try EpochRecord.close(storeFD: fd, epoch: 3, evidence: opened.evidence)
        // The unclean end stays on record after clean epochs.
        opened = try EpochRecord.open(storeFD: fd, storeVersion: 2)
        #expect(opened.epoch == 4 && opened.evidence == TornWriteEvidence(lastUncleanEpoch: 2))
    }

    @Test func damagedRecordAddsNoUncleanEnd() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let fd = try store()
        try EpochRecord.create(storeFD: fd)
        let opened = try EpochRecord.open(storeFD: fd, storeVersion: 2)
        try EpochRecord.close(storeFD: fd, epoch: opened.epoch, evidence: opened.evidence)
        // The clean end (slot 1) damaged: the open version left in slot 0 must not read as a crash.
        let file = open(base + "/" + EpochRecord.fileName, O_RDWR)
        var byte: UInt8 = 0
        _ = pread(file, &byte, 1, 40)
        byte ^= 0x80
        _ = pwrite(file, &byte, 1, 40)
        close(file)
        let reading = try EpochRecord.read(storeFD: fd)
        #expect(reading.damaged && reading.newest?.state == .open)
        #expect(reading.evidence(storeVersion: 2) == .cleanHistory)
    }

    @Test func missingRecord() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let fd = try store()
        let reading = try EpochRecord.read(storeFD: fd)
        #expect(reading.missing)
        // A v1 store from before the record: its v1 slots (epoch 0) keep the v1 rule.
        #expect(reading.evidence(storeVersion: 1) == TornWriteEvidence(lastUncleanEpoch: 0))
        // A v2 store always has one: without it nothing is passed over.
        #expect(reading.evidence(storeVersion: 2) == .cleanHistory)
    }
}
