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

    /// How `openRelative` resolves its path.
    fileprivate enum Resolution {
        /// One entry name, no link followed, never out of the directory (openat2 where the kernel
        /// has it).
        case confined
        /// "." or "..": the directory itself or its parent.
        case directoryItself
    }

    /// Every open relative to a store descriptor, in this one function: O_CLOEXEC and O_NOCTTY
    /// always, O_NOFOLLOW and openat2's RESOLVE_BENEATH|NO_SYMLINKS|NO_MAGICLINKS|NO_XDEV for an
    /// entry name.
    fileprivate static func openRelative(_ dir: borrowing FileDescriptor, _ path: [UInt8], flags: Int32, mode: mode_t,
                                     _ resolution: Resolution) throws -> FileDescriptor {
        // openat2 refuses any flag beside O_PATH but these three (EINVAL).
        let all = flags | O_CLOEXEC | (flags & oPath != 0 ? 0 : O_NOCTTY) | (resolution == .confined ? O_NOFOLLOW : 0)
        let creates = flags & O_CREAT != 0 || flags & oTmpFile == oTmpFile
        let number = try withCName(path) { p throws in
            // The open itself needs the directory's number: it is the one call with no method on
            // FileDescriptor, so that every backing open stays in this file.
            try dir.withUnsafeNumber { dirNumber throws in
                try retrying {
                    resolution == .confined && hasOpenat2
                        ? encfsd_openat2(dirNumber, p, all, creates ? UInt32(mode) : 0,
                                         encfsd_RESOLVE_BENEATH | encfsd_RESOLVE_NO_SYMLINKS | encfsd_RESOLVE_NO_MAGICLINKS
                                             | UInt64(encfsd_RESOLVE_NO_XDEV_FLAG))
                        : Glibc.openat(dirNumber, p, all, mode)
                }
            }
        }
        return FileDescriptor(taking: number)
    }

    /// Whether the directory at `path` beneath `root` is the one at `place` with file handle
    /// `identity`, resolved in one `openat2` that follows no link, crosses no mount and never
    /// leaves `root` (RESOLVE_BENEATH refuses a `..` that would). Those flags alone make whatever
    /// is found lie beneath `root`, whatever the path holds, so its components need no check
    /// here. The file handle, not only the inode number, must match: a backing whose inode numbers
    /// are not unique on one device (an overlay of several filesystems) could otherwise offer a
    /// decoy. False when that cannot be said: no openat2 (the plain `openat` fallback would follow
    /// links in the middle of a path), or any failure.
    fileprivate static func isDirectory(under root: borrowing FileDescriptor, path: [UInt8], place: Place, identity: [UInt8]) -> Bool {
        guard hasOpenat2, !path.isEmpty, path.count < Int(PATH_MAX), !path.contains(0),
              let found = try? openRelative(root, path, flags: oPath | O_DIRECTORY, mode: 0, .confined),
              let st = try? found.fstat(), Place(st) == place else { return false }
        return found.identity() == identity
    }

    /// The confined open itself: one component, no link followed.
    fileprivate static func openConfined(_ dir: borrowing FileDescriptor, _ name: [UInt8], flags: Int32, mode: mode_t) throws -> FileDescriptor {
        try checkComponent(name)
        do {
            return try openRelative(dir, name, flags: flags, mode: mode, .confined)
        } catch StoreError.system(ELOOP) {
            throw StoreError.unusableObject(name: String(decoding: name, as: UTF8.self), what: "a symbolic link")
        }
    }

    /// An unnamed regular file in `dir` (O_TMPFILE), unrecorded: `createUnnamed` records it.
    static func openUnnamed(in dir: borrowing FileDescriptor, mode: mode_t) throws -> FileDescriptor {
        try openRelative(dir, [0x2e], flags: oTmpFile | O_RDWR, mode: mode, .directoryItself)
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

    /// A backing object just opened, with the `stat` its type check read.
    public struct OpenedEntry: ~Copyable {
        public var descriptor: FileDescriptor
        public let stat: stat
    }

    @discardableResult
    fileprivate static func checkType(_ fd: borrowing FileDescriptor, _ type: BackingType, name: [UInt8]) throws -> stat {
        let st = try fd.fstat()
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

extension FileDescriptor {
    /// The identity of the object behind the descriptor (its kernel file handle: inode and
    /// generation), or nil on a filesystem that has none, where the inode number alone identifies it.
    public func identity() -> [UInt8]? {
        Self.identity(fileHandle([], flags: Sys.emptyPath))
    }

    /// The identity of this directory's entry `name`, without opening it (a symlink is not followed).
    public func identity(ofEntry name: [UInt8]) -> [UInt8]? {
        Self.identity(fileHandle(name, flags: 0))
    }

    private static func identity(_ found: (type: Int32, handle: [UInt8])?) -> [UInt8]? {
        // FUSE's handles (FILEID_INO64_GEN and _PARENT) carry the node ID its server gave the
        // inode, which GlusterFS and libfuse's path-based servers give anew once the kernel has
        // forgotten the inode: an unchanged object would look replaced. The inode number, which
        // the probe has checked survives a rename, identifies the object there instead.
        guard let found, found.type != 0x81, found.type != 0x82 else { return nil }
        return found.handle
    }

    /// Throws unless this directory still lies beneath the store root `root`: a directory whose
    /// descriptor the daemon holds can be moved out of the store behind its back, and must then
    /// receive nothing. Walks `..` up (one `openat` and `fstat` per level).
    ///
    /// `path` is where the daemon last knew the directory: backing names from the root (`rootFD`)
    /// down, joined by "/"; `identity` is the directory's file handle. When that path, resolved
    /// beneath the root in one `openat2`, still leads to this directory, the walk is skipped: a
    /// directory has one parent, so the directory found there is beneath the root. That costs four
    /// system calls at any depth instead of three per level (rm -rf of a kernel tree made ten
    /// `fstat`s per unlink). Anything else, a stale path included, is decided by the walk, and so
    /// is every directory without a file handle (FUSE backings, whose handles are not the object's).
    public func checkBeneath(root: Sys.Place, rootFD: borrowing FileDescriptor, path: [UInt8], identity: [UInt8]?) throws {
        let here = Sys.Place(try fstat())
        if here == root { return }
        if let identity, Sys.isDirectory(under: rootFD, path: path, place: here, identity: identity) { return }
        try walkUpToRoot(root: root, from: here)
    }

    public func checkBeneath(root: Sys.Place) throws {
        let here = Sys.Place(try fstat())
        if here == root { return }
        try walkUpToRoot(root: root, from: here)
    }

    private func walkUpToRoot(root: Sys.Place, from start: Sys.Place) throws {
        var here = start
        var current = try Sys.openParent(of: self)
        for _ in 0..<4096 {
            let up = Sys.Place(try current.fstat())
            if up == here { break } // the filesystem's root: never met the store's
            if up == root { return }
            here = up
            current = try Sys.openParent(of: current)
        }
        throw StoreError.integrity("a directory of the store was moved out of it in the backing store")
    }

    /// Opens the existing entry `name` of this directory, refusing anything but `type`.
    public func openEntry(_ name: [UInt8], _ type: BackingType, _ access: BackingAccess) throws -> FileDescriptor {
        let opened = try openEntryStat(name, type, access)
        return opened.descriptor
    }

    /// `openEntry`, also giving the `stat` its type check read.
    public func openEntryStat(_ name: [UInt8], _ type: BackingType, _ access: BackingAccess) throws -> Sys.OpenedEntry {
        let path = try Sys.openConfined(self, name, flags: Sys.oPath | (type == .directory ? O_DIRECTORY : 0), mode: 0)
        let st = try Sys.checkType(path, type, name: name)
        if access == .path { return Sys.OpenedEntry(descriptor: path, stat: st) }
        // Reopening the verified O_PATH descriptor through /proc acts on that inode, whatever the
        // name means by now.
        return Sys.OpenedEntry(descriptor: try path.reopen(flags: access.flags | (type == .directory ? O_DIRECTORY : 0)), stat: st)
    }

    /// Opens an existing file that only the store ever names (a journal shadow, the lock file)
    /// read-write. It must have exactly one link: a hard link planted from elsewhere on the same
    /// filesystem would otherwise be truncated and overwritten as if it were the store's.
    public func openPrivateFile(_ name: [UInt8]) throws -> FileDescriptor {
        let opened = try openEntryStat(name, .regularFile, .readWrite)
        guard opened.stat.st_nlink == 1 else {
            throw StoreError.unusableObject(name: String(decoding: name, as: UTF8.self), what: "a file with other hard links")
        }
        return opened.descriptor
    }

    /// Creates the regular file `name` in this directory, read-write. O_EXCL: an existing entry (a
    /// planted symlink included, which O_EXCL never follows) fails with EEXIST and is left alone.
    public func createEntry(_ name: [UInt8], mode: mode_t) throws -> FileDescriptor {
        let fd = try Sys.openConfined(self, name, flags: O_RDWR | O_CREAT | O_EXCL, mode: mode)
        if OperationLog.shared.isRecording {
            OperationLog.shared.record(.create(directory: loggedInode, name: name, inode: fd.loggedInode))
        }
        return fd
    }

    /// An unnamed regular file in this directory (O_TMPFILE), linked in later with `linkAt`.
    public func createUnnamed(mode: mode_t) throws -> FileDescriptor {
        let fd = try Sys.openUnnamed(in: self, mode: mode)
        if OperationLog.shared.isRecording { OperationLog.shared.record(.newInode(inode: fd.loggedInode)) }
        return fd
    }

    /// A directory descriptor that can list entries (getdents needs a real open, not O_PATH).
    public func listingDescriptor() throws -> FileDescriptor {
        try reopen(flags: O_RDONLY | O_DIRECTORY)
    }

    /// Reads a whole small regular file of the store (at most `limit` bytes).
    public func readEntry(_ name: [UInt8], limit: Int) throws -> [UInt8] {
        let fd = try openEntry(name, .regularFile, .readOnly)
        let size = Int(try fd.fstat().st_size)
        guard size <= limit else {
            throw StoreError.integrity("\(String(decoding: name, as: UTF8.self)) is larger than \(limit) bytes")
        }
        var bytes = [UInt8](repeating: 0, count: size)
        let n = try bytes.withUnsafeMutableBytes { try fd.pread($0, offset: 0) }
        return Array(bytes.prefix(n))
    }
}

extension Sys {
    /// The parent of a directory, as an O_PATH descriptor (for `checkBeneath`'s walk up).
    fileprivate static func openParent(of dir: borrowing FileDescriptor) throws -> FileDescriptor {
        try openRelative(dir, [0x2e, 0x2e], flags: oPath | O_DIRECTORY | O_NOFOLLOW, mode: 0, .directoryItself)
    }
}
