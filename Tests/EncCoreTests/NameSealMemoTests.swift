import Testing
@testable import EncKeys
@testable import EncFormat
@testable import EncCrypto

/// The name memo (`NameSealMemo`) answers only what OpenSSL answered before, and stays bounded.
@Suite struct NameSealMemoTests {
    static let directoryID = [UInt8](repeating: 0x42, count: 16)

    @Test func remembersSealsAndAuthenticatedOpensOnly() throws {
        let key = try MasterKey(raw: (0..<32).map { UInt8($0) })
        let other = try MasterKey(raw: (0..<32).map { UInt8($0) })
        let sealed = try NameCodec.encrypt(Array("hello.txt".utf8), directoryID: Self.directoryID, key: other).ciphertext
        #expect(key.rememberedNames == (0, 0))
        // Opened by OpenSSL under this instance first, then from the memo: the same name.
        for _ in 0..<2 {
            #expect(try NameCodec.decrypt(ciphertext: sealed, directoryID: Self.directoryID, key: key) == Array("hello.txt".utf8))
        }
        #expect(key.rememberedNames == (1, 1))
        #expect(try NameCodec.encrypt(Array("hello.txt".utf8), directoryID: Self.directoryID, key: key).ciphertext == sealed)
        #expect(key.rememberedNames == (1, 1))
        // A damaged ciphertext fails every time and is never remembered, nor is one under another directory.
        var damaged = sealed
        damaged[20] ^= 1
        for _ in 0..<2 {
            #expect(throws: CryptoError.authenticationFailed) { try key.sivOpen(.names, ad: Self.directoryID, sealed: damaged) }
            #expect(throws: CryptoError.authenticationFailed) {
                try key.sivOpen(.names, ad: [UInt8](repeating: 0x43, count: 16), sealed: sealed)
            }
        }
        #expect(key.rememberedNames == (1, 1))
        // Long names (over two padding granules) are sealed every time, never remembered.
        _ = try NameCodec.encrypt([UInt8](repeating: 0x61, count: 65), directoryID: Self.directoryID, key: key)
        #expect(key.rememberedNames == (1, 1))
        // Xattr names and values are not remembered.
        _ = try key.sivSeal(.xattrs, ad: Self.directoryID, plaintext: Array("user.a".utf8))
        #expect(key.rememberedNames == (1, 1))
    }

    @Test func twoGenerationsBoundTheMemoAndKeepWhatIsInUse() {
        let memo = NameSealMemo(capacity: 2)
        func name(_ i: Int) -> [UInt8] { [UInt8(i)] }
        memo.remember(ad: [], plaintext: name(0), sealed: name(100))
        for i in 1..<6 {
            memo.remember(ad: [], plaintext: name(i), sealed: name(100 + i))
            // Name 0 is used all along: each use keeps it in the young generation.
            #expect(memo.sealed(ad: [], plaintext: name(0)) == name(100))
            #expect(memo.count.seals <= 4)
        }
        #expect(memo.sealed(ad: [], plaintext: name(5)) == name(105))
        #expect(memo.opened(ad: [], sealed: name(105)) == name(5))
        #expect(memo.sealed(ad: [], plaintext: name(1)) == nil)
        memo.forgetAll()
        #expect(memo.count == (0, 0))
        memo.remember(ad: [], plaintext: name(7), sealed: name(107))
        #expect(memo.sealed(ad: [], plaintext: name(7)) == name(107))
    }
}
