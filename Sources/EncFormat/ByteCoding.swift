import EncCrypto
import EncKeys

/// Little-endian field writer for the fixed binary layouts of FORMAT.md.
package struct ByteWriter {
    package private(set) var bytes: [UInt8] = []

    package init(capacity: Int = 0) { bytes.reserveCapacity(capacity) }

    package mutating func u8(_ v: UInt8) { bytes.append(v) }
    package mutating func u16(_ v: UInt16) { append(v) }
    package mutating func u32(_ v: UInt32) { append(v) }
    package mutating func u64(_ v: UInt64) { append(v) }
    package mutating func raw(_ v: [UInt8]) { bytes.append(contentsOf: v) }
    package mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }

    private mutating func append<T: FixedWidthInteger>(_ v: T) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }
}

/// Bounds-checked little-endian reader; every read past the end returns nil, so a truncated or
/// hostile header can never make the parser trap.
package struct ByteReader {
    private let bytes: ArraySlice<UInt8>
    package private(set) var position: Int

    package init(_ bytes: ArraySlice<UInt8>) {
        self.bytes = bytes
        position = bytes.startIndex
    }

    package mutating func u8() -> UInt8? { read(UInt8.self) }
    package mutating func u16() -> UInt16? { read(UInt16.self) }
    package mutating func u32() -> UInt32? { read(UInt32.self) }
    package mutating func u64() -> UInt64? { read(UInt64.self) }

    package mutating func raw(_ n: Int) -> [UInt8]? {
        guard n >= 0, position + n <= bytes.endIndex else { return nil }
        defer { position += n }
        return Array(bytes[position..<(position + n)])
    }

    /// Skips `n` bytes if they are all zero (reserved fields), without copying them out.
    package mutating func zeros(_ n: Int) -> Bool {
        guard n >= 0, position + n <= bytes.endIndex, isAllZero(bytes[position..<(position + n)]) else { return false }
        position += n
        return true
    }

    /// Skips `expected.count` bytes if they equal `expected` (a magic number), without copying them out.
    package mutating func expect(_ expected: [UInt8]) -> Bool {
        let n = expected.count
        guard position + n <= bytes.endIndex, bytes[position..<(position + n)].elementsEqual(expected) else { return false }
        position += n
        return true
    }

    /// One unaligned load rather than a byte at a time: headers are decoded twice per lookup.
    private mutating func read<T: FixedWidthInteger>(_: T.Type) -> T? {
        let n = MemoryLayout<T>.size
        guard position + n <= bytes.endIndex else { return nil }
        let offset = position - bytes.startIndex
        let v = bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: offset, as: T.self) }
        position += n
        return T(littleEndian: v)
    }
}
