import COpenSSL
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The OpenSSL contexts one thread reuses for every seal, open and derivation.
///
/// Creating an `EVP_CIPHER_CTX` or `EVP_MAC_CTX` allocates; doing that per extent would put
/// malloc on the data path, and sharing one across threads would need a lock. Each libfuse
/// worker thread therefore gets its own set, created on first use and freed when the thread
/// exits (pthread key destructor).
package final class ThreadContexts {
    /// For AES-256-SIV: a keyed template is copied into it per name, and it is reset after each
    /// use so no key schedule stays in it.
    package let cipher: OpaquePointer
    /// For SHA-256 and other digests; re-initialised per use instead of allocated.
    package let digest: OpaquePointer
    package let kdf: OpaquePointer
    /// Contexts keyed with the secrets of each master key this thread uses (HMAC-SHA512 on the
    /// PRK for extent and header keys, AES-256-SIV templates for names and xattrs), and the GCM
    /// and HMAC-SHA256 contexts keyed per use with keys derived from them: everything a master
    /// key's wipe must reach in every thread.
    package let keyed = KeyedContextCache()
    /// Random bytes drawn ahead for extent nonces (see `takeNonce`).
    private let nonces: UnsafeMutableRawBufferPointer
    private var noncesUsed: Int
    private var noncesForkGeneration: UInt64 = 0

    package init() {
        guard let cipher = EVP_CIPHER_CTX_new(),
              let digest = EVP_MD_CTX_new(),
              let kdf = EVP_KDF_CTX_new(Algorithms.shared.hkdf)
        else { fatalError("OpenSSL could not allocate a context: out of memory") }
        self.cipher = cipher
        self.digest = digest
        self.kdf = kdf
        nonces = .allocate(byteCount: ThreadContexts.nonceBatchBytes, alignment: 16)
        noncesUsed = ThreadContexts.nonceBatchBytes
    }

    deinit {
        keyed.retire()
        EVP_CIPHER_CTX_free(cipher)
        EVP_MD_CTX_free(digest)
        EVP_KDF_CTX_free(kdf)
        nonces.deallocate()
    }

    /// 64 nonces per `RAND_bytes` call. OpenSSL 3's DRBG has a fixed cost per call (a lock, a
    /// fork check, and re-keying its AES state after every request) of about 0.6 µs, as much
    /// as the rest of a 16 KiB seal's overhead; per byte it is cheap. Drawing ahead is safe
    /// because a nonce is not secret (it is stored in the clear next to its extent and
    /// derives nothing without the master key): what must never happen is handing the same
    /// bytes out twice. Within a thread the buffer is consumed once; across a fork the child
    /// would inherit the same unused bytes as the parent, so a fork discards the buffer.
    package static let nonceBatchBytes = 1024

    /// Fills `out` (at most `nonceBatchBytes`) with bytes from OpenSSL's CSPRNG not given out before.
    package func takeNonce(_ out: UnsafeMutableRawBufferPointer) {
        precondition(out.count <= Self.nonceBatchBytes)
        let generation = ForkWatch.shared.generation
        if noncesUsed + out.count > nonces.count || generation != noncesForkGeneration {
            OpenSSL.fillRandom(nonces)
            noncesUsed = 0
            noncesForkGeneration = generation
        }
        let source = UnsafeMutableRawBufferPointer(rebasing: nonces[noncesUsed..<(noncesUsed + out.count)])
        out.copyMemory(from: UnsafeRawBufferPointer(source))
        // Not secret, but zeroed so a bug that read the same bytes again would show as zeros.
        source.initializeMemory(as: UInt8.self, repeating: 0)
        noncesUsed += out.count
    }

    private static let perThread = PerThread { ThreadContexts() }

    /// Runs `body` with the calling thread's contexts without a retain and release (the per-extent
    /// path; see `PerThread.withCurrent`).
    @inline(__always)
    package static func withCurrent<R>(_ body: (ThreadContexts) -> R) -> R { perThread.withCurrent(body) }

    /// The calling thread's contexts. Never hand the result to another thread.
    package static var current: ThreadContexts { perThread.current }
}

/// Counts forks, so a child process never reuses random bytes its parent drew ahead.
///
/// Invariant making this `@unchecked Sendable`: only the atomic is mutable.
package final class ForkWatch: @unchecked Sendable {
    package static let shared = ForkWatch()
    private static let forks = Atomic<UInt64>(0)

    private init() {
        // Registered before any nonce is drawn ahead (the first draw reads `shared`).
        let rc = pthread_atfork(nil, nil, { ForkWatch.forks.add(1, ordering: .relaxed) })
        precondition(rc == 0, "pthread_atfork failed: \(rc)")
    }

    package var generation: UInt64 { Self.forks.load(ordering: .relaxed) }
}

/// Algorithm objects fetched once. Fetching per call costs a provider lookup under a lock.
///
/// Invariant making this `@unchecked Sendable`: the pointers are set in `init` and the fetched
/// algorithm objects are immutable and reference-counted by OpenSSL, safe to share.
package final class Algorithms: @unchecked Sendable {
    package static let shared = Algorithms()
    package let aes256gcm: OpaquePointer
    package let aes256siv: OpaquePointer
    package let sha256: OpaquePointer
    package let hmac: OpaquePointer
    package let hkdf: OpaquePointer
    package let scrypt: OpaquePointer

    private init() {
        func need<T>(_ value: T?, _ what: String) -> T {
            guard let value else { fatalError("OpenSSL 3 lacks \(what); encfsd cannot run") }
            return value
        }
        aes256gcm = need(EVP_CIPHER_fetch(nil, "AES-256-GCM", nil), "AES-256-GCM")
        aes256siv = need(EVP_CIPHER_fetch(nil, "AES-256-SIV", nil), "AES-256-SIV")
        sha256 = need(EVP_MD_fetch(nil, "SHA256", nil), "SHA-256")
        hmac = need(EVP_MAC_fetch(nil, "HMAC", nil), "HMAC")
        hkdf = need(EVP_KDF_fetch(nil, "HKDF", nil), "HKDF")
        scrypt = need(EVP_KDF_fetch(nil, "SCRYPT", nil), "scrypt")
    }
}

/// A digest an HMAC context is fixed to when created.
package enum DigestName {
    case sha256, sha512

    /// Runs `body` with the parameter list {digest: self, end}. OpenSSL takes the name as a
    /// `char *`: it gets a copy on the stack, not a constant handed out writable.
    package func withParameters<R>(_ body: (UnsafeMutablePointer<OSSL_PARAM>) -> R) -> R {
        var name: (CChar, CChar, CChar, CChar, CChar, CChar, CChar) =
            self == .sha256 ? (83, 72, 65, 50, 53, 54, 0) : (83, 72, 65, 53, 49, 50, 0) // "SHA256", "SHA512"
        return withUnsafeMutablePointer(to: &name) { namePtr in
            withUnsafeTemporaryAllocation(of: OSSL_PARAM.self, capacity: 2) { params in
                params[0] = OSSL_PARAM_construct_utf8_string(
                    ParamName.digest, UnsafeMutableRawPointer(namePtr).assumingMemoryBound(to: CChar.self), 0)
                params[1] = OSSL_PARAM_construct_end()
                return body(params.baseAddress!)
            }
        }
    }
}
