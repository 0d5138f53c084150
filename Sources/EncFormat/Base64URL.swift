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

    /// Four characters to three bytes at a time, as `encode` writes them: every listing decodes
    /// each entry's name.
    private static func decode(contiguous chars: UnsafeBufferPointer<UInt8>) -> [UInt8]? {
        let rest = chars.count % 4
        guard rest != 1 else { return nil }
        let decodedCount = chars.count / 4 * 3 + (rest == 0 ? 0 : rest - 1)
        var valid = true
        let out = reverse.withUnsafeBufferPointer { table in
            [UInt8](unsafeUninitializedCapacity: decodedCount) { buffer, initialized in
                // A character outside the alphabet maps to 0xff, so any high bit in the OR of a
                // group's values rejects it.
                func value(_ i: Int) -> UInt32 { UInt32(table[Int(chars[i])]) }
                var i = 0, o = 0
                while i + 4 <= chars.count {
                    let a = value(i), b = value(i + 1), c = value(i + 2), d = value(i + 3)
                    guard (a | b | c | d) < 64 else { valid = false; break }
                    let v = a << 18 | b << 12 | c << 6 | d
                    buffer[o] = UInt8(truncatingIfNeeded: v >> 16)
                    buffer[o + 1] = UInt8(truncatingIfNeeded: v >> 8)
                    buffer[o + 2] = UInt8(truncatingIfNeeded: v)
                    i += 4
                    o += 3
                }
                if valid && rest > 0 {
                    let a = value(i), b = value(i + 1), c = rest == 3 ? value(i + 2) : 0
                    // Non-zero bits past the last byte would let two encodings name the same bytes.
                    let leftover = rest == 2 ? b & 0x0f : c & 0x03
                    if (a | b | c) < 64 && leftover == 0 {
                        let v = a << 18 | b << 12 | c << 6
                        buffer[o] = UInt8(truncatingIfNeeded: v >> 16)
                        if rest == 3 { buffer[o + 1] = UInt8(truncatingIfNeeded: v >> 8) }
                        o += rest - 1
                    } else {
                        valid = false
                    }
                }
                initialized = o
            }
        }
        return valid ? out : nil
    }
}
