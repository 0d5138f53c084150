import EncCrypto
import EncKeys

/// RFC 4648 base64url without padding: the backing-name alphabet. It has no '.', so every
/// backing name starting with '.' (".d", "encfsd.conf") can never collide with an entry.
public enum Base64URL {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)
    private static let reverse: [UInt8] = {
        var table = [UInt8](repeating: 0xff, count: 256)
        for (i, c) in alphabet.enumerated() { table[Int(c)] = UInt8(i) }
        return table
    }()

    public static func encode(_ bytes: [UInt8]) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity((bytes.count * 4 + 2) / 3)
        var i = 0
        while i + 3 <= bytes.count {
            let v = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8 | UInt32(bytes[i + 2])
            out += [alphabet[Int(v >> 18 & 63)], alphabet[Int(v >> 12 & 63)], alphabet[Int(v >> 6 & 63)], alphabet[Int(v & 63)]]
            i += 3
        }
        let rest = bytes.count - i
        if rest == 1 {
            let v = UInt32(bytes[i]) << 16
            out += [alphabet[Int(v >> 18 & 63)], alphabet[Int(v >> 12 & 63)]]
        } else if rest == 2 {
            let v = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8
            out += [alphabet[Int(v >> 18 & 63)], alphabet[Int(v >> 12 & 63)], alphabet[Int(v >> 6 & 63)]]
        }
        return out
    }

    /// Decodes canonical base64url; nil for any other input (wrong alphabet, length, or
    /// non-zero trailing bits), so two different names never decode to the same bytes.
    public static func decode(_ text: some Collection<UInt8>) -> [UInt8]? {
        // Every listed entry's name is decoded: in place when the bytes are contiguous.
        if let decoded = text.withContiguousStorageIfAvailable({ decode(contiguous: $0) }) { return decoded }
        return Array(text).withUnsafeBufferPointer { decode(contiguous: $0) }
    }

    private static func decode(contiguous chars: UnsafeBufferPointer<UInt8>) -> [UInt8]? {
        guard chars.count % 4 != 1 else { return nil }
        let decodedCount = chars.count * 6 / 8
        var valid = true
        let out = reverse.withUnsafeBufferPointer { table in
            [UInt8](unsafeUninitializedCapacity: decodedCount) { buffer, initialized in
                var acc: UInt32 = 0, bits: UInt32 = 0, written = 0
                for c in chars {
                    let v = table[Int(c)]
                    if v == 0xff { valid = false; break }
                    acc = acc << 6 | UInt32(v)
                    bits += 6
                    if bits >= 8 {
                        bits -= 8
                        buffer[written] = UInt8(truncatingIfNeeded: acc >> bits)
                        written += 1
                    }
                }
                // Non-zero bits left over would let two encodings name the same bytes.
                if valid && acc & ((1 << bits) - 1) != 0 { valid = false }
                initialized = written
            }
        }
        return valid ? out : nil
    }
}
