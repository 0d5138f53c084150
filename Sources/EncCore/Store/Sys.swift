import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif
import CLinux

/// An owned file descriptor, closed when the last reference goes.
///
/// Swift may end a local's lifetime at its last use, which for `fd.raw` is before the system
/// call runs: a descriptor held only in a local must be kept alive across the call
/// (`withExtendedLifetime`), or it may be closed, and its number reused, first.
public final class FileDescriptor: Sendable {
    public let raw: Int32
    public init(raw: Int32) { self.raw = raw }
    deinit { _ = Glibc.close(raw) }
}

/// Every system call the store makes on its backing directory, in one place: EINTR is retried
/// here, and failures become `StoreError.system(errno)`.
public enum Sys {
    @inline(__always)
    static func check(_ rc: Int32) throws {
        if rc < 0 { throw StoreError.system(errno) }
    }

    @inline(__always)
    /// Retries EINTR, throws what the store can meet (any errno a backing file system or a hostile
    /// store can cause), and traps on what only a bug can cause, as swift-nio does: EBADF (a
    /// descriptor used after its owner closed it, whose number another file may now have) and
    /// EFAULT (a bad buffer). Carrying on after either could read or write the wrong file.
    static func retrying(_ call: () -> Int32) throws -> Int32 {
        while true {
            let rc = call()
            if rc >= 0 { return rc }
            switch errno {
            case EINTR: continue
            case EBADF, EFAULT: preconditionFailure("a system call failed with \(String(cString: strerror(errno))): a descriptor or buffer bug")
            default: throw StoreError.system(errno)
            }
        }
    }

    static func withCName<R>(_ name: [UInt8], _ body: (UnsafePointer<CChar>) throws -> R) throws -> R {
        var terminated = name
        terminated.append(0)
        return try terminated.withUnsafeBufferPointer { buf throws -> R in
            try buf.baseAddress!.withMemoryRebound(to: CChar.self, capacity: buf.count) { p throws -> R in try body(p) }
        }
    }

    /// The store's own directory, as the user named it (the one path the store opens that is not
    /// relative to a descriptor it holds).
    public static func openStoreRoot(_ path: String) throws -> FileDescriptor {
        let fd = try FileDescriptor(raw: retrying { Glibc.open(path, oPath | O_DIRECTORY | O_CLOEXEC) })
        return fd
    }

    /// The inode behind a descriptor, for the operation log (recording only).
    static func inode(_ fd: Int32) -> UInt64 {
        var st = stat()
        _ = Glibc.fstat(fd, &st)
        return UInt64(st.st_ino)
    }

    /// Re-opens an O_PATH descriptor with real access flags, as passthrough_hp does.
    ///
    /// O_NOATIME where the kernel allows it (the daemon owns the file, or has CAP_FOWNER): the
    /// backing atime is the plaintext atime, and the daemon's own reads of headers and extents
    /// must not move it (an atime set with utimens would read back as the last header read).
    public static func reopen(_ fd: Int32, flags: Int32) throws -> FileDescriptor {
        let path = "/proc/self/fd/\(fd)"
        do {
            return try FileDescriptor(raw: retrying { Glibc.open(path, flags | encfsd_O_NOATIME | O_CLOEXEC | O_NOCTTY) })
        } catch StoreError.system(EPERM) {
            return try FileDescriptor(raw: retrying { Glibc.open(path, flags | O_CLOEXEC | O_NOCTTY) })
        }
    }

    /// Reads until `buffer` is full or end of file; returns the bytes read.
    public static func pread(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = Glibc.pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw StoreError.system(errno)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    public static func pwrite(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, offset: Int64) throws {
        try pwriteUnlogged(fd, buffer, offset: offset)
        OperationLog.shared.record(.write(inode: inode(fd), offset: offset, bytes: Array(buffer)))
    }

    private static func pwriteUnlogged(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, offset: Int64) throws {
        var done = 0
        while done < buffer.count {
            let n = Glibc.pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw StoreError.system(errno)
            }
            done += n
        }
    }

    /// Writes `buffers` back to back from `offset`: one system call for a run of extents instead
    /// of one each, or of a copy into one buffer first.
    public static func pwritev(_ fd: Int32, _ buffers: [UnsafeRawBufferPointer], offset: Int64) throws {
        let total = buffers.reduce(0) { $0 + $1.count }
        var written = 0
        var first = 0
        while first < buffers.count {
            let chunk = buffers[first..<min(buffers.count, first + 1024)] // IOV_MAX on Linux
            let vectors = chunk.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
            let wanted = chunk.reduce(0) { $0 + $1.count }
            let n = vectors.withUnsafeBufferPointer { Glibc.pwritev(fd, $0.baseAddress, Int32($0.count), off_t(offset) + off_t(written)) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw StoreError.system(errno) }
            if n < wanted {
                // A short write (rare: signals, quotas) finishes piece by piece.
                var at = offset + Int64(written)
                var skip = n
                for buffer in chunk {
                    let done = min(skip, buffer.count)
                    skip -= done
                    if done < buffer.count {
                        try pwriteUnlogged(fd, UnsafeRawBufferPointer(rebasing: buffer[done...]), offset: at + Int64(done))
                    }
                    at += Int64(buffer.count)
                }
            }
            written += wanted
            first += chunk.count
        }
        precondition(written == total)
        if OperationLog.shared.isRecording {
            var at = offset
            for buffer in buffers {
                OperationLog.shared.record(.write(inode: inode(fd), offset: at, bytes: Array(buffer)))
                at += Int64(buffer.count)
            }
        }
    }

    public static func fsync(_ fd: Int32) throws {
        _ = try retrying { Glibc.fsync(fd) }
        OperationLog.shared.record(.sync(inode: inode(fd)))
    }

    /// Commits the whole filesystem behind `fd` (directory entries included).
    public static func syncfs(_ fd: Int32) throws {
        _ = try retrying { encfsd_syncfs(fd) }
        OperationLog.shared.record(.syncAll)
    }

    /// fdatasync, or fsync where the backing refuses it (some FUSE and network filesystems):
    /// fsync makes strictly more durable, so every caller's ordering argument still holds.
    public static func fdatasync(_ fd: Int32) throws {
        do {
            _ = try retrying { Glibc.fdatasync(fd) }
        } catch StoreError.system(let code) where code == EINVAL || code == ENOSYS || code == EOPNOTSUPP {
            _ = try retrying { Glibc.fsync(fd) }
        }
        OperationLog.shared.record(.sync(inode: inode(fd)))
    }

    /// Whether a call succeeds (EINTR retried), for the capability probe: no error is thrown or kept.
    static func probeCall(_ call: () -> Int32) -> Bool { (try? retrying(call)) != nil }

    public static func ftruncate(_ fd: Int32, _ length: Int64) throws {
        _ = try retrying { Glibc.ftruncate(fd, off_t(length)) }
        OperationLog.shared.record(.truncate(inode: inode(fd), length: length))
    }

    public static func fstat(_ fd: Int32) throws -> stat {
        var st = stat()
        try check(Glibc.fstat(fd, &st))
        return st
    }

    public static func fstatAt(_ dir: Int32, _ name: [UInt8]) throws -> stat {
        try withCName(name) { p throws in
            var st = stat()
            try check(Glibc.fstatat(dir, p, &st, AT_SYMLINK_NOFOLLOW))
            return st
        }
    }

    public static func mkdirAt(_ dir: Int32, _ name: [UInt8], mode: mode_t) throws {
        try withCName(name) { p throws in try check(Glibc.mkdirat(dir, p, mode)) }
        if OperationLog.shared.isRecording, let st = try? fstatAt(dir, name) {
            OperationLog.shared.record(.mkdir(directory: inode(dir), name: name, inode: UInt64(st.st_ino)))
        }
    }

    public static func unlinkAt(_ dir: Int32, _ name: [UInt8], directory: Bool = false) throws {
        try withCName(name) { p throws in try check(Glibc.unlinkat(dir, p, directory ? AT_REMOVEDIR : 0)) }
        OperationLog.shared.record(.unlink(directory: inode(dir), name: name))
    }

    public static let oPath: Int32 = encfsd_O_PATH
    public static let oTmpFile: Int32 = encfsd_O_TMPFILE

    public static let renameNoReplace = encfsd_RENAME_NOREPLACE
    public static let renameExchange = encfsd_RENAME_EXCHANGE
    public static let renameWhiteout = encfsd_RENAME_WHITEOUT

    public static func renameAt(_ fromDir: Int32, _ from: [UInt8], _ toDir: Int32, _ to: [UInt8], flags: UInt32 = 0) throws {
        try withCName(from) { f throws in
            try withCName(to) { t throws in try check(encfsd_renameat2(fromDir, f, toDir, t, flags)) }
        }
        OperationLog.shared.record(.rename(from: inode(fromDir), fromName: from, to: inode(toDir), toName: to, flags: flags))
    }

    /// Renames without replacing anything: `RENAME_NOREPLACE` where the backing has it (`native`),
    /// else EEXIST if the target exists and a plain rename otherwise. The check and the rename
    /// are one step only because nothing else changes the store's namespace meanwhile: the caller
    /// holds the volume's namespace lock (or is fsck), and the store lock keeps other daemons out.
    public static func renameNoReplace(_ fromDir: Int32, _ from: [UInt8], _ toDir: Int32, _ to: [UInt8], native: Bool) throws {
        if native { return try renameAt(fromDir, from, toDir, to, flags: renameNoReplace) }
        do {
            _ = try fstatAt(toDir, to)
            throw StoreError.system(EEXIST)
        } catch StoreError.system(ENOENT) {}
        try renameAt(fromDir, from, toDir, to)
    }

    /// Gives the inode behind `fd` a new name, via /proc so no capability is needed.
    public static func linkAt(fd: Int32, toDir: Int32, _ name: [UInt8]) throws {
        try withCName(name) { p throws in
            try check(Glibc.linkat(AT_FDCWD, "/proc/self/fd/\(fd)", toDir, p, AT_SYMLINK_FOLLOW))
        }
        OperationLog.shared.record(.link(directory: inode(toDir), name: name, inode: inode(fd)))
    }

    /// timespec values that tell futimens to leave a time alone, or set it to now.
    public static let omitTime = timespec(tv_sec: 0, tv_nsec: (1 << 30) - 2)
    public static let nowTime = timespec(tv_sec: 0, tv_nsec: (1 << 30) - 1)

    /// Sets times through /proc so it works on O_PATH descriptors (directories) too.
    public static func setTimes(_ fd: Int32, _ times: (timespec, timespec)) throws {
        var t = try resolvingOmitted(fd, times)
        try check(Glibc.utimensat(AT_FDCWD, "/proc/self/fd/\(fd)", &t, 0))
    }

    /// Moves only the ctime of the object behind `fd` (an O_PATH descriptor will do): a chown
    /// to the owner it has.
    public static func touchChangeTime(_ fd: Int32) throws {
        try check(Glibc.fchownat(fd, "", uid_t.max, gid_t.max, 0x1000)) // AT_EMPTY_PATH
    }

    public static func futimens(_ fd: Int32, _ times: (timespec, timespec)) throws {
        var t = try resolvingOmitted(fd, times)
        try check(Glibc.futimens(fd, &t))
    }

    /// Puts back a modification time the store's own header write changed. GlusterFS refuses any
    /// setattr of a file whose last name is gone (ESTALE), and that must not fail the commit the
    /// header write belonged to: backing times are unauthenticated, and an unlinked file's show
    /// only through its open descriptors.
    public static func restoreModificationTime(_ fd: Int32, _ time: timespec) throws {
        do {
            try futimens(fd, (omitTime, time))
        } catch StoreError.system(ESTALE) {}
    }

    /// open(2)'s O_NOATIME.
    public static let noAccessTimeFlag = encfsd_O_NOATIME

    /// Sets the atime to now (which gives it the instant the ctime gets) and the mtime to
    /// `modified` (nil: left alone): the mark of an atime-only header write (`writeAccessTime`).
    static func markUnchangedSinceWrite(_ fd: Int32, modified: timespec?) throws {
        do {
            try futimens(fd, (nowTime, modified ?? omitTime))
        } catch StoreError.system(ESTALE) {}
    }

    /// A time left alone (UTIME_OMIT) is passed as its current value instead: bindfs (1.14) takes
    /// an omitted time to mean "now", which made every chmod look like a content change.
    private static func resolvingOmitted(_ fd: Int32, _ times: (timespec, timespec)) throws -> [timespec] {
        let omitted = { (t: timespec) in t.tv_nsec == omitTime.tv_nsec }
        guard omitted(times.0) || omitted(times.1) else { return [times.0, times.1] }
        let st = try fstat(fd)
        return [omitted(times.0) ? st.st_atim : times.0, omitted(times.1) ? st.st_mtim : times.1]
    }

    public static func fallocate(_ fd: Int32, mode: Int32, offset: Int64, length: Int64) throws {
        let before = OperationLog.shared.isRecording ? try fstat(fd).st_size : 0
        _ = try retrying { encfsd_fallocate(fd, mode, off_t(offset), off_t(length)) }
        // For the crash-state checker: a punched range reads as zeros; an allocation may grow the file.
        if mode & 0x02 != 0 {
            let end = min(offset + length, Int64(before))
            if end > offset { OperationLog.shared.record(.write(inode: inode(fd), offset: offset, bytes: [UInt8](repeating: 0, count: Int(end - offset)))) }
        } else if mode & 0x01 == 0 && offset + length > Int64(before) {
            OperationLog.shared.record(.truncate(inode: inode(fd), length: offset + length))
        }
    }

    public static func fstatvfs(_ fd: Int32) throws -> statvfs {
        var s = statvfs()
        try check(Glibc.fstatvfs(fd, &s))
        return s
    }

    public struct RawEntry {
        public var name: [UInt8]
        public var inode: UInt64
        public var isDirectory: Bool
    }

    /// Entries of a directory, without "." and "..", with the inode and type getdents gives.
    public static func listDirectory(_ dirFD: Int32) throws -> [RawEntry] {
        // O_NOATIME as in `reopen`: a listing must not move the backing atime, which is the
        // plaintext atime of a directory whose header keeps none.
        let fd: Int32
        do {
            fd = try retrying { Glibc.openat(dirFD, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC | encfsd_O_NOATIME) }
        } catch StoreError.system(EPERM) {
            fd = try retrying { Glibc.openat(dirFD, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        }
        guard let dir = fdopendir(fd) else {
            let e = errno
            Glibc.close(fd)
            throw StoreError.system(e)
        }
        defer { closedir(dir) }
        var entries: [RawEntry] = []
        while true {
            errno = 0
            guard let entry = readdir(dir) else {
                if errno != 0 { throw StoreError.system(errno) }
                break
            }
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                Array(raw.prefix(while: { $0 != 0 }))
            }
            if name == [0x2e] || name == [0x2e, 0x2e] { continue }
            entries.append(RawEntry(name: name, inode: UInt64(entry.pointee.d_ino),
                                    isDirectory: entry.pointee.d_type == UInt8(DT_DIR)))
        }
        return entries
    }

    /// Caps glibc's malloc arenas (call before worker threads start): each thread that allocates
    /// otherwise gets an arena of its own that keeps freed extent buffers, and with 16 FUSE workers
    /// a random-write load held ~290 MB resident instead of ~100 MB.
    public static func limitMallocArenas(_ count: Int32) { _ = encfsd_limit_malloc_arenas(count) }

    /// Returns freed heap memory to the system.
    public static func trimMalloc() { _ = encfsd_malloc_trim() }

    /// An ioctl whose argument is a buffer read and written in place.
    public static func ioctl(_ fd: Int32, _ request: UInt, _ buffer: inout [UInt8]) throws {
        let rc = buffer.withUnsafeMutableBytes { encfsd_ioctl(fd, request, $0.baseAddress) }
        if rc < 0 { throw StoreError.system(errno) }
    }

    // MARK: extended attributes on backing objects

    public static func fsetxattr(_ fd: Int32, _ name: String, _ value: [UInt8], flags: Int32) throws {
        try check(value.withUnsafeBytes { CLinux.fsetxattr(fd, name, $0.baseAddress, $0.count, flags) })
    }

    public static func fgetxattr(_ fd: Int32, _ name: String) throws -> [UInt8] {
        while true {
            let size = CLinux.fgetxattr(fd, name, nil, 0)
            if size < 0 { throw StoreError.system(errno) }
            var value = [UInt8](repeating: 0, count: size)
            let n = value.withUnsafeMutableBytes { CLinux.fgetxattr(fd, name, $0.baseAddress, $0.count) }
            if n >= 0 { return Array(value.prefix(n)) }
            if errno != ERANGE { throw StoreError.system(errno) }
        }
    }

    public static func flistxattr(_ fd: Int32) throws -> [String] {
        while true {
            let size = CLinux.flistxattr(fd, nil, 0)
            if size < 0 { throw StoreError.system(errno) }
            if size == 0 { return [] }
            var buf = [CChar](repeating: 0, count: size)
            let n = CLinux.flistxattr(fd, &buf, buf.count)
            if n < 0 {
                if errno == ERANGE { continue }
                throw StoreError.system(errno)
            }
            return buf.prefix(n).split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        }
    }

    public static func fremovexattr(_ fd: Int32, _ name: String) throws {
        try check(CLinux.fremovexattr(fd, name))
    }
}
