import EncCrypto
import EncKeys

/// A plaintext name's encrypted forms.
public struct EncryptedName: Equatable, Sendable {
    /// AES-256-SIV output: synthetic IV (16) || ciphertext of the padded name.
    public let ciphertext: [UInt8]
    /// The name of the backing entry: base64url(ciphertext), or "~" + base64url(SHA-256(ciphertext))
    /// when that would exceed 255 bytes.
    public let backingName: [UInt8]
    public var isLong: Bool { backingName.first == NameCodec.longPrefix }
}

/// Name encryption: deterministic within a directory (so lookup is one computation, no scan),
/// different across directories (the directory ID is SIV's associated data), authenticated.
///
/// Names are padded with NUL to a multiple of 32 bytes before encryption, as fscrypt pads by
/// default, so entry names leak only a coarse length.
public enum NameCodec {
    public static let maximumNameBytes = 255
    package static let paddingGranule = 32
    package static let longPrefix = UInt8(ascii: "~")
    /// Largest ciphertext stored directly: 16 + 160 bytes is 235 base64url characters.
    package static let maximumShortCiphertext = 16 + 160

    /// Checks a name the kernel handed us; the kernel already refuses "/" and NUL, but a
    /// defensive check keeps a hostile caller from creating unreadable entries.
    public static func validate(_ name: [UInt8]) throws {
        guard !name.isEmpty, name != [0x2e], name != [0x2e, 0x2e], !name.contains(0), !name.contains(0x2f)
        else { throw FormatError.invalidName }
        guard name.count <= maximumNameBytes else { throw FormatError.nameTooLong }
    }

    public static func encrypt(_ name: [UInt8], directoryID: [UInt8], key: MasterKey) throws -> EncryptedName {
        try validate(name)
        let paddedCount = (name.count + paddingGranule - 1) / paddingGranule * paddingGranule
        let padded = name + [UInt8](repeating: 0, count: paddedCount - name.count)
        let sealed: [UInt8]
        do {
            sealed = try key.sivSeal(.names, ad: directoryID, plaintext: padded)
        } catch {
            throw FormatError.integrity("name encryption failed: \(error)")
        }
        return EncryptedName(ciphertext: sealed, backingName: backingName(forCiphertext: sealed))
    }

    public static func backingName(forCiphertext c: [UInt8]) -> [UInt8] {
        if c.count <= maximumShortCiphertext { return Base64URL.encode(c) }
        return [longPrefix] + Base64URL.encode(OpenSSL.sha256(c))
    }

    /// The ciphertext carried by a short backing name; nil for long names and foreign files.
    public static func ciphertext(ofShortBackingName name: [UInt8]) -> [UInt8]? {
        guard name.first != longPrefix, let c = Base64URL.decode(name), c.count > 16,
              c.count <= maximumShortCiphertext, (c.count - 16) % paddingGranule == 0 else { return nil }
        return c
    }

    /// A ciphertext that can only be stored as a long name: longer than a short name holds,
    /// padded like every name, of a name of at most 255 bytes.
    package static func isValidLongCiphertext(_ c: [UInt8]) -> Bool {
        c.count > maximumShortCiphertext && (c.count - 16) % paddingGranule == 0 && c.count - 16 <= 256
    }

    public static func isLongBackingName(_ name: [UInt8]) -> Bool {
        name.count == 44 && name.first == longPrefix && Base64URL.decode(name.dropFirst())?.count == 32
    }

    /// Whether a backing directory entry is one encfsd made (as opposed to its own metadata
    /// files, which start with '.', or something foreign).
    public static func isEntryName(_ name: [UInt8]) -> Bool {
        isLongBackingName(name) || ciphertext(ofShortBackingName: name) != nil
    }

    public static func decrypt(ciphertext: [UInt8], directoryID: [UInt8], key: MasterKey) throws -> [UInt8] {
        let padded: [UInt8]
        do {
            padded = try key.sivOpen(.names, ad: directoryID, sealed: ciphertext)
        } catch {
            throw FormatError.integrity("name failed authentication")
        }
        let end = padded.firstIndex(of: 0) ?? padded.count
        let name = Array(padded[0..<end])
        guard padded[end...].allSatisfy({ $0 == 0 }), (try? validate(name)) != nil else {
            throw FormatError.integrity("name has invalid padding")
        }
        return name
    }
}
