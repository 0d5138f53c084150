import Foundation
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat
import Locking

/// Key groups (FORMAT.md 5.3): extents of one aligned group sealed together share a nonce, so one
/// key derivation, and each member is sealed under the derived IV with its last byte XORed with
/// the member's place in the group.
@Suite struct ExtentKeyGroupTests {
    static let grouped = ExtentGeometry(extentSize: 4096, keyGroups: true)

    func nonce(of stored: [UInt8]) -> [UInt8] { Array(stored[0..<16]) }

    func seal(_ sealer: inout ExtentGroupSealer, _ index: UInt64, _ plaintext: [UInt8]) -> [UInt8] {
        var stored = [UInt8](repeating: 0, count: plaintext.count + ExtentGeometry.overheadBytes)
        plaintext.withUnsafeBytes { p in stored.withUnsafeMutableBytes { sealer.seal(index: index, plaintext: p, into: $0) } }
        return stored
    }

    func open(_ key: MasterKey, _ objectID: [UInt8], _ index: UInt64, _ stored: [UInt8], member: UInt8) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: stored.count - ExtentGeometry.overheadBytes)
        try stored.withUnsafeBytes { s in try out.withUnsafeMutableBytes {
            try ExtentCodec.open(key: key, objectID: objectID, index: index, member: member, stored: s, into: $0)
        }}
        return out
    }

    /// Extent 21 (member 5 of group 1) under KnownAnswerTests' key, nonce and object ID: computed
    /// with Python's `cryptography` AESGCM from the extent key and IV of `extentKeyAndIV`, the IV's
    /// last byte 0x94 XOR 5.
    @Test func knownAnswerForAGroupMember() throws {
        let key = try MasterKey(raw: KnownAnswerTests.testKey)
        let plaintext = (0..<100).map { UInt8(($0 * 7) & 0xff) }
        var stored = [UInt8](repeating: 0, count: 132)
        plaintext.withUnsafeBytes { p in stored.withUnsafeMutableBytes { s in
            ExtentCodec.seal(key: key, objectID: KnownAnswerTests.objectID, index: 21, member: Self.grouped.keyGroupMember(21),
                             plaintext: p, into: s, fixedNonce: KnownAnswerTests.nonce)
        }}
        #expect(Hex.encode(stored) == "000102030405060708090a0b0c0d0e0f165520404936e04266342f25cf0e36c83053e1c039fab446b5c6dc68"
            + "778af78f4ca08f3ef6f388211b9ed8a6e156bbd25331aacb9b3921f994cf531650f525df06e753904855c664591fb22591ca9061"
            + "756f336ebdfa0f7cbbfdf4cf221b57023eb3ce76e3dec86804ac9a55e7e4ae1b9d1496d6")
        #expect(try open(key, KnownAnswerTests.objectID, 21, stored, member: 5) == plaintext)
        // Member 0 is the ungrouped rule: the IV as derived.
        #expect(throws: CryptoError.authenticationFailed) { try open(key, KnownAnswerTests.objectID, 21, stored, member: 0) }
    }

    @Test func aGroupSharesOneNonceAndNoMemberIsSealedTwiceUnderIt() throws {
        let key = try MasterKey(raw: OpenSSL.random(count: 64))
        let objectID = OpenSSL.random(count: 16)
        var sealer = ExtentGroupSealer(key: key, objectID: objectID, geometry: Self.grouped)
        let plain = (0..<20).map { randomBytes(4096, seed: UInt64($0)) }
        let stored = (0..<20).map { seal(&sealer, UInt64($0), plain[$0]) }
        #expect(Set(stored[0..<16].map(nonce)).count == 1)
        #expect(Set(stored[16..<20].map(nonce)).count == 1)
        #expect(nonce(of: stored[15]) != nonce(of: stored[16]))
        // Member 3 of group 1 again: a fresh nonce, never a second seal under the first.
        let again = seal(&sealer, 19, plain[0])
        #expect(nonce(of: again) != nonce(of: stored[19]))
        for i in 0..<20 {
            #expect(try open(key, objectID, UInt64(i), stored[i], member: Self.grouped.keyGroupMember(UInt64(i))) == plain[i])
        }
        #expect(try open(key, objectID, 19, again, member: 3) == plain[0])
    }

    @Test func withoutKeyGroupsEverySealDrawsItsOwnNonce() throws {
        let key = try MasterKey(raw: OpenSSL.random(count: 64))
        var sealer = ExtentGroupSealer(key: key, objectID: OpenSSL.random(count: 16), geometry: ExtentGeometry(extentSize: 4096))
        let nonces = (0..<8).map { nonce(of: seal(&sealer, UInt64($0), [1, 2, 3])) }
        #expect(Set(nonces).count == 8)
    }

    /// The thread's context holds the last extent key: another master key with the same nonce, or
    /// a plain GCM use in between, must key it afresh, never reuse it.
    @Test func theHeldExtentKeyBelongsToOneMasterKeyAndNonce() throws {
        let a = try MasterKey(raw: OpenSSL.random(count: 64)), b = try MasterKey(raw: OpenSSL.random(count: 64))
        let objectID = OpenSSL.random(count: 16)
        let shared = OpenSSL.random(count: 16)
        let plaintext = randomBytes(4096, seed: 7)
        func sealed(_ key: MasterKey, _ index: UInt64) -> [UInt8] {
            var stored = [UInt8](repeating: 0, count: 4096 + 32)
            plaintext.withUnsafeBytes { p in stored.withUnsafeMutableBytes { s in
                ExtentCodec.seal(key: key, objectID: objectID, index: index, member: Self.grouped.keyGroupMember(index),
                                 plaintext: p, into: s, fixedNonce: shared)
            }}
            return stored
        }
        let underA = sealed(a, 1), underB = sealed(b, 1)
        #expect(underA != underB)
        #expect(throws: CryptoError.authenticationFailed) { try open(b, objectID, 1, underA, member: 1) }
        #expect(try open(a, objectID, 1, underA, member: 1) == plaintext)
        #expect(throws: CryptoError.authenticationFailed) { try open(a, objectID, 1, underB, member: 1) }
        // The same seal made with the key derived by hand and a plain GCM context agrees.
        var material = [UInt8](repeating: 0, count: 64)
        shared.withUnsafeBytes { n in material.withUnsafeMutableBytes { a.deriveExtentKey(nonce: n, into: $0) } }
        var iv = Array(material[32..<44])
        iv[11] ^= 1
        var ad = objectID + withUnsafeBytes(of: UInt64(1).littleEndian, Array.init)
        ad += withUnsafeBytes(of: UInt32(4096).littleEndian, Array.init)
        var reference = [UInt8](repeating: 0, count: 4096 + 16)
        try material.withUnsafeBytes { m in try iv.withUnsafeBytes { v in try ad.withUnsafeBytes { d in
            try plaintext.withUnsafeBytes { p in try reference.withUnsafeMutableBytes { r in
                try OpenSSL.gcmSeal(key: UnsafeRawBufferPointer(rebasing: m[0..<32]), iv: v, ad: d, plaintext: p,
                                    ciphertext: UnsafeMutableRawBufferPointer(rebasing: r[0..<4096]),
                                    tag: UnsafeMutableRawBufferPointer(rebasing: r[4096...]))
            }}
        }}}
        #expect(Array(underA[16...]) == reference)
        // After that plain use the held key is gone, and the grouped open keys again.
        #expect(try open(a, objectID, 1, underA, member: 1) == plaintext)
    }

    /// A master key's wipe leaves no thread's GCM context holding an extent key derived from it.
    @Test func aWipedKeysExtentKeyIsNotHeld() throws {
        var key: MasterKey? = try MasterKey(raw: OpenSSL.random(count: 64))
        let serial = key!.instanceSerial
        var sealer = ExtentGroupSealer(key: key!, objectID: OpenSSL.random(count: 16), geometry: Self.grouped)
        _ = seal(&sealer, 0, [1, 2, 3])
        #expect(KeyedContextCache.extentKeysHeld(for: serial) == 1)
        sealer = ExtentGroupSealer(key: try MasterKey(raw: OpenSSL.random(count: 64)), objectID: [UInt8](repeating: 0, count: 16),
                                   geometry: Self.grouped)
        key = nil
        #expect(KeyedContextCache.extentKeysHeld(for: serial) == 0)
    }

    /// The fan-out's pieces cover a run exactly once and, with key groups, never cut a group.
    @Test(arguments: [(UInt64(0), 64), (3, 64), (17, 100), (15, 33), (0, 1000)])
    func fanOutPiecesAreWholeGroups(first: UInt64, count: Int) {
        let ranges = Lock<[Range<Int>]>([])
        ExtentFanOut.forEach(count, extentSize: 4096, first: first, keyGroup: 16) { range in ranges.withLock { $0.append(range) } }
        let sorted = ranges.withLock { $0 }.sorted { $0.lowerBound < $1.lowerBound }
        #expect(sorted.first?.lowerBound == 0 && sorted.last?.upperBound == count)
        for (a, b) in zip(sorted, sorted.dropFirst()) { #expect(a.upperBound == b.lowerBound) }
        for range in sorted.dropFirst() { #expect((first + UInt64(range.lowerBound)) % 16 == 0) }
    }

    /// In a file with key groups, a write of many extents shares nonces, reads back, and two
    /// extents of one group swapped (same nonce, so same key) still fail: index in the AD, member
    /// in the IV.
    @Test func aGroupedFileReadsBackAndRefusesSwappedMembers() throws {
        let object = try ScratchObject(keyGroups: true)
        #expect(object.header.geometry.keyGroup == ExtentGeometry.groupedExtents)
        var model = randomBytes(40 * 4096 + 123, seed: 3)
        try object.write(model, at: 0)
        let patch = randomBytes(4096 + 40, seed: 4)
        try object.write(patch, at: 17 * 4096 - 20)
        model.replaceSubrange((17 * 4096 - 20)..<(17 * 4096 - 20 + patch.count), with: patch)
        #expect(try object.read(0, model.count + 1) == model)

        let geometry = object.header.geometry
        var bytes = object.backingBytes
        func stored(_ i: UInt64) -> Range<Int> { Int(geometry.backingOffset(i))..<(Int(geometry.backingOffset(i)) + geometry.stride) }
        #expect(bytes[stored(1)].prefix(16) == bytes[stored(2)].prefix(16), "neighbours written together share a nonce")
        let one = Array(bytes[stored(1)]), two = Array(bytes[stored(2)])
        bytes.replaceSubrange(stored(1), with: two)
        bytes.replaceSubrange(stored(2), with: one)
        object.backingBytes = bytes
        #expect(throws: (any Error).self) { try object.read(4096, 1) }
        #expect(throws: (any Error).self) { try object.read(2 * 4096, 1) }
        #expect(try object.read(0, 4096) == Array(model[0..<4096]))
        #expect(try object.read(3 * 4096, 4096) == Array(model[(3 * 4096)..<(4 * 4096)]))
    }
}
