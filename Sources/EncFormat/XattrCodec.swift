import EncCrypto
import EncKeys

/// Encoding of user extended attributes as backing xattrs (FORMAT.md section 8).
///
/// Backing name: "user.encfsd." + base64url(first 24 bytes of HMAC-SHA256(xattr HMAC key, "xattr"
/// || object ID || attribute name)): fixed length whatever the attribute name's length. Value:
/// AES-256-SIV under the xattr SIV key, associated data object ID || backing name, over (name
/// length, name, value), so a value moved to another attribute or object fails to open, and a
/// listing recovers the names. Both keys come from their own HKDF context (0x83).
public enum XattrCodec {
    public static let backingPrefix = "user.encfsd."

    public static func backingName(_ name: [UInt8], objectID: [UInt8], key: MasterKey) -> String {
        let mac = key.withXattrKeys { _, hmacKey in OpenSSL.hmacSHA256(key: hmacKey, Array("xattr".utf8), objectID, name) }
        return backingPrefix + String(decoding: Base64URL.encode(Array(mac.prefix(24))), as: UTF8.self)
    }

    public static func seal(name: [UInt8], value: [UInt8], objectID: [UInt8], backingName: String, key: MasterKey) throws -> [UInt8] {
        precondition(name.count <= 255)
        let plaintext = [UInt8(name.count)] + name + value
        return try key.sivSeal(.xattrs, ad: objectID + Array(backingName.utf8), plaintext: plaintext)
    }

    /// The attribute's name and value; `FormatError.integrity` when the value does not open.
    public static func open(_ sealed: [UInt8], objectID: [UInt8], backingName: String, key: MasterKey) throws -> ([UInt8], [UInt8]) {
        let plain: [UInt8]
        do {
            plain = try key.sivOpen(.xattrs, ad: objectID + Array(backingName.utf8), sealed: sealed)
        } catch {
            throw FormatError.integrity("xattr failed authentication")
        }
        guard let count = plain.first.map(Int.init), plain.count >= 1 + count else {
            throw FormatError.integrity("xattr is malformed")
        }
        return (Array(plain[1..<(1 + count)]), Array(plain[(1 + count)...]))
    }
}
