import Locking
import COpenSSL

/// What a cached context was keyed with: one master key has several keys that are expensive to
/// set up and used over and over.
package enum KeyedUse: Equatable, Sendable {
    /// HMAC-SHA512 keyed with the master key's HKDF PRK: each HKDF-Expand of at most one block
    /// then costs the two compressions of the HMAC itself, not two more (and the allocations) of
    /// hashing the key pads again.
    case expand
    /// An AES-256-SIV context keyed with one of the master key's 64-byte SIV keys (`subkey` tells
    /// which), for one direction. Keying SIV expands two AES key schedules and computes CMAC(K, 0),
    /// most of the cost of sealing a short name; a copy of the keyed template skips all of it.
    /// The direction is part of the use because OpenSSL cannot re-initialise a SIV context
    /// without its key.
    case siv(subkey: UInt8, encrypt: Bool)

    var isCipher: Bool {
        if case .siv = self { return true }
        return false
    }
}

/// OpenSSL contexts already keyed with a master key's secrets, one set per thread (see `KeyedUse`).
///
/// Identity: entries are found by the master key's `instanceSerial`, a number no other
/// `MasterKey` instance ever gets (it doubles as a generation: the same raw key added again is a
/// new instance with a new serial), not by the object's address. An address is reused as soon as
/// a wiped key's memory is freed, and a new key allocated there would then derive or encrypt with
/// the old key's state: wrong keys, silently.
///
/// Wiping: a context holds HMAC pad state or AES key schedules, as good as the key itself, on
/// the ordinary heap. A serial checked on use would stop a wiped key's state from being *used*,
/// but an idle worker thread would keep that secret in memory until it next ran, long after soft
/// removal promised the key was gone. So `MasterKey.deinit` frees the contexts of its serial in
/// every thread right away (`forget`), and a thread frees all of its own when it exits
/// (`retire`); OpenSSL cleanses key state as it frees it. Each cache has a lock for that purpose
/// only: the owning thread takes it (uncontended) around each use, and another thread takes it
/// only to free an entry, never to use one, so no context is ever used by two threads.
package final class KeyedContextCache: Sendable {
    /// More master keys than this in use by one thread, for one use, evicts the least recently
    /// keyed one.
    package static let capacity = 8

    /// Invariant making this `@unchecked Sendable`: an entry only moves into and out of its
    /// thread's `entries` lock, under which alone its context is used or freed.
    private struct Entry: @unchecked Sendable {
        var serial: UInt64
        var use: KeyedUse
        var ctx: OpaquePointer

        func free() {
            if use.isCipher { EVP_CIPHER_CTX_free(ctx) } else { EVP_MAC_CTX_free(ctx) }
        }
    }

    private let entries = Lock<[Entry]>([])

    /// This thread's AES-256-GCM and HMAC-SHA256 contexts. Each use keys one with a key derived
    /// from a master key (an extent's, a header's), and the key stays in it until the next use:
    /// keying it with zeros after every use cost a second key setup per extent and per header
    /// check (PERFORMANCE.md, "Derived keys scrubbed at the wipe"). Instead `forget` keys both
    /// with zeros in every thread whenever any master key is wiped, so no derived key outlives
    /// its master key. Each is used and scrubbed only under its lock, and freed under it (nil
    /// after `retire`), so a scrub never meets a freed context.
    private let gcm: Lock<GCMState>
    private let hmacSHA256: Lock<OpaquePointer?>

    /// The GCM context and, when `withExtentGCM` keyed it, which extent key it holds: consecutive
    /// extents of one key group share their nonce and so their key, and a context already keyed
    /// with it is re-initialised with the member's IV alone, skipping the HKDF and the AES key
    /// schedule (PERFORMANCE.md, "Extent key groups").
    ///
    /// Invariant making this `@unchecked Sendable`: it lives only inside its cache's lock.
    private struct GCMState: @unchecked Sendable {
        var ctx: OpaquePointer?
        var extentKey = ExtentKeying.none

        /// Forgets which extent key the context holds; the fields are zeroed, not left behind.
        mutating func forgetExtentKey() { extentKey = .none }
    }

    /// The master key (by serial), nonce and derived IV of the extent key a GCM context holds.
    private struct ExtentKeying: Equatable {
        var serial: UInt64
        var nonce: (UInt64, UInt64)
        var iv: (UInt64, UInt32)
        var held: Bool

        static let none = ExtentKeying(serial: 0, nonce: (0, 0), iv: (0, 0), held: false)

        static func == (a: Self, b: Self) -> Bool {
            a.held == b.held && a.serial == b.serial && a.nonce == b.nonce && a.iv == b.iv
        }
    }

    /// Every thread's cache, for `forget`.
    private static let registry = Lock<[ObjectIdentifier: KeyedContextCache]>([:])

    package init() {
        guard let gcm = EVP_CIPHER_CTX_new(), let hmac = EVP_MAC_CTX_new(Algorithms.shared.hmac)
        else { fatalError("OpenSSL could not allocate a context: out of memory") }
        // Both fixed to their algorithm now, so each use passes only key (and IV). Passing the
        // cipher again made OpenSSL free and reallocate its whole GCM state on every extent;
        // setting the digest on every MAC made it fetch SHA-256 again (a third of a header check).
        guard EVP_CipherInit_ex2(gcm, Algorithms.shared.aes256gcm, nil, nil, 1, nil) == 1
        else { fatalError("OpenSSL refused AES-256-GCM") }
        let digestSet = DigestName.sha256.withParameters { EVP_MAC_CTX_set_params(hmac, $0) == 1 }
        guard digestSet else { fatalError("OpenSSL refused HMAC-SHA256") }
        self.gcm = Lock(GCMState(ctx: gcm))
        self.hmacSHA256 = Lock(hmac)
        Self.registry.withLock { $0[ObjectIdentifier(self)] = self }
    }

    /// Runs `body` on this thread's AES-256-GCM context; `body` keys it.
    package func withGCM<R, E: Error>(_ body: (OpaquePointer) throws(E) -> R) throws(E) -> R {
        try gcm.withLock { (state: inout GCMState) throws(E) -> R in
            state.forgetExtentKey()
            return try body(state.ctx!)
        }
    }

    /// Runs `body` on this thread's AES-256-GCM context for the extent key derived from `nonce`
    /// under master key `serial`. When the context already holds that key, `body` gets a nil key
    /// and must initialise with the IV alone; otherwise `derive` fills the 64-byte block whose
    /// first 32 bytes are the key and next 12 the IV, and `body` gets the key to initialise with.
    /// Either way `body` gets the derived IV (before the member's adjustment).
    ///
    /// `derive` runs under this cache's GCM lock and takes its HMAC entries' lock: the only
    /// place two of a cache's locks nest, always in this order and only on the owning thread
    /// (`forget` takes each alone).
    package func withExtentGCM<R, E: Error>(serial: UInt64, nonce: UnsafeRawBufferPointer,
                                            derive: (UnsafeMutableRawBufferPointer) -> Void,
                                            _ body: (OpaquePointer, UnsafeRawBufferPointer?, UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        precondition(nonce.count == 16)
        let nonceWords = (nonce.loadUnaligned(fromByteOffset: 0, as: UInt64.self), nonce.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        return try gcm.withLock { (state: inout GCMState) throws(E) -> R in
            let ctx = state.ctx!
            if state.extentKey.held && state.extentKey.serial == serial && state.extentKey.nonce == nonceWords {
                let iv = state.extentKey.iv
                return try withUnsafeBytes(of: iv) { raw throws(E) -> R in
                    try body(ctx, nil, UnsafeRawBufferPointer(rebasing: raw[0..<12]))
                }
            }
            // A failed or partial keying must not leave the old key marked as held.
            state.forgetExtentKey()
            return try withUnsafeTemporaryAllocation(byteCount: 64, alignment: 16) { (material: UnsafeMutableRawBufferPointer) throws(E) -> R in
                defer { OpenSSL.cleanse(material) }
                derive(material)
                let key = UnsafeRawBufferPointer(rebasing: material[0..<32])
                let iv = UnsafeRawBufferPointer(rebasing: material[32..<44])
                let result = try body(ctx, key, iv)
                state.extentKey = ExtentKeying(serial: serial, nonce: nonceWords,
                                               iv: (iv.loadUnaligned(fromByteOffset: 0, as: UInt64.self),
                                                    iv.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
                                               held: true)
                return result
            }
        }
    }

    /// Runs `body` on this thread's HMAC-SHA256 context; `body` keys it.
    package func withHMACSHA256<R, E: Error>(_ body: (OpaquePointer) throws(E) -> R) throws(E) -> R {
        try hmacSHA256.withLock { (ctx: inout OpaquePointer?) throws(E) -> R in try body(ctx!) }
    }

    /// Keys this cache's GCM and HMAC contexts with zeros. OpenSSL keeps the schedule of a GCM
    /// key and a copy of an HMAC key in the context until it is keyed again.
    private func scrubDerivedKeys() {
        let placeholder = (UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        withUnsafeBytes(of: placeholder) { zeros in
            let key = zeros.baseAddress!.assumingMemoryBound(to: UInt8.self)
            gcm.withLock { state in
                state.forgetExtentKey()
                guard let ctx = state.ctx else { return }
                precondition(EVP_CipherInit_ex2(ctx, nil, key, nil, -1, nil) == 1, "AES-256-GCM init failed")
            }
            hmacSHA256.withLock { ctx in
                guard let ctx else { return }
                precondition(EVP_MAC_init(ctx, key, 32, nil) == 1, "HMAC-SHA256 init failed")
            }
        }
    }

    /// Runs `body` on this thread's context keyed for (`serial`, `use`), made by `make` on first
    /// use; false if `make` fails.
    private func withContext(serial: UInt64, use: KeyedUse, make: () -> OpaquePointer?,
                             _ body: (OpaquePointer) -> Bool) -> Bool {
        entries.withLock { entries -> Bool in
            let ctx: OpaquePointer
            if let found = entries.firstIndex(where: { $0.serial == serial && $0.use == use }) {
                ctx = entries[found].ctx
            } else {
                guard let fresh = make() else { return false }
                if entries.lazy.filter({ $0.use == use }).count == Self.capacity,
                   let oldest = entries.firstIndex(where: { $0.use == use }) {
                    entries.remove(at: oldest).free()
                }
                entries.append(Entry(serial: serial, use: use, ctx: fresh))
                ctx = fresh
            }
            return body(ctx)
        }
    }

    /// HMAC-SHA512(prk, message) into `block` (64 bytes), with the context this thread keyed for
    /// `serial`, keying one on first use. HKDF's T(1) when `message` is info || 0x01.
    package func firstBlock(serial: UInt64, prk: UnsafeRawBufferPointer, message: UnsafeRawBufferPointer,
                            into block: UnsafeMutableRawBufferPointer) -> Bool {
        precondition(block.count == 64)
        return withContext(serial: serial, use: .expand, make: { Self.keyedHMACSHA512(prk) }) { ctx in
            var written = 0
            // A NULL key re-initialises from the pad state computed when the context was keyed.
            return EVP_MAC_init(ctx, nil, 0, nil) == 1
                && EVP_MAC_update(ctx, message.baseAddress!.assumingMemoryBound(to: UInt8.self), message.count) == 1
                && EVP_MAC_final(ctx, block.baseAddress!.assumingMemoryBound(to: UInt8.self), &written, 64) == 1
                && written == 64
        }
    }

    /// Copies this thread's AES-256-SIV template for (`serial`, `subkey`, `encrypt`) into `working`,
    /// keying the template with `key` on first use, and runs `body` on `working`. `working` is reset
    /// afterwards whatever happened, so the only keyed SIV state a thread keeps is its templates,
    /// which `forget` reaches.
    package func withSIV(serial: UInt64, subkey: UInt8, encrypt: Bool, key: UnsafeRawBufferPointer,
                         working: OpaquePointer, _ body: (OpaquePointer) -> Bool) -> Bool {
        defer { EVP_CIPHER_CTX_reset(working) }
        let make = { () -> OpaquePointer? in
            guard let ctx = EVP_CIPHER_CTX_new() else { return nil }
            guard EVP_CipherInit_ex2(ctx, Algorithms.shared.aes256siv, key.baseAddress?.assumingMemoryBound(to: UInt8.self),
                                     nil, encrypt ? 1 : 0, nil) == 1
            else {
                EVP_CIPHER_CTX_free(ctx)
                return nil
            }
            return ctx
        }
        return withContext(serial: serial, use: .siv(subkey: subkey, encrypt: encrypt), make: make) { template in
            EVP_CIPHER_CTX_copy(working, template) == 1 && body(working)
        }
    }

    private static func keyedHMACSHA512(_ prk: UnsafeRawBufferPointer) -> OpaquePointer? {
        guard let ctx = EVP_MAC_CTX_new(Algorithms.shared.hmac) else { return nil }
        let keyed = DigestName.sha512.withParameters {
            EVP_MAC_init(ctx, prk.baseAddress!.assumingMemoryBound(to: UInt8.self), prk.count, $0) == 1
        }
        guard keyed else {
            EVP_MAC_CTX_free(ctx)
            return nil
        }
        return ctx
    }

    /// Frees the contexts keyed for `serial` in every thread, and scrubs every thread's GCM and
    /// HMAC contexts of the last key derived in them: the master key `serial` is being wiped.
    package static func forget(serial: UInt64) {
        // Taken out of the registry lock first, so no two locks are ever held together. A thread
        // that exits meanwhile has retired its (emptied) cache; one that starts has no entry for
        // a key nobody can use any more.
        let caches = registry.withLock { Array($0.values) }
        for cache in caches {
            cache.entries.withLock { entries in
                entries.removeAll { entry in
                    guard entry.serial == serial else { return false }
                    entry.free()
                    return true
                }
            }
            cache.scrubDerivedKeys()
        }
    }

    /// The owning thread is exiting: frees every context.
    package func retire() {
        _ = Self.registry.withLock { $0.removeValue(forKey: ObjectIdentifier(self)) }
        entries.withLock { entries in
            for entry in entries { entry.free() }
            entries.removeAll()
        }
        // Freeing cleanses the key state (OpenSSL's free does).
        gcm.withLock { state in
            state.forgetExtentKey()
            EVP_CIPHER_CTX_free(state.ctx)
            state.ctx = nil
        }
        hmacSHA256.withLock { ctx in
            EVP_MAC_CTX_free(ctx)
            ctx = nil
        }
    }

    /// How many threads' GCM contexts hold an extent key derived under `serial` (tests).
    package static func extentKeysHeld(for serial: UInt64) -> Int {
        let caches = registry.withLock { Array($0.values) }
        return caches.filter { cache in cache.gcm.withLock { $0.extentKey.held && $0.extentKey.serial == serial } }.count
    }

    /// How many threads hold a context keyed for `serial`, for `use` or for any use when nil (tests).
    package static func contexts(for serial: UInt64, use: KeyedUse? = nil) -> Int {
        let caches = registry.withLock { Array($0.values) }
        return caches.filter { cache in
            cache.entries.withLock { $0.contains { $0.serial == serial && (use == nil || $0.use == use) } }
        }.count
    }
}
