import Locking
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// The largest size a file may have, and the one check of it: a write, truncate or fallocate
/// past it fails at the call with EFBIG, so no write is acknowledged that a commit could not
/// store (a write past what the backing file can hold used to succeed and then fail at close,
/// its data lost).
///
/// The limit is the smaller of the format's (`ObjectHeader.maximumSize`, 2^50) and the largest
/// plaintext whose backing file the backing filesystem can hold, which depends on the file's
/// extent size (each extent carries 32 bytes of nonce and tag). ext4 with 4 KiB blocks holds
/// files up to 16 TiB − 4 KiB, well short of 2^50 bytes plus overhead.
enum SizeLimit {
    static let format = ObjectHeader.maximumSize

    /// The largest backing length any file can need: a file of the format's largest size at the
    /// smallest extent size. A filesystem that holds this much needs no closer look.
    static let largestBacking = ExtentGeometry(extentSize: ExtentGeometry.allowedExtentSizes.lowerBound).backingLength(size: format)

    /// Largest size for a file of `geometry` in the filesystem of `directory` (any descriptor of
    /// a directory in the store's filesystem: the probe makes an unnamed file there). `device`:
    /// that filesystem's, when the caller knows it (the volume stats its journal directory once
    /// at mount), which saves an `fstat` per file opened for writing.
    static func maximumSize(_ geometry: ExtentGeometry, device: UInt64?, directory: borrowing FileDescriptor) -> UInt64 {
        min(format, geometry.largestSize(backingLength: backingLimit(device: device, directory: directory)))
    }

    /// Probed filesystem limits, by device: probed once per filesystem, not per file.
    private static let probed = Lock<[UInt64: Int64]>([:])

    /// The largest backing file the filesystem holds (capped at `largestBacking`).
    static func backingLimit(device known: UInt64? = nil, directory: borrowing FileDescriptor) -> Int64 {
        guard let device = known ?? (try? directory.fstat()).map({ UInt64($0.st_dev) }) else { return largestBacking }
        if let known = probed.withLock({ $0[device] }) { return known }
        guard let limit = directory.probeLargestFile(upTo: largestBacking) else { return largestBacking }
        probed.withLock { $0[device] = limit }
        return limit
    }
}

extension ExtentFile {
    /// The end of `[offset, offset + length)`; EFBIG if this file may not reach it.
    func checkedEnd(offset: UInt64, length: UInt64) throws -> UInt64 {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= size || end <= maximumSize else { throw StoreError.fileTooLarge }
        return end
    }
}
