import Foundation
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat

@Suite struct FormatTests {
    let key = try! MasterKey(raw: (1...64).map { UInt8($0) })

    @Test func namesDifferAcrossDirectoriesAndRoundTrip() throws {
        let a = try NameCodec.encrypt(Array("same".utf8), directoryID: [UInt8](repeating: 1, count: 16), key: key)
        let b = try NameCodec.encrypt(Array("same".utf8), directoryID: [UInt8](repeating: 2, count: 16), key: key)
        #expect(a.backingName != b.backingName)
        #expect(try NameCodec.decrypt(ciphertext: a.ciphertext, directoryID: [UInt8](repeating: 1, count: 16), key: key) == Array("same".utf8))
        expectIntegrityError {
            try NameCodec.decrypt(ciphertext: a.ciphertext, directoryID: [UInt8](repeating: 2, count: 16), key: key)
        }
    }

    @Test(arguments: [1, 31, 32, 33, 160, 161, 200, 255])
    func nameLengths(length: Int) throws {
        let dir = OpenSSL.random(count: 16)
        let name = [UInt8](repeating: UInt8(ascii: "n"), count: length)
        let encrypted = try NameCodec.encrypt(name, directoryID: dir, key: key)
        #expect(encrypted.backingName.count <= 255)
        #expect(encrypted.isLong == (length > 160))
        #expect(NameCodec.isEntryName(encrypted.backingName))
        #expect(try NameCodec.decrypt(ciphertext: encrypted.ciphertext, directoryID: dir, key: key) == name)
    }

    @Test func invalidNamesRejected() {
        for bad in [[], [0x2e], [0x2e, 0x2e], [0x61, 0x2f], [0x61, 0x00]] as [[UInt8]] {
            #expect(throws: FormatError.invalidName) { try NameCodec.validate(bad) }
        }
        #expect(throws: FormatError.nameTooLong) { try NameCodec.validate([UInt8](repeating: 0x61, count: 256)) }
    }

    /// Integers are little-endian and read from the slice's own start; reserved and magic bytes are
    /// checked in place, and a failed check leaves the position alone.
    @Test func byteReaderOnASlice() {
        let bytes: [UInt8] = [0xff, 0xff, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0, 0, 0x45]
        var r = ByteReader(bytes[2...])
        let integers = (r.u16(), r.u16(), r.u32())
        #expect(integers.0 == 0x0201 && integers.1 == 0x0403 && integers.2 == 0x0807_0605)
        let checks = [r.zeros(3), r.zeros(2), r.expect([0x46]), r.expect([0x45])]
        #expect(checks == [false, true, false, true])
        let pastEnd = (r.u8(), r.zeros(1), r.expect([0]))
        #expect(pastEnd.0 == nil && !pastEnd.1 && !pastEnd.2)
        var wide = ByteReader((Array(repeating: 0xee, count: 3) + (1...8).map { UInt8($0) })[3...])
        let u64 = wide.u64()
        #expect(u64 == 0x0807_0605_0403_0201)
    }

    @Test func base64URLRoundTripAndCanonical() {
        for n in 0..<70 {
            let bytes = randomBytes(n, seed: UInt64(n))
            #expect(Base64URL.decode(Base64URL.encode(bytes)) == bytes)
        }
        #expect(Base64URL.decode(Array("AB".utf8)) == nil) // non-zero trailing bits: not canonical
        #expect(Base64URL.decode(Array("A=".utf8)) == nil)
        // A slice (not starting at index 0) and a non-contiguous collection decode alike.
        let encoded = Base64URL.encode(Array(0..<40))
        #expect(Base64URL.decode(([0x7e] + encoded).dropFirst()) == Array(0..<40))
        #expect(Base64URL.decode(encoded.lazy.map { $0 }) == Array(0..<40))
        #expect(Base64URL.decode(Array("AAA*".utf8)) == nil)
    }

    /// The decoder against the plainest one (six bits at a time, trailing bits checked), on
    /// random strings over the alphabet and a few characters outside it, of every length class.
    @Test func base64URLDecodesAsTheBitwiseReference() {
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)
        func reference(_ text: [UInt8]) -> [UInt8]? {
            guard text.count % 4 != 1 else { return nil }
            var out: [UInt8] = [], acc: UInt32 = 0, bits: UInt32 = 0
            for c in text {
                guard let v = alphabet.firstIndex(of: c) else { return nil }
                acc = acc << 6 | UInt32(v)
                bits += 6
                if bits >= 8 { bits -= 8; out.append(UInt8(truncatingIfNeeded: acc >> bits)) }
            }
            return acc & ((1 << bits) - 1) == 0 ? out : nil
        }
        var rng = SystemRandomNumberGenerator()
        let pool = alphabet + Array("=+/.*\0".utf8) + [0x00, 0xff, 0x80]
        for _ in 0..<5000 {
            let count = Int.random(in: 0..<70, using: &rng)
            let outside = Bool.random(using: &rng) && Bool.random(using: &rng)
            let text = (0..<count).map { _ in (outside ? pool : alphabet).randomElement(using: &rng)! }
            #expect(Base64URL.decode(text) == reference(text), "\(String(decoding: text, as: UTF8.self))")
        }
    }

    @Test func holeMapMergesAndSplits() {
        var map = HoleMap()
        map.insert(0..<10)
        map.insert(10..<20)
        #expect(map.ranges == [0..<20])
        map.remove(5)
        #expect(map.ranges == [0..<5, 6..<20])
        #expect(!map.contains(5) && map.contains(4) && map.contains(6))
        map.clip(to: 8)
        #expect(map.ranges == [0..<5, 6..<8])
    }

    /// The range set against a plain set of indices, through random inserts and removals that
    /// take every path (appends at the end, extensions of the last range, merges, splits, misses):
    /// same members, and the ranges stay sorted, disjoint and non-adjacent.
    @Test func rangeSetMatchesASetOfIndices() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            var map = ExtentRangeSet()
            var model = Set<UInt64>()
            for _ in 0..<40 {
                let lower = UInt64.random(in: 0..<64, using: &rng)
                let range = lower..<(lower + UInt64.random(in: 0..<9, using: &rng))
                if Bool.random(using: &rng) {
                    map.insert(range)
                    model.formUnion(range)
                } else {
                    map.remove(range)
                    model.subtract(range)
                }
                #expect(Set(map.ranges.flatMap { Array($0) }) == model)
                #expect(!map.ranges.contains { $0.isEmpty })
                #expect(zip(map.ranges, map.ranges.dropFirst()).allSatisfy { $0.upperBound < $1.lowerBound })
                #expect((0..<80).allSatisfy { map.contains($0) == model.contains($0) })
            }
            map.removeAll()
            #expect(map.isEmpty)
        }
        var wide = ExtentRangeSet(ranges: [10..<20, 30..<40])
        wide.remove(15..<UInt64.max)
        #expect(wide.ranges == [10..<15])
        wide.insert(0..<(UInt64.max - 1))
        #expect(wide.ranges == [0..<(UInt64.max - 1)])
    }

    /// The changed extents of a stream: its written run and a buffered tail, cut back by a
    /// shrink whose range reaches UInt64.max.
    @Test func dirtyExtentsKeepEachIndexInOneForm() {
        var changes = DirtyExtents()
        changes.setPlain(7, [UInt8](repeating: 1, count: 16))
        changes.setWritten(0..<8)
        #expect(changes.plain.isEmpty && changes.written.ranges == [0..<8])
        changes.setPlain(8, [UInt8](repeating: 2, count: 16))
        changes.setSealed(3, [9])
        #expect(changes.written.ranges == [0..<3, 4..<8] && changes.sealed.keys.sorted() == [3])
        changes.clip(to: 4)
        #expect(changes.written.ranges == [0..<3] && changes.plain.isEmpty && changes.sealed.keys.sorted() == [3])
        var legacy = ExtentRangeSet(ranges: [0..<10])
        changes.removeChanged(from: &legacy)
        #expect(legacy.ranges == [4..<10])
    }

    @Test func geometry() {
        let g = ExtentGeometry(extentSize: 4096)
        #expect(g.extentCount(size: 0) == 0)
        #expect(g.extentCount(size: 4097) == 2)
        #expect(g.plaintextLength(1, size: 4097) == 1)
        #expect(g.backingLength(size: 4097) == 4096 + 4128 + 33)
        #expect(!ExtentGeometry.isValid(extentSize: 3000))
    }

    /// `largestSize(backingLength:)` is the exact inverse of `backingLength`: the size it gives
    /// fits, one byte more does not, at every remainder around an extent boundary.
    @Test(arguments: [4096, 16384, 1 << 20])
    func largestSizeInvertsBackingLength(extentSize: Int) {
        let g = ExtentGeometry(extentSize: extentSize)
        let ext4 = Int64(1 << 44) - 4096
        var limits: [Int64] = [0, 4095, 4096, 4096 + 32, 4096 + 33, 4096 + 34, ext4]
        for base in [Int64(4096), Int64(4096) + 5 * Int64(g.stride), ext4 - Int64(g.stride)] {
            for delta in [-1, 0, 1, 31, 32, 33, Int64(extentSize), Int64(extentSize) + 31, Int64(extentSize) + 32] { limits.append(base + delta) }
        }
        for limit in limits where limit >= 0 {
            let size = g.largestSize(backingLength: limit)
            #expect(size == 0 || g.backingLength(size: size) <= limit, "limit \(limit)")
            #expect(g.backingLength(size: size + 1) > limit, "limit \(limit)")
        }
    }

    @Test func headerRoundTripAndStructuralRejection() throws {
        var header = ObjectHeader(type: .regular, mode: 0o640, uid: 1, gid: 2, extentSize: 4096,
                                  objectID: OpenSSL.random(count: 16), policy: key.identifier)
        header.size = 40000
        header.holes = HoleMap(ranges: [3..<9])
        header.bindings = [Binding(digest: OpenSSL.random(count: 16), longName: OpenSSL.random(count: 16 + 192))]
        let slot = HeaderCodec.seal(header, key: key)
        #expect(HeaderCodec.open(slot: slot[...], key: key) == .valid(header))
        #expect(HeaderCodec.open(slot: slot[...], key: nil) == .valid(header))
        var torn = slot
        torn[100] ^= 0xff
        #expect(HeaderCodec.open(slot: torn[...], key: nil) == .damaged)
        let otherKey = try MasterKey(raw: [UInt8](repeating: 9, count: 32))
        #expect(HeaderCodec.open(slot: slot[...], key: otherKey) == .forged)
    }

    /// Seals `body` as a slot the way HeaderCodec does, with a valid checksum but no valid MAC.
    func slotWithChecksum(_ body: [UInt8]) -> [UInt8] {
        var slot = body + [UInt8](repeating: 0, count: 32)
        slot += OpenSSL.sha256(slot).prefix(8)
        return slot + [UInt8](repeating: 0, count: 2048 - slot.count)
    }

    @Test func newerFormatSlotIsRefusedNotRolledBack() throws {
        var header = ObjectHeader(type: .regular, mode: 0o644, uid: 0, gid: 0, extentSize: 4096,
                                  objectID: OpenSSL.random(count: 16), policy: key.identifier)
        let older = HeaderCodec.seal(header, key: key) // sequence 0, slot 0
        header.sequence = 1
        var newer = header.encodeBody()
        newer[4] = UInt8(ObjectHeader.newestVersion + 1) // a format version this build does not know
        let region = older + slotWithChecksum(newer)
        // Refused even where a damaged slot could be passed over as a torn write.
        let anyUnclean = TornWriteEvidence(lastUncleanEpoch: .max)
        expectIntegrityError { try HeaderCodec.current(region: region, key: key, evidence: anyUnclean) }
        expectIntegrityError { try HeaderCodec.current(region: region, key: nil, evidence: anyUnclean) }
    }

    @Test func structurallyImpossibleHeadersAreDamaged() throws {
        let base = ObjectHeader(type: .regular, mode: 0o644, uid: 0, gid: 0, extentSize: 4096,
                                objectID: OpenSSL.random(count: 16), policy: key.identifier)
        var cases: [ObjectHeader] = []
        var holePastEnd = base
        holePastEnd.size = 4096
        holePastEnd.holes = HoleMap(ranges: [0..<2])
        cases.append(holePastEnd)
        var rdevOnFile = base
        rdevOnFile.rdev = 5
        cases.append(rdevOnFile)
        var tooBig = base
        tooBig.size = ObjectHeader.maximumSize + 1
        cases.append(tooBig)
        for bad in cases {
            #expect(HeaderCodec.open(slot: HeaderCodec.seal(bad, key: key)[...], key: key) == .damaged)
        }
        var reserved = HeaderCodec.seal(base, key: key)
        reserved[21] = 1 // reserved byte after the type
        #expect(HeaderCodec.open(slot: reserved[...], key: nil) == .damaged)
    }

    @Test func storeConfigRefusesUnknownFeaturesAndVersions() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cfg-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var config = StoreConfig(extentSize: 16384, rootPolicy: key.identifier)
        _ = FileManager.default.createFile(atPath: dir + "/encfsd.conf", contents: config.encoded())
        #expect(try StoreConfig.load(storePath: dir) == config)
        config.features = ["time-travel"]
        _ = FileManager.default.createFile(atPath: dir + "/encfsd.conf", contents: config.encoded())
        #expect(throws: StoreConfig.Problem.self) { try StoreConfig.load(storePath: dir) }
        config.features = []
        for version in [99, 0, -1] {
            config.version = version
            _ = FileManager.default.createFile(atPath: dir + "/encfsd.conf", contents: config.encoded())
            #expect(throws: StoreConfig.Problem.self) { try StoreConfig.load(storePath: dir) }
        }
    }

    @Test func controlArgumentRejectsMalformedInput() {
        let good = ControlProtocol.AddKeyArgument(source: .raw, raw: [UInt8](repeating: 1, count: 32)).encoded()
        #expect(ControlProtocol.AddKeyArgument.decode(good)?.raw.count == 32)
        #expect(ControlProtocol.AddKeyArgument.decode(Array(good.dropLast())) == nil)
        var oversized = good
        oversized[12] = 65
        #expect(ControlProtocol.AddKeyArgument.decode(oversized) == nil)
        var reserved = good
        reserved[127] = 1
        #expect(ControlProtocol.AddKeyArgument.decode(reserved) == nil)
        var version = good
        version[0] = 2
        #expect(ControlProtocol.AddKeyArgument.decode(version) == nil)
        #expect(ControlProtocol.addKey == 0xC080_4501)
    }

    @Test func statusArgumentCarriesRequestCounts() throws {
        var status = ControlProtocol.StatusArgument()
        status.pid = 42
        status.journalBytes = 7
        status.requests = 0x0102_0304_0506_0708
        status.forgetRequests = 9
        let encoded = status.encoded()
        #expect(encoded.count == ControlProtocol.StatusArgument.byteCount)
        // Little-endian at the documented offsets: requests at 104, forget_requests at 112.
        #expect(Array(encoded[104..<112]) == [8, 7, 6, 5, 4, 3, 2, 1])
        #expect(Array(encoded[112..<120]) == [9, 0, 0, 0, 0, 0, 0, 0])
        #expect(ControlProtocol.StatusArgument.decode(encoded) == status)
        var reserved = encoded
        reserved[120] = 1
        #expect(ControlProtocol.StatusArgument.decode(reserved) == nil)
    }
}
