/// The inode-flag ioctls (linux/fs.h): FS_IOC_GETFLAGS/SETFLAGS, which chattr and lsattr use, and
/// FS_IOC_FSGETXATTR/FSSETXATTR, which the kernel's fileattr code asks a FUSE filesystem for on
/// its own (before every SETFLAGS it reads the old attributes that way) and xfs_io uses.
public enum FileAttrIoctl {
    private static func ioc(read: Bool, _ type: Character, _ number: UInt8, _ size: Int) -> UInt32 {
        ControlProtocol.ioc(read: read, write: !read, type: UInt8(ascii: type.unicodeScalars.first!), number: number, size: size)
    }

    /// FS_IOC_GETFLAGS is _IOR('f', 1, long); the kernel's fileattr path asks with a 4-byte int,
    /// and FS_IOC32_GETFLAGS is the int form by number too.
    public static let getFlags = ioc(read: true, "f", 1, 8)       // 0x80086601
    public static let getFlags32 = ioc(read: true, "f", 1, 4)     // 0x80046601
    public static let setFlags = ioc(read: false, "f", 2, 8)      // 0x40086602
    public static let setFlags32 = ioc(read: false, "f", 2, 4)    // 0x40046602
    public static let getXattr = ioc(read: true, "X", 31, FileAttributes.byteCount)   // 0x801c581f
    public static let setXattr = ioc(read: false, "X", 32, FileAttributes.byteCount)  // 0x401c5820

    /// FS_ENCRYPT_FL: reported for every object, never stored, never changed by SETFLAGS.
    public static let encryptFlag: UInt32 = 0x800

    /// The FS_XFLAG_* bit of each FS_*_FL flag that has one (FS_DIRSYNC_FL has none).
    static let extendedFlags: [(flag: UInt32, xflag: UInt32)] = [
        (0x8, 0x20),   // FS_SYNC_FL, FS_XFLAG_SYNC
        (0x10, 0x8),   // FS_IMMUTABLE_FL, FS_XFLAG_IMMUTABLE
        (0x20, 0x10),  // FS_APPEND_FL, FS_XFLAG_APPEND
        (0x40, 0x80),  // FS_NODUMP_FL, FS_XFLAG_NODUMP
        (0x80, 0x40),  // FS_NOATIME_FL, FS_XFLAG_NOATIME
    ]

    public static func xflags(of flags: UInt32) -> UInt32 {
        extendedFlags.reduce(0) { flags & $1.flag != 0 ? $0 | $1.xflag : $0 }
    }

    /// The FS_*_FL flags `xflags` stand for; nil if any bit has no flag encfsd keeps.
    public static func flags(ofXflags xflags: UInt32) -> UInt32? {
        let known = extendedFlags.reduce(0) { $0 | $1.xflag }
        guard xflags & ~known == 0 else { return nil }
        return extendedFlags.reduce(0) { xflags & $1.xflag != 0 ? $0 | $1.flag : $0 }
    }

    /// struct fsxattr (28 bytes): xflags, extent size hint, extent count, project ID, CoW extent
    /// size hint, 8 bytes of padding. encfsd keeps only the flags; the rest reads as zero and may
    /// be set only to zero.
    public struct FileAttributes: Equatable, Sendable {
        public static let byteCount = 28
        public var xflags: UInt32
        public init(xflags: UInt32) { self.xflags = xflags }

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: Self.byteCount)
            w.u32(xflags)
            w.zeros(Self.byteCount - 4)
            return w.bytes
        }

        /// nil unless every field but the flags is zero.
        public static func decode(_ bytes: [UInt8]) -> FileAttributes? {
            guard bytes.count == byteCount, bytes[4...].allSatisfy({ $0 == 0 }) else { return nil }
            var r = ByteReader(bytes[...])
            return r.u32().map { FileAttributes(xflags: $0) }
        }
    }
}
