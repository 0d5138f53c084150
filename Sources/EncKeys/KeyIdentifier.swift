import EncCrypto

/// The 16-byte identifier of a master key, computed exactly as Linux fscrypt v2 computes it, so
/// identifiers printed by encfsd match those of `fscryptctl` and xfstests for the same raw key.
public struct KeyIdentifier: Hashable, Sendable, CustomStringConvertible {
    public static let byteCount = 16
    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == Self.byteCount else { return nil }
        self.bytes = bytes
    }

    public init?(hex: String) {
        guard let decoded = Hex.decode(hex), decoded.count == Self.byteCount else { return nil }
        bytes = decoded
    }

    /// HKDF-SHA512(ikm = raw key, no salt, info = "fscrypt\0" || 0x01), 16 bytes.
    public init(rawKey: UnsafeRawBufferPointer) {
        var out = [UInt8](repeating: 0, count: Self.byteCount)
        out.withUnsafeMutableBytes { OpenSSL.hkdfSHA512(ikm: rawKey, info: HKDFInfo.make(.keyIdentifier), into: $0) }
        bytes = out
    }

    /// The bytes in one combine: the synthesized hash combines them one at a time, and the key
    /// table is asked several times per request.
    public func hash(into hasher: inout Hasher) {
        bytes.withUnsafeBytes { hasher.combine(bytes: $0) }
    }

    public static func == (a: Self, b: Self) -> Bool { a.bytes == b.bytes }

    public var hex: String { Hex.encode(bytes) }
    public var description: String { hex }
}

public enum Hex {
    public static func encode(_ bytes: some Sequence<UInt8>) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0xf)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    public static func decode(_ text: String) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 2 == 0 else { return nil }
        func nibble(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
            default: return nil
            }
        }
        var out = [UInt8]()
        out.reserveCapacity(chars.count / 2)
        var i = 0
        while i < chars.count {
            guard let hi = nibble(chars[i]), let lo = nibble(chars[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }
}
