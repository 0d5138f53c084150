import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif
import CLinux

/// What a backing object must be for the store to use it.
public enum BackingType: Sendable {
    case regularFile
    case directory

    var formatBits: mode_t { self == .directory ? S_IFDIR : S_IFREG }
}

/// How a backing object is opened once it has been found to be of the right type.
public enum BackingAccess: Sendable {
    /// O_PATH: stat, *at calls relative to a directory, and nothing else.
    case path
    case readOnly
    case readWrite

    var flags: Int32 {
        switch self {
        case .path: Sys.oPath
        case .readOnly: O_RDONLY
        case .readWrite: O_RDWR
        }
    }
}

/// The store boundary: every backing object the daemon or fsck opens is opened here.
///
/// The backing store is hostile input: whoever can write it may have planted symlinks (to files
/// anywhere on the machine), FIFOs (an open would block a worker), devices (an open may act on
/// hardware) or a directory where a file belongs. So an object is reached only as one name
/// relative to a directory descriptor the store already holds, resolved with `openat2`
/// (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, plus `O_NOFOLLOW`), first as
/// an O_PATH descriptor, which acts on nothing; only once `fstat` shows the expected type is it
/// reopened with real access. Anything else is `StoreError.integrity` (EIO) for that object only.
extension Sys {
    /// Whether this kernel has openat2; checked once (ENOSYS before Linux 5.6).
    private static let hasOpenat2: Bool = {
        let fd = encfsd_openat2(AT_FDCWD, "/", oPath | O_CLOEXEC, 0, encfsd_RESOLVE_NO_SYMLINKS)
        if fd >= 0 { Glibc.close(fd) }
        return fd >= 0 || errno != ENOSYS
    }()

    /// One path component that names an entry of the directory itself, never a walk elsewhere.
    static func checkComponent(_ name: [UInt8]) throws {
        guard !name.isEmpty, name != [0x2e], name != [0x2e, 0x2e], !name.contains(0x2f), !name.contains(0) else {
            throw StoreError.integrity("backing name \(String(decoding: name, as: UTF8.self)) is not a single entry name")
        }
    }

    /// The confined open itself: one component, no link followed, O_CLOEXEC and O_NOCTTY always.
    private static func openConfined(_ dir: Int32, _ name: [UInt8], flags: Int32, mode: mode_t) throws -> Int32 {
        try checkComponent(name)
        // openat2 refuses any flag beside O_PATH but these three (EINVAL).
        let all = flags | O_NOFOLLOW | O_CLOEXEC | (flags & oPath != 0 ? 0 : O_NOCTTY)
        let creates = flags & O_CREAT != 0 || flags & oTmpFile == oTmpFile
        do {
            return try withCName(name) { p throws in
                try retrying {
                    hasOpenat2
                        ? encfsd_openat2(dir, p, all, creates ? UInt32(mode) : 0,
                                         encfsd_RESOLVE_BENEATH | encfsd_RESOLVE_NO_SYMLINKS | encfsd_RESOLVE_NO_MAGICLINKS
                                             | UInt64(encfsd_RESOLVE_NO_XDEV_FLAG))
                        : Glibc.openat(dir, p, all, mode)
                }
            }
        } catch StoreError.system(ELOOP) {
            throw StoreError.unusableObject(name: String(decoding: name, as: UTF8.self), what: "a symbolic link")
        }
    }

    /// The identity of the object behind `fd` (its kernel file handle: inode and generation), or
    /// nil on a filesystem that has none, where the inode number alone identifies it.
    public static func identity(of fd: Int32) -> [UInt8]? {
        handle(fd, [], flags: 0x1000) // AT_EMPTY_PATH
    }

    /// The identity of the entry `name` of `dir`, without opening it (a symlink is not followed).
    public static func identity(ofEntry name: [UInt8], in dir: Int32) -> [UInt8]? {
        handle(dir, name, flags: 0)
    }

    private static func handle(_ dir: Int32, _ name: [UInt8], flags: Int32) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: 132)
        var length: UInt32 = 0
        var type: Int32 = 0
        let rc = (try? withCName(name) { p in
            bytes.withUnsafeMutableBufferPointer { encfsd_file_handle(dir, p, flags, $0.baseAddress! + 4, 128, &length, &type) }
        }) ?? -1
        guard rc == 0 else { return nil }
        withUnsafeBytes(of: type.littleEndian) { for i in 0..<4 { bytes[i] = $0[i] } }
        return Array(bytes.prefix(4 + Int(length)))
    }

    /// A backing object's place: device and inode number.
    public struct Place: Equatable, Sendable {
        let device: UInt64
        let inode: UInt64

        init(_ st: stat) {
            device = UInt64(st.st_dev)
            inode = UInt64(st.st_ino)
        }
    }

    /// Throws unless the directory `dir` still lies beneath the store root `root`: a directory
    /// whose descriptor the daemon holds can be moved out of the store behind its back, and must
    /// then receive nothing. Walks `..` up (one `openat` and `fstat` per level).
    public static func checkBeneath(_ dir: Int32, root: Place) throws {
        var here = Place(try fstat(dir))
        var current: FileDescriptor?
        for _ in 0..<4096 {
            if here == root { return }
            let from = current?.raw ?? dir
            let parent = try FileDescriptor(raw: retrying { Glibc.openat(from, "..", oPath | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) })
            let up = Place(try fstat(parent.raw))
            if up == here { break } // the filesystem's root: never met the store's
            (current, here) = (parent, up)
        }
        throw StoreError.integrity("a directory of the store was moved out of it in the backing store")
    }

    /// Opens the existing entry `name` of `dir`, refusing anything but `type`.
    public static func openEntry(_ dir: Int32, _ name: [UInt8], _ type: BackingType, _ access: BackingAccess) throws -> FileDescriptor {
        try openEntryStat(dir, name, type, access).0
    }

    /// `openEntry`, also giving the `stat` its type check read.
    public static func openEntryStat(_ dir: Int32, _ name: [UInt8], _ type: BackingType,
                                     _ access: BackingAccess) throws -> (FileDescriptor, stat) {
        let path = FileDescriptor(raw: try openConfined(dir, name, flags: oPath | (type == .directory ? O_DIRECTORY : 0), mode: 0))
        let st = try checkType(path.raw, type, name: name)
        if access == .path { return (path, st) }
        // Reopening the verified O_PATH descriptor through /proc acts on that inode, whatever the
        // name means by now.
        let opened = try withExtendedLifetime(path) { try reopen(path.raw, flags: access.flags | (type == .directory ? O_DIRECTORY : 0)) }
        return (opened, st)
    }

    /// Opens an existing file that only the store ever names (a journal shadow, the lock file)
    /// read-write. It must have exactly one link: a hard link planted from elsewhere on the same
    /// filesystem would otherwise be truncated and overwritten as if it were the store's.
    public static func openPrivateFile(_ dir: Int32, _ name: [UInt8]) throws -> FileDescriptor {
        let (fd, st) = try openEntryStat(dir, name, .regularFile, .readWrite)
        guard st.st_nlink == 1 else {
            throw StoreError.unusableObject(name: String(decoding: name, as: UTF8.self), what: "a file with other hard links")
        }
        return fd
    }

    /// Creates the regular file `name` in `dir`, read-write. O_EXCL: an existing entry (a planted
    /// symlink included, which O_EXCL never follows) fails with EEXIST and is left alone.
    public static func createEntry(_ dir: Int32, _ name: [UInt8], mode: mode_t) throws -> FileDescriptor {
        let fd = FileDescriptor(raw: try openConfined(dir, name, flags: O_RDWR | O_CREAT | O_EXCL, mode: mode))
        if OperationLog.shared.isRecording {
            OperationLog.shared.record(.create(directory: inode(dir), name: name, inode: inode(fd.raw)))
        }
        return fd
    }

    /// An unnamed regular file in `dir` (O_TMPFILE), linked in later with `linkAt`.
    public static func createUnnamed(in dir: Int32, mode: mode_t) throws -> FileDescriptor {
        let fd = try retrying { Glibc.openat(dir, ".", oTmpFile | O_RDWR | O_CLOEXEC, mode) }
        let descriptor = FileDescriptor(raw: fd)
        if OperationLog.shared.isRecording { OperationLog.shared.record(.newInode(inode: inode(fd))) }
        return descriptor
    }

    /// A directory descriptor that can list entries (getdents needs a real open, not O_PATH).
    public static func listingDescriptor(_ dir: Int32) throws -> FileDescriptor {
        try reopen(dir, flags: O_RDONLY | O_DIRECTORY)
    }

    /// Reads a whole small regular file of the store (at most `limit` bytes).
    public static func readEntry(_ dir: Int32, _ name: [UInt8], limit: Int) throws -> [UInt8] {
        let fd = try openEntry(dir, name, .regularFile, .readOnly)
        return try withExtendedLifetime(fd) {
            let size = Int(try fstat(fd.raw).st_size)
            guard size <= limit else {
                throw StoreError.integrity("\(String(decoding: name, as: UTF8.self)) is larger than \(limit) bytes")
            }
            var bytes = [UInt8](repeating: 0, count: size)
            let n = try bytes.withUnsafeMutableBytes { try pread(fd.raw, $0, offset: 0) }
            return Array(bytes.prefix(n))
        }
    }

    @discardableResult
    private static func checkType(_ fd: Int32, _ type: BackingType, name: [UInt8]) throws -> stat {
        let st = try fstat(fd)
        let found = st.st_mode & S_IFMT
        guard found == type.formatBits else {
            let what = switch found {
            case S_IFLNK: "a symbolic link"
            case S_IFIFO: "a FIFO"
            case S_IFSOCK: "a socket"
            case S_IFCHR, S_IFBLK: "a device node"
            case S_IFDIR: "a directory"
            default: "a regular file"
            }
            throw StoreError.unusableObject(name: String(decoding: name, as: UTF8.self), what: what)
        }
        return st
    }
}
