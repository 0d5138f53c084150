import Foundation
import Synchronization
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat

/// The per-extent fast path: HKDF-Expand as one keyed HMAC-SHA512 on per-thread contexts, the
/// AES-256-GCM context reused with only key and IV, and nonces drawn ahead. Each must give
/// exactly what the plain `EVP_KDF` path and a fresh context give (the known answers in
/// `KnownAnswerTests` pin both to an independent implementation).
@Suite struct ExtentCodecFastPathTests {
    static let rawKey = (1...64).map { UInt8($0) }

    /// The reference: HKDF-SHA512 expand through OpenSSL's `EVP_KDF` provider.
    func referenceExpand(raw: [UInt8], info: [UInt8], count: Int) -> [UInt8] {
        var prk = [UInt8](repeating: 0, count: 64)
        raw.withUnsafeBytes { ikm in prk.withUnsafeMutableBytes { OpenSSL.hkdfExtractSHA512(ikm: ikm, into: $0) } }
        var out = [UInt8](repeating: 0, count: count)
        prk.withUnsafeBytes { p in info.withUnsafeBytes { i in out.withUnsafeMutableBytes {
            OpenSSL.hkdfExpandSHA512(prk: p, info: i, into: $0)
        }}}
        return out
    }

    func extentKey(_ key: MasterKey, nonce: [UInt8], count: Int = 44) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        nonce.withUnsafeBytes { n in out.withUnsafeMutableBytes { key.deriveExtentKey(nonce: n, into: $0) } }
        return out
    }

    @Test func extentKeysMatchEVPKDFForRandomNonces() throws {
        let raw = OpenSSL.random(count: 64)
        let key = try MasterKey(raw: raw)
        for _ in 0..<32 {
            let nonce = OpenSSL.random(count: 16)
            let expected = referenceExpand(raw: raw, info: HKDFInfo.make(.extentKey, nonce), count: 44)
            #expect(extentKey(key, nonce: nonce) == expected)
            #expect(OpenSSL.hkdfSHA512(ikm: raw, info: HKDFInfo.make(.extentKey, nonce), outputCount: 44) == expected)
            // A whole block: the 44 bytes are its prefix, the rest is HKDF's L = 64 output.
            #expect(extentKey(key, nonce: nonce, count: 64)
                == referenceExpand(raw: raw, info: HKDFInfo.make(.extentKey, nonce), count: 64))
        }
    }

    @Test func headerKeysMatchEVPKDFForRandomObjects() throws {
        let raw = OpenSSL.random(count: 32)
        let key = try MasterKey(raw: raw)
        for _ in 0..<8 {
            let objectID = OpenSSL.random(count: 16)
            let derived = key.withHeaderKey(objectID: objectID) { Array($0) }
            #expect(derived == referenceExpand(raw: raw, info: HKDFInfo.make(.headerKey, objectID), count: 32))
        }
    }

    @Test func everyOutputLengthUpToOneBlock() throws {
        let raw = OpenSSL.random(count: 64)
        var prk = [UInt8](repeating: 0, count: 64)
        raw.withUnsafeBytes { ikm in prk.withUnsafeMutableBytes { OpenSSL.hkdfExtractSHA512(ikm: ikm, into: $0) } }
        let serial = UInt64.max - 7 // no MasterKey gets this far
        defer { OpenSSL.forgetKeyedContexts(serial: serial) }
        for count in [1, 16, 32, 44, 63, 64] {
            for infoCount in [1, 9, 25, 111, 112, 200] {
                let info = OpenSSL.random(count: infoCount)
                var fast = [UInt8](repeating: 0, count: count)
                prk.withUnsafeBytes { p in info.withUnsafeBytes { i in fast.withUnsafeMutableBytes {
                    OpenSSL.hkdfExpandSHA512(keyedAs: serial, prk: p, info: i, into: $0)
                }}}
                #expect(fast == referenceExpand(raw: raw, info: info, count: count), "L = \(count), info \(infoCount) bytes")
            }
        }
    }

    /// More keys than a thread keeps keyed contexts for: evicted ones are keyed again, never mixed up.
    @Test func moreKeysThanTheCacheHolds() throws {
        let raws = (0..<(KeyedContextCache.capacity + 3)).map { _ in OpenSSL.random(count: 64) }
        let keys = try raws.map { try MasterKey(raw: $0) }
        for round in 0..<3 {
            for (index, key) in keys.enumerated().reversed() where (index + round) % 2 == 0 || round == 2 {
                let nonce = OpenSSL.random(count: 16)
                #expect(extentKey(key, nonce: nonce)
                    == referenceExpand(raw: raws[index], info: HKDFInfo.make(.extentKey, nonce), count: 44))
            }
        }
    }

    /// Two instances of one raw key have their own serials and agree on every derived key.
    @Test func twoInstancesOfOneKeyAgree() throws {
        let a = try MasterKey(raw: Self.rawKey), b = try MasterKey(raw: Self.rawKey)
        #expect(a.instanceSerial != b.instanceSerial)
        let plaintext = OpenSSL.random(count: 1000)
        let objectID = OpenSSL.random(count: 16)
        var stored = [UInt8](repeating: 0, count: plaintext.count + ExtentGeometry.overheadBytes)
        plaintext.withUnsafeBytes { p in stored.withUnsafeMutableBytes { s in
            ExtentCodec.seal(key: a, objectID: objectID, index: 3, plaintext: p, into: s)
        }}
        var opened = [UInt8](repeating: 0, count: plaintext.count)
        try stored.withUnsafeBytes { s in try opened.withUnsafeMutableBytes { o in
            try ExtentCodec.open(key: b, objectID: objectID, index: 3, stored: s, into: o)
        }}
        #expect(opened == plaintext)
    }

    /// A thread that exits frees the keyed HMAC state it holds; the key's other threads keep theirs.
    @Test func threadExitFreesItsKeyedState() throws {
        let nonce = OpenSSL.random(count: 16)
        let key = try MasterKey(raw: OpenSSL.random(count: 64))
        let serial = key.instanceSerial
        _ = extentKey(key, nonce: nonce)
        #expect(KeyedContextCache.contexts(for: serial) == 1)
        let exit = idleThread(after: { _ = extentKey(key, nonce: nonce) })
        #expect(KeyedContextCache.contexts(for: serial) == 2)
        exit.signal()
        // The thread's destructors run after its block returns.
        #expect(waitUntil { KeyedContextCache.contexts(for: serial) == 1 })
        withExtendedLifetime(key) {}
    }

    /// Starts a thread that runs `work`, then idles (alive, not running) until the returned
    /// semaphore is signalled. Returns once `work` is done.
    func idleThread(after work: @escaping @Sendable () -> Void) -> DispatchSemaphore {
        let done = DispatchSemaphore(value: 0), exit = DispatchSemaphore(value: 0)
        Thread {
            work()
            done.signal()
            exit.wait()
        }.start()
        done.wait()
        return exit
    }

    final class KeyBox: Sendable {
        let key: Mutex<MasterKey?>
        init(_ key: MasterKey) { self.key = Mutex(key) }
    }

    /// The keyed HMAC state is as secret as the key: when the key is wiped (its last reference
    /// goes) the state goes from every thread at once, including one that is alive but idle.
    @Test func wipeFreesIdleThreadsStateImmediately() throws {
        let nonce = OpenSSL.random(count: 16)
        let box = KeyBox(try MasterKey(raw: OpenSSL.random(count: 64)))
        let serial = box.key.withLock { $0!.instanceSerial }
        // Its own reference only for the derivation: then it idles holding none.
        let exit = idleThread(after: { _ = extentKey(box.key.withLock { $0! }, nonce: nonce) })
        #expect(KeyedContextCache.contexts(for: serial) == 1)
        let wiped = DispatchSemaphore(value: 0)
        do {
            let last = box.key.withLock { key -> MasterKey in
                defer { key = nil }
                return key!
            }
            last.setWipeObserver { wiped.signal() }
            // A key still in use stays usable: a derivation on this thread keys its own state.
            _ = extentKey(last, nonce: nonce)
            #expect(KeyedContextCache.contexts(for: serial) == 2)
        } // `last` was the only reference left: the key is wiped here
        #expect(wiped.wait(timeout: .now() + 5) == .success)
        // Already gone from the idle thread, which has not run since.
        #expect(KeyedContextCache.contexts(for: serial) == 0, "key wiped, its HMAC state must be gone")
        exit.signal()
    }

    /// The keyed SIV templates are as secret as the name and xattr keys: a wiped key's templates
    /// go from every thread at once, including an idle one, and a new key (even of the same raw
    /// bytes, even at the old one's address) keys its own.
    @Test func wipeFreesIdleThreadsSIVTemplatesImmediately() throws {
        let raw = OpenSSL.random(count: 64)
        let directoryID = OpenSSL.random(count: 16)
        let box = KeyBox(try MasterKey(raw: raw))
        let serial = box.key.withLock { $0!.instanceSerial }
        // Names this key instance has not met, so each reaches OpenSSL rather than the key's memo
        // of names (`NameSealMemo`): one sealed here, one sealed by another instance and opened here.
        let foreign = try NameCodec.encrypt(Array("peer".utf8), directoryID: directoryID, key: try MasterKey(raw: raw)).ciphertext
        let exit = idleThread(after: {
            let key = box.key.withLock { $0! }
            _ = try! NameCodec.encrypt(Array("idle".utf8), directoryID: directoryID, key: key)
            _ = try! NameCodec.decrypt(ciphertext: foreign, directoryID: directoryID, key: key)
        })
        for encrypt in [true, false] {
            #expect(KeyedContextCache.contexts(for: serial, use: .siv(subkey: MasterKey.SIVKey.names.rawValue, encrypt: encrypt)) == 1)
        }
        let wiped = DispatchSemaphore(value: 0)
        let sealedBefore: [UInt8]
        do {
            let last = box.key.withLock { key -> MasterKey in
                defer { key = nil }
                return key!
            }
            last.setWipeObserver { wiped.signal() }
            sealedBefore = try NameCodec.encrypt(Array("main".utf8), directoryID: directoryID, key: last).ciphertext
            #expect(KeyedContextCache.contexts(for: serial, use: .siv(subkey: MasterKey.SIVKey.names.rawValue, encrypt: true)) == 2)
        }
        #expect(wiped.wait(timeout: .now() + 5) == .success)
        #expect(KeyedContextCache.contexts(for: serial) == 0, "key wiped, its SIV templates must be gone")
        // Another key, and the same raw key again: each seals with its own templates.
        let other = try MasterKey(raw: OpenSSL.random(count: 64))
        let again = try MasterKey(raw: raw)
        #expect(again.instanceSerial != serial)
        #expect(try NameCodec.encrypt(Array("main".utf8), directoryID: directoryID, key: again).ciphertext == sealedBefore)
        #expect(try NameCodec.encrypt(Array("main".utf8), directoryID: directoryID, key: other).ciphertext != sealedBefore)
        exit.signal()
    }

    /// More keys than a thread keeps SIV templates for: evicted ones are keyed again, never mixed up.
    @Test func moreNameKeysThanTheCacheHolds() throws {
        let directoryID = OpenSSL.random(count: 16)
        let keys = try (0..<(KeyedContextCache.capacity + 3)).map { _ in try MasterKey(raw: OpenSSL.random(count: 64)) }
        for round in 0..<3 {
            for (index, key) in keys.enumerated().reversed() where (index + round) % 2 == 0 || round == 2 {
                let name = Array("name \(index)".utf8)
                let padded = name + [UInt8](repeating: 0, count: 32 - name.count)
                let fresh = try key.withNameKey { try OpenSSL.sivSeal(key: $0, ad: directoryID, plaintext: padded) }
                #expect(try NameCodec.encrypt(name, directoryID: directoryID, key: key).ciphertext == fresh)
                #expect(try NameCodec.decrypt(ciphertext: fresh, directoryID: directoryID, key: key) == name)
            }
        }
    }

    /// The GCM context keeps its cipher across seals, opens, failed opens and other ciphers on
    /// the same thread, and each use still gives the known answer.
    @Test func reusedGCMContextGivesKnownAnswersAfterMixedUse() throws {
        let key = try MasterKey(raw: Self.rawKey)
        let nonce = (0..<16).map { UInt8($0) }, objectID = (0x10..<0x20).map { UInt8($0) }
        let plaintext = (0..<100).map { UInt8(($0 * 7) & 0xff) }
        let known = "000102030405060708090a0b0c0d0e0f496e2702dbc17375107e08ee15b226afded2b5bf2ff57f1515636bb5ec6e"
            + "59e0613642212741ab49062836fc740aba4efd21fcb51cc6ea8491a2f73b30a346665a07531c0a248f0502a644965bc1ac"
            + "6d4d1f4bbf1b833ffe9baf0e67997017acab7995c08dd0cc532a22ac72c85289bcb352f75b"
        func seal() -> [UInt8] {
            var stored = [UInt8](repeating: 0, count: 132)
            plaintext.withUnsafeBytes { p in stored.withUnsafeMutableBytes { s in
                ExtentCodec.seal(key: key, objectID: objectID, index: 5, plaintext: p, into: s, fixedNonce: nonce)
            }}
            return stored
        }
        func open(_ stored: [UInt8], index: UInt64 = 5) throws(CryptoError) -> [UInt8] {
            var opened = [UInt8](repeating: 0, count: stored.count - 32)
            var failure: CryptoError?
            stored.withUnsafeBytes { s in opened.withUnsafeMutableBytes { o in
                do throws(CryptoError) {
                    try ExtentCodec.open(key: key, objectID: objectID, index: index, stored: s, into: o)
                } catch { failure = error }
            }}
            if let failure { throw failure }
            return opened
        }
        for _ in 0..<3 {
            let stored = seal()
            #expect(Hex.encode(stored) == known)
            var tampered = stored
            tampered[40] ^= 1
            #expect(throws: CryptoError.authenticationFailed) { try open(tampered) }
            #expect(throws: CryptoError.authenticationFailed) { try open(stored, index: 6) }
            _ = try key.withNameKey { try OpenSSL.sivSeal(key: $0, ad: objectID, plaintext: Array("name".utf8)) }
            #expect(try open(stored) == plaintext)
            // An empty extent (AD only) and a large one share the context too.
            var empty = [UInt8](repeating: 0, count: 32)
            [UInt8]().withUnsafeBytes { p in empty.withUnsafeMutableBytes { s in
                ExtentCodec.seal(key: key, objectID: objectID, index: 0, plaintext: p, into: s)
            }}
            #expect(try open(empty, index: 0) == [])
        }
    }

    @Test func noncesNeverRepeat() {
        var seen = Set<[UInt8]>()
        var nonce = [UInt8](repeating: 0, count: 16)
        // Several batches, so refills are crossed.
        for _ in 0..<(ThreadContexts.nonceBatchBytes / 16 * 5 + 7) {
            nonce.withUnsafeMutableBytes { OpenSSL.fillNonce($0) }
            #expect(nonce != [UInt8](repeating: 0, count: 16))
            #expect(seen.insert(nonce).inserted)
        }
        // Odd sizes, too.
        var odd = [UInt8](repeating: 0, count: 23)
        odd.withUnsafeMutableBytes { OpenSSL.fillNonce($0) }
        #expect(odd != [UInt8](repeating: 0, count: 23))
    }

    /// Polls `condition` for up to five seconds (a thread's exit runs its destructors after its
    /// block has returned).
    func waitUntil(_ condition: () -> Bool) -> Bool {
        for _ in 0..<500 {
            if condition() { return true }
            usleep(10_000)
        }
        return condition()
    }
}
