import EncCrypto
import EncKeys

/// Pure arithmetic between plaintext offsets, extent indices and backing offsets.
///
/// A backing file is two header slots followed by extents at a fixed stride, so any plaintext
/// offset maps to its extent without reading anything. Extent `i` holds plaintext bytes
/// `[i*E, min((i+1)*E, size))`; it is stored as nonce (16) || ciphertext || tag (16).
public struct ExtentGeometry: Sendable, Equatable {
    public static let headerSlotBytes = 2048
    public static let headerBytes = 2 * headerSlotBytes
    public static let nonceBytes = 16
    public static let tagBytes = 16
    public static let overheadBytes = nonceBytes + tagBytes
    public static let allowedExtentSizes: ClosedRange<Int> = 4096...(1 << 20)

    public let extentSize: Int
    /// Extents per key group (FORMAT.md 5.3): 1, every seal its own nonce; `groupedExtents` in an
    /// object whose header has the `keyGroups` flag, where the extents of one aligned group sealed
    /// together share a nonce and so one key derivation, each under its own IV.
    public let keyGroup: UInt64

    public static let groupedExtents: UInt64 = 16

    public init(extentSize: Int, keyGroups: Bool = false) {
        precondition(Self.isValid(extentSize: extentSize))
        self.extentSize = extentSize
        keyGroup = keyGroups ? Self.groupedExtents : 1
    }

    /// The member of its key group extent `index` is: the byte its IV's last byte is XORed with.
    public func keyGroupMember(_ index: UInt64) -> UInt8 { UInt8(truncatingIfNeeded: index % keyGroup) }

    /// The key group extent `index` belongs to.
    public func keyGroupIndex(_ index: UInt64) -> UInt64 { index / keyGroup }

    public static func isValid(extentSize: Int) -> Bool {
        allowedExtentSizes.contains(extentSize) && extentSize & (extentSize - 1) == 0
    }

    public var stride: Int { extentSize + Self.overheadBytes }

    /// Number of extents a file of `size` plaintext bytes has.
    public func extentCount(size: UInt64) -> UInt64 {
        (size + UInt64(extentSize) - 1) / UInt64(extentSize)
    }

    public func extentIndex(offset: UInt64) -> UInt64 { offset / UInt64(extentSize) }

    public func extentStart(_ index: UInt64) -> UInt64 { index * UInt64(extentSize) }

    /// Plaintext length of extent `index` in a file of `size` bytes (0 past the end).
    public func plaintextLength(_ index: UInt64, size: UInt64) -> Int {
        let start = extentStart(index)
        guard start < size else { return 0 }
        return Int(min(UInt64(extentSize), size - start))
    }

    public func backingOffset(_ index: UInt64) -> Int64 {
        Int64(Self.headerBytes) + Int64(index) * Int64(stride)
    }

    /// The largest plaintext size whose backing length (below) is at most `limit`: the inverse
    /// of `backingLength`, which grows with the size.
    public func largestSize(backingLength limit: Int64) -> UInt64 {
        let room = limit - Int64(Self.headerBytes)
        guard room > 0 else { return 0 }
        let whole = room / Int64(stride)
        // What is left past the whole extents holds a partial last extent of `rest - 32` bytes
        // (less than one extent, since `rest < stride`), if it holds its nonce and tag at all.
        let rest = room - whole * Int64(stride)
        return UInt64(whole) * UInt64(extentSize) + UInt64(max(0, rest - Int64(Self.overheadBytes)))
    }

    /// Backing file length that holds every extent of a `size`-byte file (holes included).
    public func backingLength(size: UInt64) -> Int64 {
        let count = extentCount(size: size)
        guard count > 0 else { return Int64(Self.headerBytes) }
        return backingOffset(count - 1) + Int64(plaintextLength(count - 1, size: size) + Self.overheadBytes)
    }
}
