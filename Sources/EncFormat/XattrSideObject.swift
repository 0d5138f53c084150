import EncCrypto
import EncKeys

/// The xattr side object of format v3 (FORMAT.md 16): one backing file per object generation,
/// `.xattrs/<object ID hex>.<generation hex>`, holding the attributes the backing file cannot
/// (a backing without user xattrs, or one whose xattr space is full) as one AES-256-GCM seal.
///
/// The header's `xattrGeneration` names the one generation that is current, and it is
/// authenticated: the seal's additional data binds object ID and generation, so a side object
/// that is stale (an older generation under the current name), swapped from another object, or
/// altered does not open.
public enum XattrSideObject {
    public static let magic: [UInt8] = Array("EFX3".utf8)
    public static let nonceBytes = 16
    /// Magic and nonce before the ciphertext, the GCM tag after it.
    public static let overheadBytes = 4 + nonceBytes + OpenSSL.gcmTagCount
    static let domain: [UInt8] = Array("encfsd xattr side object".utf8)
    /// Most plaintext bytes one side object holds (names, values and their framing): the
    /// per-object limit encfsd adds to what the backing file holds itself (ENOSPC past it, as ext4
    /// when its xattr block is full).
    public static let maximumPlaintext = 1 << 20
    /// The largest value of one attribute, ext4's (E2BIG past it).
    public static let maximumValue = 65536
    public static let maximumName = 255
    /// The largest file a reader accepts.
    public static let maximumFileBytes = overheadBytes + maximumPlaintext

    /// The backing file name of `generation` of the object `objectID`.
    public static func fileName(objectID: [UInt8], generation: UInt64) -> [UInt8] {
        Array((Hex.encode(objectID) + "." + hex16(generation)).utf8)
    }

    /// The object ID and generation a side object file name says, nil for any other name.
    public static func parse(fileName: [UInt8]) -> (objectID: [UInt8], generation: UInt64)? {
        let parts = fileName.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        guard parts.count == 2, parts[0].count == 32, parts[1].count == 16,
              let id = Hex.decode(String(decoding: parts[0], as: UTF8.self)), Hex.encode(id) == String(decoding: parts[0], as: UTF8.self),
              let generation = UInt64(String(decoding: parts[1], as: UTF8.self), radix: 16), hex16(generation) == String(decoding: parts[1], as: UTF8.self),
              generation != 0 else { return nil }
        return (id, generation)
    }

    private static func hex16(_ v: UInt64) -> String {
        let digits = String(v, radix: 16)
        return String(repeating: "0", count: 16 - digits.count) + digits
    }

    static func additionalData(objectID: [UInt8], generation: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: 48)
        w.raw(domain)
        w.raw(objectID)
        w.u64(generation)
        return w.bytes
    }

    /// The plaintext: u32 count, then per attribute (sorted by name, bytewise) u8 name length,
    /// name, u32 value length, value.
    public static func encode(_ attributes: [[UInt8]: [UInt8]]) -> [UInt8] {
        var w = ByteWriter(capacity: plaintextBytes(attributes))
        w.u32(UInt32(attributes.count))
        for name in attributes.keys.sorted(by: { $0.lexicographicallyPrecedes($1) }) {
            let value = attributes[name]!
            w.u8(UInt8(name.count))
            w.raw(name)
            w.u32(UInt32(value.count))
            w.raw(value)
        }
        return w.bytes
    }

    /// The plaintext's length, what `maximumPlaintext` bounds.
    public static func plaintextBytes(_ attributes: [[UInt8]: [UInt8]]) -> Int {
        attributes.reduce(4) { $0 + 5 + $1.key.count + $1.value.count }
    }

    static func decode(_ plain: [UInt8]) throws -> [[UInt8]: [UInt8]] {
        var r = ByteReader(plain[...])
        guard let count = r.u32() else { throw FormatError.integrity("xattr side object is malformed") }
        var attributes: [[UInt8]: [UInt8]] = [:]
        var previous: [UInt8]?
        for _ in 0..<count {
            guard let nameCount = r.u8(), nameCount > 0, let name = r.raw(Int(nameCount)), let valueCount = r.u32(),
                  valueCount <= maximumValue, let value = r.raw(Int(valueCount)),
                  previous.map({ $0.lexicographicallyPrecedes(name) }) ?? true else {
                throw FormatError.integrity("xattr side object is malformed")
            }
            attributes[name] = value
            previous = name
        }
        guard r.position == plain.endIndex else { throw FormatError.integrity("xattr side object is malformed") }
        return attributes
    }

    /// The file image of `generation` holding `attributes`, sealed under `key` with `nonce`
    /// (fresh random bytes; tests pass a fixed one for known answers).
    public static func seal(_ attributes: [[UInt8]: [UInt8]], objectID: [UInt8], generation: UInt64, key: MasterKey,
                            nonce: [UInt8] = OpenSSL.random(count: nonceBytes)) throws -> [UInt8] {
        let plain = encode(attributes)
        let ad = additionalData(objectID: objectID, generation: generation)
        var ciphertext = [UInt8](repeating: 0, count: plain.count)
        var tag = [UInt8](repeating: 0, count: OpenSSL.gcmTagCount)
        try key.withXattrSideObjectKey(nonce: nonce) { k, iv in
            try plain.withUnsafeBytes { p in
                try ad.withUnsafeBytes { a in
                    try ciphertext.withUnsafeMutableBytes { c in
                        try tag.withUnsafeMutableBytes { t in try OpenSSL.gcmSeal(key: k, iv: iv, ad: a, plaintext: p, ciphertext: c, tag: t) }
                    }
                }
            }
        }
        return magic + nonce + ciphertext + tag
    }

    /// The attributes of a side object file image; `FormatError.integrity` unless it is exactly
    /// `generation` of `objectID` sealed under `key`.
    public static func open(_ file: [UInt8], objectID: [UInt8], generation: UInt64, key: MasterKey) throws -> [[UInt8]: [UInt8]] {
        guard file.count >= overheadBytes + 4, file.count <= maximumFileBytes, file.starts(with: magic) else {
            throw FormatError.integrity("xattr side object is malformed")
        }
        let nonce = Array(file[4..<(4 + nonceBytes)])
        let ciphertext = file[(4 + nonceBytes)..<(file.count - OpenSSL.gcmTagCount)]
        let tag = file[(file.count - OpenSSL.gcmTagCount)...]
        let ad = additionalData(objectID: objectID, generation: generation)
        var plain = [UInt8](repeating: 0, count: ciphertext.count)
        do {
            try key.withXattrSideObjectKey(nonce: nonce) { k, iv in
                try ciphertext.withUnsafeBytes { c in
                    try tag.withUnsafeBytes { t in
                        try ad.withUnsafeBytes { a in
                            try plain.withUnsafeMutableBytes { p in try OpenSSL.gcmOpen(key: k, iv: iv, ad: a, ciphertext: c, tag: t, plaintext: p) }
                        }
                    }
                }
            }
        } catch {
            throw FormatError.integrity("xattr side object failed authentication")
        }
        return try decode(plain)
    }
}
