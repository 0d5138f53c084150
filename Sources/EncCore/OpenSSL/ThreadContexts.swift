import COpenSSL
#if canImport(Glibc)
import Glibc
#endif

/// The OpenSSL contexts one thread reuses for every seal, open and derivation.
///
/// Creating an `EVP_CIPHER_CTX` or `EVP_MAC_CTX` allocates; doing that per extent would put
/// malloc on the data path, and sharing one across threads would need a lock. Each libfuse
/// worker thread therefore gets its own set, created on first use and freed when the thread
/// exits (pthread key destructor).
final class ThreadContexts {
    let cipher: OpaquePointer
    let mac: OpaquePointer
    let kdf: OpaquePointer
    /// An HKDF context fixed to SHA-512 expand-only. Setting the digest by name makes OpenSSL
    /// fetch it again, which cost more than the HMAC itself; done once here, each per-extent
    /// derivation passes only key and info.
    let expand: OpaquePointer

    init() {
        guard let cipher = EVP_CIPHER_CTX_new(),
              let mac = EVP_MAC_CTX_new(Algorithms.shared.hmac),
              let kdf = EVP_KDF_CTX_new(Algorithms.shared.hkdf),
              let expand = EVP_KDF_CTX_new(Algorithms.shared.hkdf)
        else { fatalError("OpenSSL could not allocate a context: out of memory") }
        self.cipher = cipher
        self.mac = mac
        self.kdf = kdf
        self.expand = expand
        guard OpenSSL.configureExpandOnly(expand) else { fatalError("OpenSSL refused HKDF-SHA512 expand-only") }
    }

    deinit {
        EVP_CIPHER_CTX_free(cipher)
        EVP_MAC_CTX_free(mac)
        EVP_KDF_CTX_free(kdf)
        EVP_KDF_CTX_free(expand)
    }

    /// The calling thread's contexts. Never hand the result to another thread.
    static var current: ThreadContexts {
        let key = ThreadKey.shared.key
        if let raw = pthread_getspecific(key) {
            return Unmanaged<ThreadContexts>.fromOpaque(raw).takeUnretainedValue()
        }
        let fresh = ThreadContexts()
        pthread_setspecific(key, Unmanaged.passRetained(fresh).toOpaque())
        return fresh
    }
}

private func releaseThreadContexts(_ raw: UnsafeMutableRawPointer?) {
    guard let raw else { return }
    Unmanaged<ThreadContexts>.fromOpaque(raw).release()
}

/// Invariant making this `@unchecked Sendable`: `key` is written once in `init`, before
/// `shared` is published, and only read afterwards.
private final class ThreadKey: @unchecked Sendable {
    static let shared = ThreadKey()
    var key = pthread_key_t()
    private init() {
        let rc = pthread_key_create(&key, releaseThreadContexts)
        precondition(rc == 0, "pthread_key_create failed: \(rc)")
    }
}

/// Algorithm objects fetched once. Fetching per call costs a provider lookup under a lock.
///
/// Invariant making this `@unchecked Sendable`: the pointers are set in `init` and the fetched
/// algorithm objects are immutable and reference-counted by OpenSSL, safe to share.
final class Algorithms: @unchecked Sendable {
    static let shared = Algorithms()
    let aes256gcm: OpaquePointer
    let aes256siv: OpaquePointer
    let sha256: OpaquePointer
    let hmac: OpaquePointer
    let hkdf: OpaquePointer
    let scrypt: OpaquePointer

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
