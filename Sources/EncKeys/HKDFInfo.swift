import EncCrypto

/// HKDF "info" strings. Every derivation from a master key uses HKDF-SHA512 with no salt and
/// info = "fscrypt\0" || context byte || context data, the construction of Linux fscrypt v2.
///
/// 0x01 is the kernel's key-identifier context, reused so identifiers match the kernel's. The
/// other contexts are encfsd's own, taken from 0x80 upwards so they can never collide with a
/// context the kernel defines (it uses 1 to 8 today): a master key shared with a kernel fscrypt
/// policy never yields the same subkey in both systems.
public enum HKDFContext: UInt8, Sendable {
    case keyIdentifier = 0x01
    /// Per-extent AES-256-GCM key and IV; context data is the extent's 16-byte random nonce.
    case extentKey = 0x80
    /// Per-object header MAC key; context data is the object's 16-byte identifier.
    case headerKey = 0x81
    /// Per-master-key AES-256-SIV name key (64 bytes); the directory is bound through SIV's AD.
    case nameKey = 0x82
    /// Per-master-key extended-attribute keys (96 bytes): AES-256-SIV key (64) || HMAC key (32).
    case xattrKey = 0x83
    /// v3: per-seal AES-256-GCM key and IV of an xattr side object (44 bytes); context data is the
    /// seal's 16-byte random nonce, as for extents, under a context of its own.
    case xattrSideObjectKey = 0x84
}

public enum HKDFInfo {
    package static let prefix: [UInt8] = Array("fscrypt".utf8) + [0]

    public static func make(_ context: HKDFContext, _ data: [UInt8] = []) -> [UInt8] {
        prefix + [context.rawValue] + data
    }
}
