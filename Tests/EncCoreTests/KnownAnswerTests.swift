import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat

/// Known answers for every derivation and cipher use. The expected values were computed with an
/// independent implementation (Python's `cryptography`: HKDF, AESGCM, AESSIV, HMAC), not by
/// encfsd, so they pin the format documented in FORMAT.md.
@Suite struct KnownAnswerTests {
    static let testKey = (1...64).map { UInt8($0) }
    static let nonce = (0..<16).map { UInt8($0) }
    static let objectID = (0x10..<0x20).map { UInt8($0) }
    static let directoryID = (0x20..<0x30).map { UInt8($0) }

    func hex(_ b: some Sequence<UInt8>) -> String { Hex.encode(b) }

    @Test func fscryptIdentifierOfTestKey() throws {
        #expect(try MasterKey(raw: Self.testKey).identifier.hex == "69b2f6edeee720cce0577937eb8a6751")
    }

    @Test func fscryptIdentifierOfSecondKey() throws {
        let raw = Array(String(repeating: "a", count: 32).utf8) + Array(String(repeating: "1", count: 32).utf8)
        #expect(try MasterKey(raw: raw).identifier.hex == "912ae510a458723a839a9fad701538ac")
    }

    @Test func extentKeyAndIV() throws {
        let key = try MasterKey(raw: Self.testKey)
        var out = [UInt8](repeating: 0, count: 44)
        Self.nonce.withUnsafeBytes { n in out.withUnsafeMutableBytes { key.deriveExtentKey(nonce: n, into: $0) } }
        #expect(hex(out) == "2be47e1ba5191265c1cd28a41d06c4ed3ab38fa71e6712dd5ffe0ed6150c51103de893ff7b66e3199d529194")
    }

    @Test func headerKey() throws {
        let key = try MasterKey(raw: Self.testKey)
        let derived = key.withHeaderKey(objectID: Self.objectID) { Array($0) }
        #expect(hex(derived) == "582d3cde8f2fa1704061757fa5ccb74b1f0425a018dd8b5bb0f0488b03cab28e")
        let mac = key.withHeaderKey(objectID: Self.objectID) { OpenSSL.hmacSHA256(key: $0, Array("encfsd header body".utf8)) }
        #expect(hex(mac) == "e381b14cd50281f5e774e316ffbc5e4e911d4c6a227408a9e12d52df75e8ff79")
    }

    @Test func nameKey() throws {
        let key = try MasterKey(raw: Self.testKey)
        #expect(hex(key.withNameKey { Array($0) }) == "4eb5dd8bcc51d48a866e3c66fbd3a15c5daa5812772277cb45c285a7729eb4bc"
            + "6c9945476585d5f36b82cb475aeb841ea19967783f997bedb76a3b104366a2eb")
    }

    @Test func extentSealWithFixedNonce() throws {
        let key = try MasterKey(raw: Self.testKey)
        let plaintext = (0..<100).map { UInt8(($0 * 7) & 0xff) }
        var stored = [UInt8](repeating: 0, count: 100 + 32)
        plaintext.withUnsafeBytes { p in stored.withUnsafeMutableBytes { s in
            ExtentCodec.seal(key: key, objectID: Self.objectID, index: 5, plaintext: p, into: s, fixedNonce: Self.nonce)
        }}
        #expect(hex(stored) == "000102030405060708090a0b0c0d0e0f496e2702dbc17375107e08ee15b226afded2b5bf2ff57f1515636bb5ec6e"
            + "59e0613642212741ab49062836fc740aba4efd21fcb51cc6ea8491a2f73b30a346665a07531c0a248f0502a644965bc1ac"
            + "6d4d1f4bbf1b833ffe9baf0e67997017acab7995c08dd0cc532a22ac72c85289bcb352f75b")
        var opened = [UInt8](repeating: 0, count: 100)
        try stored.withUnsafeBytes { s in try opened.withUnsafeMutableBytes { o in
            try ExtentCodec.open(key: key, objectID: Self.objectID, index: 5, stored: s, into: o)
        }}
        #expect(opened == plaintext)
    }

    @Test func nameEncryption() throws {
        let key = try MasterKey(raw: Self.testKey)
        let name = try NameCodec.encrypt(Array("hello.txt".utf8), directoryID: Self.directoryID, key: key)
        #expect(hex(name.ciphertext) == "882be442e28d71031c087788bd370e6977a8019b8fdb8b3d4c7bea7207fe3464a93bf93ba5ba4812b97e5ae7981af342")
        #expect(String(decoding: name.backingName, as: UTF8.self) == "iCvkQuKNcQMcCHeIvTcOaXeoAZuP24s9THvqcgf-NGSpO_k7pbpIErl-WueYGvNC")
        #expect(try NameCodec.decrypt(ciphertext: name.ciphertext, directoryID: Self.directoryID, key: key) == Array("hello.txt".utf8))
    }

    @Test func xattrKeysNameAndValue() throws {
        let key = try MasterKey(raw: Self.testKey)
        let keys = key.withXattrKeys { siv, mac in Array(siv) + Array(mac) }
        #expect(hex(keys) == "07bdddfe4a62dcbace2483bbd5751bcfa0975b6ac61f22867b1d265d7919849bb6d5b37e9cd1c1baf1c8800e8d9194"
            + "3235ada0d3d20284afeeb2260223bc2b3a5eeefdcae77dce46d746059529be5e28cf2731eda383a23cbbe07a1cc110920b")
        let name = Array("user.comment".utf8)
        let backing = XattrCodec.backingName(name, objectID: Self.objectID, key: key)
        #expect(backing == "user.encfsd.3nFvMY3xIqY_Wb8ScscKPB99XvpqPw8U")
        let sealed = try XattrCodec.seal(name: name, value: Array("hi".utf8), objectID: Self.objectID, backingName: backing, key: key)
        #expect(hex(sealed) == "2a89819343e38630d76981b94ff09b1afa637e29129a6285768c8d9c6bd2b4")
        let (openedName, value) = try XattrCodec.open(sealed, objectID: Self.objectID, backingName: backing, key: key)
        #expect(openedName == name && value == Array("hi".utf8))
        expectIntegrityError {
            try XattrCodec.open(sealed, objectID: Self.directoryID, backingName: backing, key: key)
        }
    }

    /// Names and xattr values sealed through the thread's keyed SIV templates equal what a context
    /// keyed afresh gives (and the known answer above), every time, for every padded length and
    /// interleaved with the other direction, the other SIV key and failed opens.
    @Test func sivThroughTemplateEqualsFreshContext() throws {
        let key = try MasterKey(raw: Self.testKey)
        let nameKey = key.withNameKey { Array($0) }
        let xattrSIVKey = key.withXattrKeys { siv, _ in Array(siv) }
        for round in 0..<3 {
            for count in [1, 9, 31, 32, 33, 100, 255] {
                let name = (0..<count).map { UInt8(0x41 + ($0 + round) % 26) }
                let viaTemplate = try NameCodec.encrypt(name, directoryID: Self.directoryID, key: key)
                let padded = name + [UInt8](repeating: 0, count: (count + 31) / 32 * 32 - count)
                let fresh = try nameKey.withUnsafeBytes { try OpenSSL.sivSeal(key: $0, ad: Self.directoryID, plaintext: padded) }
                #expect(viaTemplate.ciphertext == fresh, "\(count) bytes, round \(round)")
                #expect(try NameCodec.decrypt(ciphertext: fresh, directoryID: Self.directoryID, key: key) == name)
                var tampered = fresh
                tampered[tampered.count - 1] ^= 1
                #expect(throws: CryptoError.authenticationFailed) { try key.sivOpen(.names, ad: Self.directoryID, sealed: tampered) }
                let xattr = try key.sivSeal(.xattrs, ad: Self.objectID, plaintext: name)
                #expect(xattr == (try xattrSIVKey.withUnsafeBytes { try OpenSSL.sivSeal(key: $0, ad: Self.objectID, plaintext: name) }))
                #expect(xattr != (try key.sivSeal(.names, ad: Self.objectID, plaintext: name)), "the two SIV keys share no template")
            }
            #expect(try NameCodec.encrypt(Array("hello.txt".utf8), directoryID: Self.directoryID, key: key).ciphertext
                == Array(Hex.decode("882be442e28d71031c087788bd370e6977a8019b8fdb8b3d4c7bea7207fe3464a93bf93ba5ba4812b97e5ae7981af342")!))
        }
    }

    /// An HMAC keyed once and reused for several messages gives each message's own HMAC, and a
    /// wrong tag (or message) does not match.
    @Test func hmacKeyedOnceForSeveralMessages() throws {
        let hmacKey = (0..<32).map { UInt8($0 * 3) }
        let messages = [Array("encfsd header body".utf8), [UInt8](repeating: 7, count: 200), [0x00]]
        let expected = messages.map { m in hmacKey.withUnsafeBytes { OpenSSL.hmacSHA256(key: $0, m) } }
        hmacKey.withUnsafeBytes { k in
            OpenSSL.withHMACSHA256(key: k) { hmac in
                for _ in 0..<2 {
                    for (message, tag) in zip(messages, expected) {
                        var wrong = tag
                        wrong[31] ^= 0x80
                        let results = message.withUnsafeBytes { m in
                            (tag.withUnsafeBytes { hmac.matches(m, expected: $0) }, wrong.withUnsafeBytes { hmac.matches(m, expected: $0) })
                        }
                        #expect(results.0 && !results.1)
                    }
                }
            }
        }
    }

    /// FORMAT.md 12's header: sequence 1, size 100, one binding, in `version`.
    static func vectorHeader(version: UInt16, key: MasterKey) -> ObjectHeader {
        var header = ObjectHeader(type: .regular, mode: 0o644, uid: 1000, gid: 1000, extentSize: 4096,
                                  objectID: Self.objectID, policy: key.identifier, version: version)
        header.sequence = 1
        header.size = 100
        header.bindings = [Binding(digest: Array(Hex.decode("de1037de7c69251a026eddde24928e4b")!))]
        return header
    }

    @Test func headerSlot() throws {
        let key = try MasterKey(raw: Self.testKey)
        let slot = HeaderCodec.seal(Self.vectorHeader(version: 1, key: key), key: key)
        #expect(hex(slot[0..<130]) == "454653310100820001000000000000000000000001000000a4010000e8030000e8030000001000000000000000000000"
            + "6400000000000000101112131415161718191a1b1c1d1e1f69b2f6edeee720cce0577937eb8a675169b2f6edeee720cce0577937eb8a6751"
            + "0000010000000000de1037de7c69251a026eddde24928e4b0000")
        #expect(hex(slot[130..<162]) == "73cd220e4c4598a1d40ad24b19b3143edd173cc375b2d7d6de40e619ad281206")
        #expect(hex(slot[162..<170]) == "d6375095b6c4b199")
        #expect(slot[170...].allSatisfy { $0 == 0 })
    }

    /// FORMAT.md 16.1: the same header in version 3, with every field that only v3 stores set.
    @Test func version3HeaderSlot() throws {
        let key = try MasterKey(raw: Self.testKey)
        var header = Self.vectorHeader(version: 3, key: key)
        header.epoch = 5
        header.birthTime = 1_600_000_000_000_000_000
        header.inodeFlags = [.immutable, .noAccessTime]
        header.accessTime = 1_700_000_000_123_456_789
        header.xattrGeneration = 7
        let slot = HeaderCodec.seal(header, key: key)
        #expect(hex(slot[0..<194]) == Self.version3Body)
        #expect(hex(slot[194..<226]) == "a71c1d725b5662634bdbe956e23b924c8a3434bffdcd72b1c6c99dded0c28ac9")
        #expect(HeaderCodec.open(slot: slot[...], key: key) == .valid(header))
    }

    static let version3Body = "454653310300c20001000000000000000000000001000000a4010000e8030000e8030000001000000000000000000000"
        + "6400000000000000101112131415161718191a1b1c1d1e1f69b2f6edeee720cce0577937eb8a675169b2f6edeee720cce0577937eb8a6751"
        + "00000100000000000500000000000000000000000000000000000000000000000000a0d885573416"
        + "900000000000000015cd853dfe9c971707000000000000000000000000000000de1037de7c69251a026eddde24928e4b0000"

    @Test func hkdfExpandOnlyMatchesFullHKDF() throws {
        let info = HKDFInfo.make(.extentKey, Self.nonce)
        let full = OpenSSL.hkdfSHA512(ikm: Self.testKey, info: info, outputCount: 44)
        var prk = [UInt8](repeating: 0, count: 64)
        Self.testKey.withUnsafeBytes { ikm in prk.withUnsafeMutableBytes { OpenSSL.hkdfExtractSHA512(ikm: ikm, into: $0) } }
        var expanded = [UInt8](repeating: 0, count: 44)
        prk.withUnsafeBytes { p in info.withUnsafeBytes { i in expanded.withUnsafeMutableBytes {
            OpenSSL.hkdfExpandSHA512(prk: p, info: i, into: $0)
        }}}
        #expect(full == expanded)
    }

    @Test func scryptRFC7914Vector() throws {
        // RFC 7914 section 12, second vector.
        let out = try OpenSSL.scrypt(password: Array("password".utf8), salt: Array("NaCl".utf8), n: 1024, r: 8, p: 16, outputCount: 64)
        #expect(hex(out) == "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"
            + "2eaf30d92e22a3886ff109279d9830dac727afb94a83ee6d8360cbdfa2cc0640")
    }
}
