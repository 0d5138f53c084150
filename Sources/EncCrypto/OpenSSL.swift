import COpenSSL

/// Failures of the cryptographic primitives.
public enum CryptoError: Error, Equatable, Sendable {
    /// The tag did not verify: the ciphertext, its associated data or the key is wrong.
    case authenticationFailed
    /// OpenSSL refused an operation that should not fail (bad parameters or out of memory).
    case library(String)
}

/// Every OpenSSL call encfsd makes. Nothing outside `EncCrypto/` imports COpenSSL.
///
/// Hot-path entry points (`fillNonce`, `hkdfExpandSHA512(keyedAs:...)`, `gcmSeal`, `gcmOpen`)
/// write into caller buffers and use the calling thread's reused contexts, so sealing an extent
/// allocates nothing on the Swift side and, once the thread has keyed its HMAC for the master
/// key, creates no OpenSSL object.
public enum OpenSSL {
    public static let gcmTagCount = 16
    public static let gcmIVCount = 12

    // MARK: Randomness

    /// Fills `buffer` from OpenSSL's CSPRNG (`RAND_bytes`).
    public static func fillRandom(_ buffer: UnsafeMutableRawBufferPointer) {
        guard buffer.count > 0 else { return }
        let rc = RAND_bytes(buffer.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(buffer.count))
        // A CSPRNG that cannot produce output leaves no safe way to continue: nonces would repeat.
        precondition(rc == 1, "RAND_bytes failed; refusing to continue without randomness")
    }

    /// Fills `buffer` (an extent nonce, at most 1 KiB) with CSPRNG bytes no other call returned,
    /// from a per-thread batch drawn ahead with `RAND_bytes`: for values stored in the clear.
    /// Never use it for secret keys.
    package static func fillNonce(_ buffer: UnsafeMutableRawBufferPointer) {
        ThreadContexts.withCurrent { $0.takeNonce(buffer) }
    }

    public static func random(count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { fillRandom($0) }
        return bytes
    }

    /// Overwrites memory in a way the compiler may not elide (`OPENSSL_cleanse`).
    public static func cleanse(_ buffer: UnsafeMutableRawBufferPointer) {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        OPENSSL_cleanse(base, buffer.count)
    }

    // MARK: Hashes and MACs

    /// SHA-256 of the concatenation of `parts` (`EVP_Digest*`).
    public static func sha256(_ parts: [UInt8]...) -> [UInt8] {
        digest(Algorithms.shared.sha256, parts, count: 32)
    }

    private static func digest(_ md: OpaquePointer, _ parts: [[UInt8]], count: Int) -> [UInt8] {
        let ctx = ThreadContexts.current.digest
        var out = [UInt8](repeating: 0, count: count)
        var ok = EVP_DigestInit_ex2(ctx, md, nil) == 1
        for part in parts where ok {
            ok = part.withUnsafeBytes { EVP_DigestUpdate(ctx, $0.baseAddress, $0.count) == 1 }
        }
        var outCount: UInt32 = 0
        ok = ok && out.withUnsafeMutableBufferPointer { EVP_DigestFinal_ex(ctx, $0.baseAddress, &outCount) == 1 }
        precondition(ok && Int(outCount) == count, "EVP_Digest failed")
        return out
    }

    /// HMAC-SHA256(key, concatenation of parts) (`EVP_MAC` "HMAC").
    public static func hmacSHA256(key: UnsafeRawBufferPointer, _ parts: [UInt8]...) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        let ok = ThreadContexts.current.keyed.withHMACSHA256 { ctx -> Bool in
            var ok = EVP_MAC_init(ctx, key.baseAddress?.assumingMemoryBound(to: UInt8.self), key.count, nil) == 1
            for part in parts where ok {
                ok = part.withUnsafeBytes { EVP_MAC_update(ctx, $0.baseAddress?.assumingMemoryBound(to: UInt8.self), $0.count) == 1 }
            }
            var written = 0
            return ok && out.withUnsafeMutableBufferPointer { EVP_MAC_final(ctx, $0.baseAddress, &written, 32) == 1 && written == 32 }
        }
        precondition(ok, "HMAC-SHA256 failed")
        return out
    }

    /// SHA-256 of `bytes` into `digest` (32 bytes), allocating nothing: the header checksum is
    /// computed for both slots on every lookup.
    public static func sha256(_ bytes: UnsafeRawBufferPointer, into digest: UnsafeMutableRawBufferPointer) {
        precondition(digest.count == 32)
        let ctx = ThreadContexts.withCurrent { $0.digest }
        var outCount: UInt32 = 0
        let ok = EVP_DigestInit_ex2(ctx, Algorithms.shared.sha256, nil) == 1
            && EVP_DigestUpdate(ctx, bytes.baseAddress, bytes.count) == 1
            && EVP_DigestFinal_ex(ctx, u8m(digest), &outCount) == 1
        precondition(ok && outCount == 32, "EVP_Digest failed")
    }

    /// Runs `body` with an HMAC-SHA256 keyed with `key` once, for checking several messages under
    /// one key: each further check starts from the key pads computed here instead of hashing them
    /// again (both header slots of an object share one header key). `body` must not keep it.
    public static func withHMACSHA256<R>(key: UnsafeRawBufferPointer, _ body: (borrowing KeyedHMACSHA256) throws -> R) rethrows -> R {
        // The context is the thread's, under its lock for `body`'s length: a master key's wipe
        // scrubs it there (`KeyedContextCache`).
        try ThreadContexts.current.keyed.withHMACSHA256 { ctx in
            let keyed = EVP_MAC_init(ctx, u8(key), key.count, nil) == 1
            precondition(keyed, "HMAC-SHA256 init failed")
            return try body(KeyedHMACSHA256(ctx: ctx))
        }
    }

    /// An HMAC-SHA256 context of the calling thread keyed by `withHMACSHA256`, valid only inside it.
    /// Not copyable, so `body` cannot keep a copy past its return.
    public struct KeyedHMACSHA256: ~Copyable {
        fileprivate let ctx: OpaquePointer

        /// Whether HMAC(key, `message`) equals `expected` (32 bytes), compared in constant time.
        public func matches(_ message: UnsafeRawBufferPointer, expected: UnsafeRawBufferPointer) -> Bool {
            precondition(expected.count == 32)
            return withUnsafeTemporaryAllocation(byteCount: 32, alignment: 16) { mac -> Bool in
                var written = 0
                // A NULL key re-initialises from the pads computed when the context was keyed.
                let ok = EVP_MAC_init(ctx, nil, 0, nil) == 1
                    && EVP_MAC_update(ctx, u8(message), message.count) == 1
                    && EVP_MAC_final(ctx, u8m(mac), &written, 32) == 1 && written == 32
                precondition(ok, "HMAC-SHA256 failed")
                return CRYPTO_memcmp(mac.baseAddress, expected.baseAddress, 32) == 0
            }
        }
    }

    /// An HMAC-SHA256 computed over data fed in pieces, so a journal of any length is verified in
    /// bounded memory. Owns its own context (it may outlive many calls on the thread's context).
    public final class HMACStream {
        private let ctx: OpaquePointer

        public init(key: UnsafeRawBufferPointer) {
            guard let ctx = EVP_MAC_CTX_new(Algorithms.shared.hmac) else { fatalError("EVP_MAC_CTX_new: out of memory") }
            self.ctx = ctx
            let ok = DigestName.sha256.withParameters {
                EVP_MAC_init(ctx, key.baseAddress?.assumingMemoryBound(to: UInt8.self), key.count, $0) == 1
            }
            precondition(ok, "HMAC-SHA256 init failed")
        }

        public func update(_ data: UnsafeRawBufferPointer) {
            guard data.count > 0 else { return }
            precondition(EVP_MAC_update(ctx, data.baseAddress!.assumingMemoryBound(to: UInt8.self), data.count) == 1)
        }

        public func finish() -> [UInt8] {
            var out = [UInt8](repeating: 0, count: 32)
            var written = 0
            let ok = out.withUnsafeMutableBufferPointer { EVP_MAC_final(ctx, $0.baseAddress, &written, 32) == 1 }
            precondition(ok && written == 32, "HMAC-SHA256 final failed")
            return out
        }

        deinit { EVP_MAC_CTX_free(ctx) }
    }

    // MARK: HKDF-SHA512 (RFC 5869) through EVP_KDF

    /// Full HKDF-SHA512: extract with `salt` (an empty salt means HashLen zero bytes), then
    /// expand with `info` to `outputCount` bytes.
    public static func hkdfSHA512(ikm: [UInt8], salt: [UInt8] = [], info: [UInt8], outputCount: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: outputCount)
        ikm.withUnsafeBytes { ikmBytes in
            salt.withUnsafeBytes { saltBytes in
                info.withUnsafeBytes { infoBytes in
                    out.withUnsafeMutableBytes { outBytes in
                        hkdf(mode: EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND, key: ikmBytes,
                             salt: saltBytes, info: infoBytes, into: outBytes)
                    }
                }
            }
        }
        return out
    }

    /// Full HKDF-SHA512 with no salt, from key material the caller keeps (no copy is made).
    public static func hkdfSHA512(ikm: UnsafeRawBufferPointer, info: [UInt8], into output: UnsafeMutableRawBufferPointer) {
        info.withUnsafeBytes { infoBytes in
            hkdf(mode: EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND, key: ikm, salt: UnsafeRawBufferPointer(start: nil, count: 0),
                 info: infoBytes, into: output)
        }
    }

    /// HKDF-Extract with no salt: the 64-byte pseudorandom key that `hkdfExpand` reuses, so the
    /// per-extent derivation costs one HMAC instead of two.
    public static func hkdfExtractSHA512(ikm: UnsafeRawBufferPointer, into prk: UnsafeMutableRawBufferPointer) {
        precondition(prk.count == 64)
        hkdf(mode: EVP_KDF_HKDF_MODE_EXTRACT_ONLY, key: ikm, salt: UnsafeRawBufferPointer(start: nil, count: 0),
             info: UnsafeRawBufferPointer(start: nil, count: 0), into: prk)
    }

    /// HKDF-Expand(prk, info) into `output` (at most 255 * 64 bytes) through `EVP_KDF`. Used for
    /// the per-key derivations made once, and as the reference the keyed fast path is tested
    /// against; the context is reset afterwards so no copy of the PRK stays behind in it.
    public static func hkdfExpandSHA512(prk: UnsafeRawBufferPointer, info: UnsafeRawBufferPointer,
                                        into output: UnsafeMutableRawBufferPointer) {
        precondition(prk.count == 64 && info.count > 0)
        hkdf(mode: EVP_KDF_HKDF_MODE_EXPAND_ONLY, key: prk, salt: UnsafeRawBufferPointer(start: nil, count: 0),
             info: info, into: output)
    }

    /// HKDF-Expand(prk, info) for outputs of at most one SHA-512 block (64 bytes), the per-extent
    /// and per-header derivations. RFC 5869's expand is then exactly T(1) = HMAC-SHA512(prk,
    /// info || 0x01), truncated; it is computed with `EVP_MAC` on a context of the calling thread
    /// keyed with `prk` once, so each call skips re-hashing the key pads (the `EVP_KDF` provider
    /// keys a fresh HMAC on every call, which cost more than the HMAC itself).
    ///
    /// - Parameter serial: `prk`'s owner's unique serial (`MasterKey.instanceSerial`), never
    ///   reused for another PRK; `forgetKeyedContexts(serial:)` must be called when `prk` is wiped.
    package static func hkdfExpandSHA512(keyedAs serial: UInt64, prk: UnsafeRawBufferPointer, info: UnsafeRawBufferPointer,
                                        into output: UnsafeMutableRawBufferPointer) {
        precondition(prk.count == 64 && info.count > 0 && info.count <= 1024 && output.count > 0 && output.count <= 64)
        // info || 0x01 built on the stack, so the HMAC takes one update; a 64-byte output takes the
        // block directly, anything shorter goes through a scratch block wiped afterwards.
        let ok = withUnsafeTemporaryAllocation(byteCount: 64 + info.count + 1, alignment: 16) { scratch -> Bool in
            let block = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<64])
            let message = UnsafeMutableRawBufferPointer(rebasing: scratch[64...])
            message.copyMemory(from: info)
            message[info.count] = 1
            let target = output.count == 64 ? output : block
            defer { if output.count < 64 { cleanse(block) } }
            let done = ThreadContexts.withCurrent {
                $0.keyed.firstBlock(serial: serial, prk: prk, message: UnsafeRawBufferPointer(message), into: target)
            }
            if done && output.count < 64 { output.copyMemory(from: UnsafeRawBufferPointer(rebasing: block[0..<output.count])) }
            return done
        }
        precondition(ok, "HKDF-SHA512 expand (HMAC) failed")
    }

    /// Frees every thread's HMAC and SIV state keyed for `serial`: its keys are being wiped.
    package static func forgetKeyedContexts(serial: UInt64) {
        KeyedContextCache.forget(serial: serial)
    }

    private static func hkdf(mode: Int32, key: UnsafeRawBufferPointer, salt: UnsafeRawBufferPointer,
                             info: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) {
        let ctx = ThreadContexts.current.kdf
        var mode = mode
        var digestName: (CChar, CChar, CChar, CChar, CChar, CChar, CChar) = (83, 72, 65, 53, 49, 50, 0) // "SHA512"
        let ok = withUnsafeMutablePointer(to: &digestName) { namePtr -> Bool in
            var params: [OSSL_PARAM] = [
                OSSL_PARAM_construct_int(ParamName.mode, &mode),
                OSSL_PARAM_construct_utf8_string(ParamName.digest, UnsafeMutableRawPointer(namePtr).assumingMemoryBound(to: CChar.self), 0),
                OSSL_PARAM_construct_octet_string(ParamName.key, UnsafeMutableRawPointer(mutating: key.baseAddress ?? emptyByte), key.count),
            ]
            if salt.count > 0 {
                params.append(OSSL_PARAM_construct_octet_string(ParamName.salt, UnsafeMutableRawPointer(mutating: salt.baseAddress!), salt.count))
            }
            if info.count > 0 {
                params.append(OSSL_PARAM_construct_octet_string(ParamName.info, UnsafeMutableRawPointer(mutating: info.baseAddress!), info.count))
            }
            params.append(OSSL_PARAM_construct_end())
            EVP_KDF_CTX_reset(ctx)
            let derived = EVP_KDF_derive(ctx, output.baseAddress!.assumingMemoryBound(to: UInt8.self), output.count, &params) == 1
            // The context keeps a copy of the input key (often a raw master key): clear it now
            // rather than leave it until this thread's next derivation.
            EVP_KDF_CTX_reset(ctx)
            return derived
        }
        precondition(ok, "HKDF-SHA512 failed")
    }

    // MARK: AES-256-GCM

    /// Seals `plaintext` into `ciphertext` (same length) and writes the 16-byte tag.
    public static func gcmSeal(key: UnsafeRawBufferPointer, iv: UnsafeRawBufferPointer, ad: UnsafeRawBufferPointer,
                               plaintext: UnsafeRawBufferPointer, ciphertext: UnsafeMutableRawBufferPointer,
                               tag: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        precondition(key.count == 32 && iv.count == gcmIVCount && tag.count == gcmTagCount)
        precondition(ciphertext.count >= plaintext.count)
        try withThreadGCM { (ctx) throws(CryptoError) in try gcmSeal(ctx, key: key, iv: iv, ad: ad, plaintext: plaintext, ciphertext: ciphertext, tag: tag) }
    }

    /// Runs `body` on the calling thread's AES-256-GCM context, under the lock a key wipe takes to
    /// scrub it (`KeyedContextCache`).
    private static func withThreadGCM(_ body: (OpaquePointer) throws(CryptoError) -> Void) throws(CryptoError) {
        try ThreadContexts.withCurrent { contexts in
            contexts.keyed.withGCM { ctx in Result { () throws(CryptoError) in try body(ctx) } }
        }.get()
    }

    /// AES-256-GCM seal under the extent key derived from `nonce` (`derive` fills the 64-byte
    /// block: key, then IV), with the IV's last byte XORed with `member`, on this thread's context.
    /// A context still holding that key (the previous extent of the same key group) skips the
    /// derivation and the key schedule.
    package static func extentSeal(serial: UInt64, nonce: UnsafeRawBufferPointer, member: UInt8,
                                   derive: (UnsafeMutableRawBufferPointer) -> Void, ad: UnsafeRawBufferPointer,
                                   plaintext: UnsafeRawBufferPointer, ciphertext: UnsafeMutableRawBufferPointer,
                                   tag: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        precondition(tag.count == gcmTagCount && ciphertext.count >= plaintext.count)
        try withExtentContext(serial: serial, nonce: nonce, member: member, derive: derive) { (ctx, key, iv) throws(CryptoError) in
            try gcmSeal(ctx, key: key, iv: iv, ad: ad, plaintext: plaintext, ciphertext: ciphertext, tag: tag)
        }
    }

    /// `extentSeal`'s opening: throws `.authenticationFailed` (plaintext wiped) when the tag fails.
    package static func extentOpen(serial: UInt64, nonce: UnsafeRawBufferPointer, member: UInt8,
                                   derive: (UnsafeMutableRawBufferPointer) -> Void, ad: UnsafeRawBufferPointer,
                                   ciphertext: UnsafeRawBufferPointer, tag: UnsafeRawBufferPointer,
                                   plaintext: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        precondition(tag.count == gcmTagCount && plaintext.count >= ciphertext.count)
        try withExtentContext(serial: serial, nonce: nonce, member: member, derive: derive) { (ctx, key, iv) throws(CryptoError) in
            try gcmOpen(ctx, key: key, iv: iv, ad: ad, ciphertext: ciphertext, tag: tag, plaintext: plaintext)
        }
    }

    /// Runs `body` on this thread's GCM context for the extent key of (`serial`, `nonce`) with the
    /// member's IV; `body` gets a nil key when the context already holds it.
    private static func withExtentContext(serial: UInt64, nonce: UnsafeRawBufferPointer, member: UInt8,
                                          derive: (UnsafeMutableRawBufferPointer) -> Void,
                                          _ body: (OpaquePointer, UnsafeRawBufferPointer?, UnsafeRawBufferPointer) throws(CryptoError) -> Void) throws(CryptoError) {
        try ThreadContexts.withCurrent { contexts in
            Result { () throws(CryptoError) in
                try contexts.keyed.withExtentGCM(serial: serial, nonce: nonce, derive: derive) { (ctx, key, base) throws(CryptoError) in
                    try withMemberIV(base, member) { (iv) throws(CryptoError) in try body(ctx, key, iv) }
                }
            }
        }.get()
    }

    /// The derived IV with its last byte XORed with the key-group member (FORMAT.md 5.3).
    private static func withMemberIV(_ base: UnsafeRawBufferPointer, _ member: UInt8,
                                     _ body: (UnsafeRawBufferPointer) throws(CryptoError) -> Void) throws(CryptoError) {
        var iv: (UInt64, UInt32) = (0, 0)
        withUnsafeMutableBytes(of: &iv) { $0.copyMemory(from: base) }
        try withUnsafeMutableBytes(of: &iv) { (raw) throws(CryptoError) in
            raw[11] ^= member
            try body(UnsafeRawBufferPointer(rebasing: raw[0..<gcmIVCount]))
        }
    }

    /// `key` nil: the context already holds the key, only the IV is set.
    private static func gcmSeal(_ ctx: OpaquePointer, key: UnsafeRawBufferPointer?, iv: UnsafeRawBufferPointer, ad: UnsafeRawBufferPointer,
                                plaintext: UnsafeRawBufferPointer, ciphertext: UnsafeMutableRawBufferPointer,
                                tag: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        var outCount: Int32 = 0
        // Only key and IV: the context keeps AES-256-GCM from its creation. The tag is read with
        // get_params, which the ctrl call would translate into anyway.
        guard EVP_EncryptInit_ex2(ctx, nil, u8(key), u8(iv), nil) == 1,
              ad.count == 0 || EVP_EncryptUpdate(ctx, nil, &outCount, u8(ad), Int32(ad.count)) == 1,
              plaintext.count == 0 || EVP_EncryptUpdate(ctx, u8m(ciphertext), &outCount, u8(plaintext), Int32(plaintext.count)) == 1,
              EVP_EncryptFinal_ex(ctx, u8m(ciphertext).map { $0 + Int(outCount) }, &outCount) == 1,
              withUnsafeTemporaryAllocation(of: OSSL_PARAM.self, capacity: 2, { params in
                  params[0] = OSSL_PARAM_construct_octet_string(ParamName.tag, tag.baseAddress, gcmTagCount)
                  params[1] = OSSL_PARAM_construct_end()
                  return EVP_CIPHER_CTX_get_params(ctx, params.baseAddress) == 1
              })
        else { throw .library("AES-256-GCM seal") }
    }

    /// Opens `ciphertext` into `plaintext`, throwing `.authenticationFailed` when the tag does
    /// not verify. On failure the plaintext buffer is wiped, so no unauthenticated byte escapes.
    public static func gcmOpen(key: UnsafeRawBufferPointer, iv: UnsafeRawBufferPointer, ad: UnsafeRawBufferPointer,
                               ciphertext: UnsafeRawBufferPointer, tag: UnsafeRawBufferPointer,
                               plaintext: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        precondition(key.count == 32 && iv.count == gcmIVCount && tag.count == gcmTagCount)
        precondition(plaintext.count >= ciphertext.count)
        try withThreadGCM { (ctx) throws(CryptoError) in try gcmOpen(ctx, key: key, iv: iv, ad: ad, ciphertext: ciphertext, tag: tag, plaintext: plaintext) }
    }

    private static func gcmOpen(_ ctx: OpaquePointer, key: UnsafeRawBufferPointer?, iv: UnsafeRawBufferPointer, ad: UnsafeRawBufferPointer,
                                ciphertext: UnsafeRawBufferPointer, tag: UnsafeRawBufferPointer,
                                plaintext: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        var outCount: Int32 = 0
        // The expected tag goes in with key and IV (one parameter pass instead of a ctrl call).
        let initialised = withUnsafeTemporaryAllocation(of: OSSL_PARAM.self, capacity: 2) { params in
            params[0] = OSSL_PARAM_construct_octet_string(ParamName.tag, UnsafeMutableRawPointer(mutating: tag.baseAddress), gcmTagCount)
            params[1] = OSSL_PARAM_construct_end()
            return EVP_DecryptInit_ex2(ctx, nil, u8(key), u8(iv), params.baseAddress) == 1
        }
        guard initialised,
              ad.count == 0 || EVP_DecryptUpdate(ctx, nil, &outCount, u8(ad), Int32(ad.count)) == 1,
              ciphertext.count == 0 || EVP_DecryptUpdate(ctx, u8m(plaintext), &outCount, u8(ciphertext), Int32(ciphertext.count)) == 1
        else { throw .library("AES-256-GCM open") }
        var finalCount: Int32 = 0
        guard EVP_DecryptFinal_ex(ctx, u8m(plaintext).map { $0 + Int(outCount) }, &finalCount) == 1 else {
            cleanse(UnsafeMutableRawBufferPointer(rebasing: plaintext[0..<ciphertext.count]))
            throw .authenticationFailed
        }
    }

    // MARK: AES-256-SIV (RFC 5297): deterministic authenticated encryption of names

    /// Returns the 16-byte synthetic IV followed by the ciphertext, keying a context afresh: the
    /// reference the keyed path (`sivSeal(keyedAs:...)`) is tested against.
    public static func sivSeal(key: UnsafeRawBufferPointer, ad: [UInt8], plaintext: [UInt8]) throws(CryptoError) -> [UInt8] {
        precondition(key.count == 64 && !plaintext.isEmpty)
        let ctx = ThreadContexts.withCurrent { $0.cipher }
        defer { EVP_CIPHER_CTX_reset(ctx) }
        return try sivSeal(ctx, ad: ad, plaintext: plaintext) { EVP_EncryptInit_ex2(ctx, Algorithms.shared.aes256siv, u8(key), nil, nil) == 1 }
    }

    /// The reference for `sivOpen(keyedAs:...)`, keying a context afresh.
    public static func sivOpen(key: UnsafeRawBufferPointer, ad: [UInt8], sealed: [UInt8]) throws(CryptoError) -> [UInt8] {
        precondition(key.count == 64)
        let ctx = ThreadContexts.withCurrent { $0.cipher }
        defer { EVP_CIPHER_CTX_reset(ctx) }
        return try sivOpen(ctx, ad: ad, sealed: sealed) { EVP_DecryptInit_ex2(ctx, Algorithms.shared.aes256siv, u8(key), nil, nil) == 1 }
    }

    /// `sivSeal(key:ad:plaintext:)` on a copy of a template this thread keyed with `key` once:
    /// sealing a name costs a context copy instead of two AES key expansions and a CMAC.
    ///
    /// - Parameters:
    ///   - serial: `key`'s owner's unique serial (`MasterKey.instanceSerial`), never reused;
    ///     `forgetKeyedContexts(serial:)` must be called when `key` is wiped.
    ///   - subkey: which of the owner's SIV keys `key` is, so two keys of one owner never share a template.
    package static func sivSeal(keyedAs serial: UInt64, subkey: UInt8, key: UnsafeRawBufferPointer,
                                ad: [UInt8], plaintext: [UInt8]) throws(CryptoError) -> [UInt8] {
        precondition(key.count == 64 && !plaintext.isEmpty)
        var sealed: [UInt8]?
        ThreadContexts.withCurrent { threadContexts in
            _ = threadContexts.keyed.withSIV(serial: serial, subkey: subkey, encrypt: true, key: key,
                                             working: threadContexts.cipher) { ctx in
                sealed = try? sivSeal(ctx, ad: ad, plaintext: plaintext) { true }
                return sealed != nil
            }
        }
        guard let sealed else { throw .library("AES-256-SIV seal") }
        return sealed
    }

    /// `sivOpen(key:ad:sealed:)` on a copy of a template this thread keyed with `key` once (see
    /// `sivSeal(keyedAs:...)`). Throws `.authenticationFailed` for any failure, as the reference does.
    package static func sivOpen(keyedAs serial: UInt64, subkey: UInt8, key: UnsafeRawBufferPointer,
                                ad: [UInt8], sealed: [UInt8]) throws(CryptoError) -> [UInt8] {
        precondition(key.count == 64)
        var opened: Result<[UInt8], CryptoError> = .failure(.authenticationFailed)
        ThreadContexts.withCurrent { threadContexts in
            _ = threadContexts.keyed.withSIV(serial: serial, subkey: subkey, encrypt: false, key: key,
                                             working: threadContexts.cipher) { ctx in
                opened = Result { () throws(CryptoError) in try sivOpen(ctx, ad: ad, sealed: sealed) { true } }
                return true
            }
        }
        return try opened.get()
    }

    /// Seals on `ctx` once `initialise` has keyed it for encryption.
    private static func sivSeal(_ ctx: OpaquePointer, ad: [UInt8], plaintext: [UInt8],
                                initialise: () -> Bool) throws(CryptoError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 16 + plaintext.count)
        var outCount: Int32 = 0
        let ok = ad.withUnsafeBytes { a in plaintext.withUnsafeBytes { p in
            out.withUnsafeMutableBytes { o -> Bool in
                let body = UnsafeMutableRawBufferPointer(rebasing: o[16...])
                return initialise()
                    && EVP_EncryptUpdate(ctx, nil, &outCount, u8(a), Int32(a.count)) == 1
                    && EVP_EncryptUpdate(ctx, u8m(body), &outCount, u8(p), Int32(p.count)) == 1
                    && EVP_EncryptFinal_ex(ctx, u8m(body), &outCount) == 1
                    && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, o.baseAddress) == 1
            }
        }}
        guard ok else { throw .library("AES-256-SIV seal") }
        return out
    }

    /// Opens on `ctx` once `initialise` has keyed it for decryption; wipes the output on failure.
    private static func sivOpen(_ ctx: OpaquePointer, ad: [UInt8], sealed: [UInt8],
                                initialise: () -> Bool) throws(CryptoError) -> [UInt8] {
        guard sealed.count > 16 else { throw .authenticationFailed }
        var out = [UInt8](repeating: 0, count: sealed.count - 16)
        var outCount: Int32 = 0
        let ok = ad.withUnsafeBytes { a in sealed.withUnsafeBytes { s in
            out.withUnsafeMutableBytes { o -> Bool in
                let body = UnsafeRawBufferPointer(rebasing: s[16...])
                return initialise()
                    && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, 16, UnsafeMutableRawPointer(mutating: s.baseAddress)) == 1
                    && EVP_DecryptUpdate(ctx, nil, &outCount, u8(a), Int32(a.count)) == 1
                    && EVP_DecryptUpdate(ctx, u8m(o), &outCount, u8(body), Int32(body.count)) == 1
                    && EVP_DecryptFinal_ex(ctx, u8m(o), &outCount) == 1
            }
        }}
        guard ok else {
            out.withUnsafeMutableBytes { cleanse($0) }
            throw .authenticationFailed
        }
        return out
    }

    // MARK: scrypt (RFC 7914) for passphrase-derived keys

    public static func scrypt(password: [UInt8], salt: [UInt8], n: UInt64, r: UInt32, p: UInt32,
                              outputCount: Int) throws(CryptoError) -> [UInt8] {
        guard let ctx = EVP_KDF_CTX_new(Algorithms.shared.scrypt) else { throw .library("scrypt context") }
        defer { EVP_KDF_CTX_free(ctx) }
        var n = n, r = r, p = p
        var maxmem: UInt64 = 1 << 31
        var out = [UInt8](repeating: 0, count: outputCount)
        let ok = password.withUnsafeBytes { pw in salt.withUnsafeBytes { s in
            var params = [
                OSSL_PARAM_construct_octet_string(ParamName.pass, UnsafeMutableRawPointer(mutating: pw.baseAddress ?? emptyByte), pw.count),
                OSSL_PARAM_construct_octet_string(ParamName.salt, UnsafeMutableRawPointer(mutating: s.baseAddress ?? emptyByte), s.count),
                OSSL_PARAM_construct_uint64(ParamName.scryptN, &n),
                OSSL_PARAM_construct_uint32(ParamName.scryptR, &r),
                OSSL_PARAM_construct_uint32(ParamName.scryptP, &p),
                OSSL_PARAM_construct_uint64(ParamName.scryptMaxMem, &maxmem),
                OSSL_PARAM_construct_end(),
            ]
            return out.withUnsafeMutableBufferPointer { EVP_KDF_derive(ctx, $0.baseAddress, outputCount, &params) == 1 }
        }}
        guard ok else { throw .library("scrypt (parameters out of range or not enough memory)") }
        return out
    }
}

// OSSL_PARAM keeps the pointer to its name, so names must outlive the call: static C strings.
package enum ParamName {
    package static var mode: UnsafePointer<CChar> { cString("mode") }
    package static var digest: UnsafePointer<CChar> { cString("digest") }
    package static var key: UnsafePointer<CChar> { cString("key") }
    package static var salt: UnsafePointer<CChar> { cString("salt") }
    package static var info: UnsafePointer<CChar> { cString("info") }
    package static var tag: UnsafePointer<CChar> { cString("tag") }
    package static var pass: UnsafePointer<CChar> { cString("pass") }
    package static var scryptN: UnsafePointer<CChar> { cString("n") }
    package static var scryptR: UnsafePointer<CChar> { cString("r") }
    package static var scryptP: UnsafePointer<CChar> { cString("p") }
    package static var scryptMaxMem: UnsafePointer<CChar> { cString("maxmem_bytes") }

    private static func cString(_ s: StaticString) -> UnsafePointer<CChar> {
        UnsafeRawPointer(s.utf8Start).assumingMemoryBound(to: CChar.self)
    }
}

private var emptyByte: UnsafeRawPointer { UnsafeRawPointer(("" as StaticString).utf8Start) }

@inline(__always) private func u8(_ b: UnsafeRawBufferPointer) -> UnsafePointer<UInt8>? {
    b.baseAddress?.assumingMemoryBound(to: UInt8.self)
}

@inline(__always) private func u8(_ b: UnsafeRawBufferPointer?) -> UnsafePointer<UInt8>? {
    b?.baseAddress?.assumingMemoryBound(to: UInt8.self)
}

@inline(__always) private func u8m(_ b: UnsafeMutableRawBufferPointer) -> UnsafeMutablePointer<UInt8>? {
    b.baseAddress?.assumingMemoryBound(to: UInt8.self)
}

// MARK: Benchmark reference

extension OpenSSL {
    /// What `openssl speed -evp aes-256-gcm -bytes <n>` times: one AES-256-GCM context encrypting
    /// `buffer` in place `rounds` times, with no per-buffer setup (a random key, discarded). The
    /// ceiling for the extent codec at that size; `encfsd bench-codec` times it right next to
    /// each codec measurement, because on a shared machine a figure from another minute is not
    /// comparable.
    public static func gcmStreamReference(buffer: UnsafeMutableRawBufferPointer, rounds: Int) {
        guard let ctx = EVP_CIPHER_CTX_new() else { fatalError("EVP_CIPHER_CTX_new: out of memory") }
        defer { EVP_CIPHER_CTX_free(ctx) }
        var key = random(count: 32), iv = random(count: gcmIVCount)
        defer { key.withUnsafeMutableBytes { cleanse($0) } }
        var outCount: Int32 = 0
        var ok = EVP_EncryptInit_ex2(ctx, Algorithms.shared.aes256gcm, key, iv, nil) == 1
        for _ in 0..<rounds where ok {
            ok = EVP_EncryptUpdate(ctx, u8m(buffer), &outCount, u8(UnsafeRawBufferPointer(buffer)), Int32(buffer.count)) == 1
        }
        var tag = [UInt8](repeating: 0, count: gcmTagCount)
        ok = ok && EVP_EncryptFinal_ex(ctx, u8m(buffer), &outCount) == 1
            && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, Int32(gcmTagCount), &tag) == 1
        precondition(ok, "AES-256-GCM reference stream failed")
    }
}
