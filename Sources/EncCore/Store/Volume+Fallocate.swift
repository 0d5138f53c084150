import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// What a fallocate(2) call asks for, decoded from its mode bits once.
public enum RangeOperation: Equatable, Sendable {
    case allocate(keepSize: Bool)
    case punchHole
    case zeroRange(keepSize: Bool)
    case collapse
    case insert

    /// nil for combinations this store does not offer (FALLOC_FL_UNSHARE_RANGE, write-zeroes):
    /// EOPNOTSUPP, as ext4 answers for modes it lacks.
    public init?(fallocateMode mode: Int32) {
        let keepSize = mode & Self.keepSizeBit != 0
        switch mode & ~Self.keepSizeBit {
        case 0: self = .allocate(keepSize: keepSize)
        case 0x02 where keepSize: self = .punchHole
        case 0x10: self = .zeroRange(keepSize: keepSize)
        case 0x08 where !keepSize: self = .collapse
        case 0x20 where !keepSize: self = .insert
        default: return nil
        }
    }

    private static let keepSizeBit: Int32 = 0x01
}

extension Volume {
    /// One fallocate(2) on an open file, committed as one flush transaction before it returns.
    ///
    /// A punch is made durable before the backing file gives the dropped extents' space back:
    /// until the header that makes them holes is on disk, the committed header still references
    /// them, and a crash after an early deallocation would read them as damaged.
    public func fallocate(handle: UInt64, _ operation: RangeOperation, offset: UInt64, length: UInt64) throws {
        try withOpenFile(try fileNode(handle: handle)) { state, file in
            // vfs_fallocate: nothing on an immutable file; on an append-only one only allocation
            // (which may grow it), never a mode that changes or moves what is there.
            let flags = state.header.inodeFlags
            let allocates = if case .allocate = operation { true } else { false }
            if flags.contains(.immutable) || (flags.contains(.appendOnly) && !allocates) { throw StoreError.notPermitted }
            switch operation {
            case .allocate(let keepSize):
                try file.allocate(offset: offset, length: length, keepSize: keepSize)
                try commit(file, &state)
            case .punchHole:
                let dropped = try file.punchHole(offset: offset, length: length)
                try commit(file, &state, durability: dropped.isEmpty ? .consistent : .data)
                try deallocate(dropped, of: file, holes: state.header.holes)
            case .zeroRange(let keepSize):
                // ext4 keeps the range allocated (unwritten extents): the backing space stays.
                try file.zeroRange(offset: offset, length: length, keepSize: keepSize)
                try commit(file, &state)
            case .collapse:
                try file.collapseRange(offset: offset, length: length)
                try commit(file, &state)
            case .insert:
                try file.insertRange(offset: offset, length: length)
                try commit(file, &state)
            }
        }
    }

    /// Gives back the backing space of extents that are holes in the durable header. A range the
    /// header could not hold as holes (stored as zeros, FORMAT.md 4.6) is left alone.
    private func deallocate(_ range: Range<UInt64>, of file: ExtentFile, holes: HoleMap) throws {
        let geometry = file.geometry
        for hole in holes.ranges {
            let lower = max(hole.lowerBound, range.lowerBound), upper = min(hole.upperBound, range.upperBound)
            guard lower < upper else { continue }
            let start = geometry.backingOffset(lower)
            let end = min(geometry.backingOffset(upper), geometry.backingLength(size: file.size))
            guard start < end else { continue }
            do {
                try file.backing.descriptor.fallocate(mode: Self.punchKeepingSize, offset: start, length: end - start)
            } catch StoreError.system(EOPNOTSUPP) {
                return // A backing filesystem without punching keeps the bytes: they are unreferenced.
            }
        }
    }

    private static let punchKeepingSize: Int32 = 0x03

    /// lseek(2) SEEK_DATA (`data`) or SEEK_HOLE from `offset` on an open file.
    public func seek(handle: UInt64, from offset: UInt64, data: Bool) throws -> UInt64 {
        try withOpenFile(try fileNode(handle: handle)) { _, file in try file.seek(from: offset, data: data) }
    }
}
