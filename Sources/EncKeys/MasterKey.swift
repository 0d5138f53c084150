import Locking
import Synchronization
import EncCrypto

/// A master key and the subkeys encfsd derives from it once, all in locked memory.
///
/// Open files hold a strong reference to the `MasterKey` of their policy. Removing a key only
/// drops the key table's reference, so files already open keep working (fscrypt's soft
/// removal); when the last reference goes, `SecureBytes.deinit` wipes every byte.
public final class MasterKey: Sendable {
    public static let minimumCount = 16
    public static let maximumCount = 64

    public let identifier: KeyIdentifier
    /// Unique to this instance for the life of the process, never reused: it names this key's
    /// keyed HMAC and SIV state in each thread's cache (see `KeyedContextCache`). Two instances made from
    /// the same raw key get different serials; that costs one extra keying, never a wrong key.
    package let instanceSerial: UInt64
    private static let serials = Atomic<UInt64>(0)
    /// Told when this key has been wiped (set when the key is removed from its table).
    private let wipeObserver = Lock<(@Sendable () -> Void)?>(nil)
    /// HKDF-Extract(no salt, raw key): kept so each per-extent derivation is one HMAC.
    private let prk: SecureBytes
    private let nameKeyBytes: SecureBytes
    private let xattrKeyBytes: SecureBytes
    private let nameMemo = NameSealMemo()

    public enum Invalid: Error, Equatable { case size(Int) }

    /// What a master key yields: the only state a `MasterKey` keeps.
    private struct Derived {
        package let identifier: KeyIdentifier
        package let prk: SecureBytes
        package let nameKey: SecureBytes
        package let xattrKeys: SecureBytes
    }

    /// No copy of the raw key is kept: only what is derived from it, all in locked memory.
    private static func derive(_ bytes: UnsafeRawBufferPointer) throws(Invalid) -> Derived {
        guard (minimumCount...maximumCount).contains(bytes.count) else { throw .size(bytes.count) }
        let prk = SecureBytes(count: 64) { OpenSSL.hkdfExtractSHA512(ikm: bytes, into: $0) }
        func expand(_ context: HKDFContext, _ count: Int) -> SecureBytes {
            SecureBytes(count: count) { out in
                let info = HKDFInfo.make(context)
                prk.withBytes { p in info.withUnsafeBytes { OpenSSL.hkdfExpandSHA512(prk: p, info: $0, into: out) } }
            }
        }
        return Derived(identifier: KeyIdentifier(rawKey: bytes), prk: prk,
                       nameKey: expand(.nameKey, 64), xattrKeys: expand(.xattrKey, 96))
    }

    private init(_ derived: Derived) {
        instanceSerial = Self.serials.add(1, ordering: .relaxed).newValue
        identifier = derived.identifier
        prk = derived.prk
        nameKeyBytes = derived.nameKey
        xattrKeyBytes = derived.xattrKeys
    }

    public convenience init(raw bytes: UnsafeRawBufferPointer) throws(Invalid) {
        self.init(try Self.derive(bytes))
    }

    public convenience init(raw bytes: [UInt8]) throws(Invalid) {
        // withUnsafeBytes rethrows untyped errors: carry the typed one out as a value.
        let derived: Result<Derived, Invalid> = bytes.withUnsafeBytes { b in Result { () throws(Invalid) in try Self.derive(b) } }
        self.init(try derived.get())
    }

    /// Derives the 32-byte key and 12-byte IV of one extent seal into `output[0..<44]`.
    /// The info string is built on the stack: this runs once per extent. 44 bytes is within one
    /// HKDF-SHA512 block, so this takes the keyed-HMAC path. `output` may be up to 64 bytes: HKDF
    /// output is a prefix of any longer one, so the first 44 are the same, and a whole block
    /// saves copying it out of a scratch buffer.
    public func deriveExtentKey(nonce: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) {
        precondition(nonce.count == 16 && (44...64).contains(output.count))
        expandKeyed(.extentKey, nonce, into: output)
    }

    /// Runs `body` with the 32-byte header MAC key of one object; the key is wiped afterwards.
    public func withHeaderKey<R>(objectID: [UInt8], _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try withUnsafeTemporaryAllocation(byteCount: 32, alignment: 16) { key in
            defer { OpenSSL.cleanse(key) }
            objectID.withUnsafeBytes { expandKeyed(.headerKey, $0, into: key) }
            return try body(UnsafeRawBufferPointer(key))
        }
    }

    /// HKDF-Expand(PRK, "fscrypt\0" || `context` || `data`) into `output` (at most one block) on
    /// this thread's HMAC keyed with the PRK, the info built on the stack: per extent and per
    /// header read.
    private func expandKeyed(_ context: HKDFContext, _ data: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) {
        withUnsafeTemporaryAllocation(byteCount: 9 + data.count, alignment: 1) { info in
            info.copyMemory(from: UnsafeRawBufferPointer(start: HKDFInfo.prefixPointer, count: 8))
            info[8] = context.rawValue
            UnsafeMutableRawBufferPointer(rebasing: info[9...]).copyMemory(from: data)
            prk.withBytes {
                OpenSSL.hkdfExpandSHA512(keyedAs: instanceSerial, prk: $0, info: UnsafeRawBufferPointer(info), into: output)
            }
        }
    }

    /// Runs `body` with the 32-byte AES-256-GCM key and 12-byte IV of one xattr side object seal
    /// (context 0x84 with the seal's nonce); both are wiped afterwards.
    public func withXattrSideObjectKey<R>(nonce: [UInt8], _ body: (_ key: UnsafeRawBufferPointer, _ iv: UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        precondition(nonce.count == 16)
        return try withUnsafeTemporaryAllocation(byteCount: 44, alignment: 16) { out in
            defer { OpenSSL.cleanse(out) }
            let info = HKDFInfo.make(.xattrSideObjectKey, nonce)
            prk.withBytes { p in info.withUnsafeBytes { OpenSSL.hkdfExpandSHA512(prk: p, info: $0, into: out) } }
            return try body(UnsafeRawBufferPointer(rebasing: out[0..<32]), UnsafeRawBufferPointer(rebasing: out[32..<44]))
        }
    }

    public func withNameKey<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try nameKeyBytes.withBytes(body)
    }

    /// The extended-attribute keys: AES-256-SIV key (first 64 bytes) and HMAC key (last 32).
    public func withXattrKeys<R>(_ body: (_ siv: UnsafeRawBufferPointer, _ hmac: UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try xattrKeyBytes.withBytes { try body(UnsafeRawBufferPointer(rebasing: $0[0..<64]), UnsafeRawBufferPointer(rebasing: $0[64...])) }
    }

    /// This key's AES-256-SIV keys (FORMAT.md 3.3).
    public enum SIVKey: UInt8, Sendable {
        case names = 0
        /// The first 64 bytes of the xattr keys.
        case xattrs = 1
    }

    /// AES-256-SIV seal (synthetic IV || ciphertext) under one of this key's SIV keys, on a
    /// template this thread keyed once for it: names are sealed on every lookup and create, and
    /// remembered (`NameSealMemo`).
    public func sivSeal(_ which: SIVKey, ad: [UInt8], plaintext: [UInt8]) throws(CryptoError) -> [UInt8] {
        if which == .names, let known = nameMemo.sealed(ad: ad, plaintext: plaintext) { return known }
        let sealed = try withSIVKey(which) { k in
            Result { () throws(CryptoError) in
                try OpenSSL.sivSeal(keyedAs: instanceSerial, subkey: which.rawValue, key: k, ad: ad, plaintext: plaintext)
            }
        }.get()
        if which == .names { nameMemo.remember(ad: ad, plaintext: plaintext, sealed: sealed) }
        return sealed
    }

    /// AES-256-SIV open under one of this key's SIV keys (see `sivSeal`): names are opened for
    /// every entry listed. Only a ciphertext that authenticated is remembered.
    public func sivOpen(_ which: SIVKey, ad: [UInt8], sealed: [UInt8]) throws(CryptoError) -> [UInt8] {
        if which == .names, let known = nameMemo.opened(ad: ad, sealed: sealed) { return known }
        let opened = try withSIVKey(which) { k in
            Result { () throws(CryptoError) in
                try OpenSSL.sivOpen(keyedAs: instanceSerial, subkey: which.rawValue, key: k, ad: ad, sealed: sealed)
            }
        }.get()
        if which == .names { nameMemo.remember(ad: ad, plaintext: opened, sealed: sealed) }
        return opened
    }

    /// How many names the memo holds each way (for tests).
    package var rememberedNames: (seals: Int, opens: Int) { nameMemo.count }

    private func withSIVKey<R>(_ which: SIVKey, _ body: (UnsafeRawBufferPointer) -> R) -> R {
        switch which {
        case .names: nameKeyBytes.withBytes(body)
        case .xattrs: xattrKeyBytes.withBytes { body(UnsafeRawBufferPointer(rebasing: $0[0..<64])) }
        }
    }

    package func setWipeObserver(_ observer: @escaping @Sendable () -> Void) {
        wipeObserver.withLock { $0 = observer }
    }

    deinit {
        // The SecureBytes members wipe themselves as they are released right after this. Runs on
        // whichever thread dropped the last reference: never inside the key table's lock (every
        // strong reference taken under it is released outside), since the observer takes it.
        // The threads' HMAC states and SIV templates keyed with its keys are secrets too: freed (and wiped by
        // OpenSSL) before the observer reports the key gone.
        OpenSSL.forgetKeyedContexts(serial: instanceSerial)
        let observer = wipeObserver.withLock { $0 }
        observer?()
    }
}

extension HKDFInfo {
    /// "fscrypt\0" as a static pointer, for building info strings without allocating.
    package static var prefixPointer: UnsafeRawPointer { UnsafeRawPointer(("fscrypt\0" as StaticString).utf8Start) }
}
