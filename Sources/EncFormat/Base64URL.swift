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

    /// Written in place: every lookup and create encodes a name (appending four-element arrays
    /// allocated one per three bytes).
    public static func encode(_ bytes: [UInt8]) -> [UInt8] {
        let encodedCount = (bytes.count * 4 + 2) / 3
        return alphabet.withUnsafeBufferPointer { table in
            bytes.withUnsafeBufferPointer { input in
                [UInt8](unsafeUninitializedCapacity: encodedCount) { out, initialized in
                    var i = 0, o = 0
                    while i + 3 <= input.count {
                        let v = UInt32(input[i]) << 16 | UInt32(input[i + 1]) << 8 | UInt32(input[i + 2])
                        out[o] = table[Int(v >> 18 & 63)]
                        out[o + 1] = table[Int(v >> 12 & 63)]
                        out[o + 2] = table[Int(v >> 6 & 63)]
                        out[o + 3] = table[Int(v & 63)]
                        i += 3
                        o += 4
                    }
                    let rest = input.count - i
                    if rest > 0 {
                        let v = UInt32(input[i]) << 16 | (rest == 2 ? UInt32(input[i + 1]) << 8 : 0)
                        out[o] = table[Int(v >> 18 & 63)]
                        out[o + 1] = table[Int(v >> 12 & 63)]
                        if rest == 2 { out[o + 2] = table[Int(v >> 6 & 63)] }
                        o += rest + 1
                    }
                    initialized = o
                }
            }
        }
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
