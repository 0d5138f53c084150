import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif
import CLinux
import Synchronization

/// A backing descriptor: a value with one owner, closed by its `deinit` when that owner lets go.
///
/// It cannot be copied, so no second owner can close it early, and its number is readable only
/// in this file: every system call on it is a `borrowing` method here, which keeps it open for
/// the call's whole duration. (A descriptor class whose `raw` number was passed on could be freed
/// at the number's last use, before the call ran, and the number reused by another file.) A
/// descriptor that more than one holder uses lives in one `SharedDescriptor`.
public struct FileDescriptor: ~Copyable, Sendable {
    private let number: Int32

    /// Takes ownership of `number`, a descriptor just returned by the kernel: no one else may
    /// use or close it from here on.
    public init(taking number: Int32) { self.number = number }

    deinit { _ = Glibc.close(number) }

    /// The number, for the one call that has no method here: the store boundary's confined open
    /// (`StoreBoundary.swift` keeps it, so that every backing open is visibly in that file; tests
    /// also look a descriptor up in `/proc/self/fd` with it). `body` must not keep the number.
    func withUnsafeNumber<R: ~Copyable, E: Error>(_ body: (Int32) throws(E) -> R) throws(E) -> R {
        try body(number)
    }
}

/// A descriptor several holders use (a directory's cached O_PATH descriptor, the store root, an
/// open file's descriptor shared by its handles and views): the one owner of `descriptor`.
///
/// Invariant: `descriptor` is closed only when the last reference to this object goes, and a
/// call `owner.descriptor.pread(...)` borrows through a reference that the caller holds for
/// the whole call, so no holder can see its descriptor closed or its number reused under it.
public final class SharedDescriptor: Sendable {
    public let descriptor: FileDescriptor
    public init(_ descriptor: consuming FileDescriptor) { self.descriptor = descriptor }
}

/// The store's system calls that act on no descriptor of its own, and the helpers every call
/// shares: EINTR is retried here, and failures become `StoreError.system(errno)`. The calls on a
/// descriptor are `FileDescriptor`'s methods below.
public enum Sys {
    /// Throws `failure()` for a negative return (calls that never return EINTR).
    @inline(__always)
    static func check(_ rc: Int32) throws {
        if rc < 0 { throw failure() }
    }

    /// The error of the call that just failed, as swift-nio sorts them: what the store can meet
    /// (any errno a backing file system or a hostile store can cause) is thrown; what only a bug
    /// can cause traps: EBADF (a descriptor used after its owner closed it, whose number another
    /// file may now have) and EFAULT (a bad buffer). Carrying on after either could read or write
    /// the wrong file.
    static func failure() -> StoreError {
        let code = errno
        if code == EBADF || code == EFAULT {
            preconditionFailure("a system call failed with \(String(cString: strerror(code))): a descriptor or buffer bug")
        }
        return StoreError.system(code)
    }

    /// Retries EINTR; any other failure is `failure()` (thrown, or a trap for a bug).
    @inline(__always)
    static func retrying<Result: BinaryInteger>(_ call: () -> Result) throws -> Result {
        while true {
            let rc = call()
            if rc >= 0 { return rc }
            if errno != EINTR { throw failure() }
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
        FileDescriptor(taking: try retrying { Glibc.open(path, oPath | O_DIRECTORY | O_CLOEXEC) })
    }

    /// Whether a call succeeds (EINTR retried), for the capability probe: no error is thrown or kept.
    static func probeCall(_ call: () -> Int32) -> Bool { (try? retrying(call)) != nil }

    public static let oPath: Int32 = encfsd_O_PATH
    public static let oTmpFile: Int32 = encfsd_O_TMPFILE

    public static let renameNoReplace = encfsd_RENAME_NOREPLACE
    public static let renameExchange = encfsd_RENAME_EXCHANGE
    public static let renameWhiteout = encfsd_RENAME_WHITEOUT
    /// AT_EMPTY_PATH, which Glibc's module does not export: "" names the descriptor's own object.
    static let emptyPath: Int32 = 0x1000
    /// XATTR_CREATE: set an attribute only if it does not exist.
    static let xattrCreate: Int32 = 1

    /// timespec values that tell futimens to leave a time alone, or set it to now.
    public static let omitTime = timespec(tv_sec: 0, tv_nsec: (1 << 30) - 2)
    public static let nowTime = timespec(tv_sec: 0, tv_nsec: (1 << 30) - 1)

    /// Whether a time left alone must be passed as its current value (`resolvingOmitted`), at an
    /// `fstat` per call: set once any volume of the process is on a FUSE backing, whose server may
    /// misread UTIME_OMIT, or on one whose type was not found (the kernel's own filesystems never
    /// see it: the VFS drops the field).
    /// Resolving where it is not needed only costs the `fstat`.
    static let omittedTimesNeedResolving = Atomic<Bool>(false)
    /// Whether `linkat` by descriptor (AT_EMPTY_PATH) has not been refused: it needs
    /// CAP_DAC_READ_SEARCH. Cleared at the first refusal; /proc paths are used from then on.
    static let linksByDescriptor = Atomic<Bool>(true)
    /// Whether `utimensat` has not refused AT_EMPTY_PATH (EINVAL).
    static let timesByEmptyPath = Atomic<Bool>(true)

    /// open(2)'s O_NOATIME.
    public static let noAccessTimeFlag = encfsd_O_NOATIME

    public struct RawEntry {
        public var name: [UInt8]
        public var inode: UInt64
        public var isDirectory: Bool
    }

    /// Caps glibc's malloc arenas (call before worker threads start): each thread that allocates
    /// otherwise gets an arena of its own that keeps freed extent buffers, and with 16 FUSE workers
    /// a random-write load held ~290 MB resident instead of ~100 MB.
    public static func limitMallocArenas(_ count: Int32) { _ = encfsd_limit_malloc_arenas(count) }

    /// Returns freed heap memory to the system.
    public static func trimMalloc() { _ = encfsd_malloc_trim() }
}

/// Every system call the store makes on a backing descriptor, as a method that borrows it.
extension FileDescriptor {
    /// The inode behind the descriptor, for the operation log (recording only).
    var loggedInode: UInt64 {
        var st = stat()
        _ = Glibc.fstat(number, &st)
        return UInt64(st.st_ino)
    }

    /// Re-opens an O_PATH descriptor with real access flags through `/proc/self/fd`, as
    /// passthrough_hp does: the new descriptor is of this inode, whatever its names mean by now.
    ///
    /// O_NOATIME where the kernel allows it (the daemon owns the file, or has CAP_FOWNER): the
    /// backing atime is the plaintext atime, and the daemon's own reads of headers and extents
    /// must not move it (an atime set with utimens would read back as the last header read).
    public func reopen(flags: Int32) throws -> FileDescriptor {
        try Sys.withProcPath(number) { path throws in
            do {
                return FileDescriptor(taking: try Sys.retrying { Glibc.open(path, flags | encfsd_O_NOATIME | O_CLOEXEC | O_NOCTTY) })
            } catch StoreError.system(EPERM) {
                return FileDescriptor(taking: try Sys.retrying { Glibc.open(path, flags | O_CLOEXEC | O_NOCTTY) })
            }
        }
    }


    /// Reads until `buffer` is full or end of file; returns the bytes read. (`pread(2)`)
    public func pread(_ buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = try Sys.retrying { Glibc.pread(number, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done)) }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Writes all of `buffer` at `offset`. (`pwrite(2)`)
    public func pwrite(_ buffer: UnsafeRawBufferPointer, offset: Int64) throws {
        try pwriteUnlogged(buffer, offset: offset)
        OperationLog.shared.record(.write(inode: loggedInode, offset: offset, bytes: Array(buffer)))
    }

    private func pwriteUnlogged(_ buffer: UnsafeRawBufferPointer, offset: Int64) throws {
        var done = 0
        while done < buffer.count {
            done += try Sys.retrying { Glibc.pwrite(number, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done)) }
        }
    }

    /// Writes `buffers` back to back from `offset`: one system call for a run of extents instead
    /// of one each, or of a copy into one buffer first. (`pwritev(2)`)
    public func pwritev(_ buffers: [UnsafeRawBufferPointer], offset: Int64) throws {
        let total = buffers.reduce(0) { $0 + $1.count }
        var written = 0
        var first = 0
        while first < buffers.count {
            let chunk = buffers[first..<min(buffers.count, first + 1024)] // IOV_MAX on Linux
            let vectors = chunk.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
            let wanted = chunk.reduce(0) { $0 + $1.count }
            let n = try vectors.withUnsafeBufferPointer { v in
                try Sys.retrying { Glibc.pwritev(number, v.baseAddress, Int32(v.count), off_t(offset) + off_t(written)) }
            }
            if n < wanted {
                // A short write (rare: signals, quotas) finishes piece by piece.
                var at = offset + Int64(written)
                var skip = n
                for buffer in chunk {
                    let done = min(skip, buffer.count)
                    skip -= done
                    if done < buffer.count {
                        try pwriteUnlogged(UnsafeRawBufferPointer(rebasing: buffer[done...]), offset: at + Int64(done))
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
                OperationLog.shared.record(.write(inode: loggedInode, offset: at, bytes: Array(buffer)))
                at += Int64(buffer.count)
            }
        }
    }

    public func fsync() throws {
        _ = try Sys.retrying { Glibc.fsync(number) }
        OperationLog.shared.record(.sync(inode: loggedInode))
    }

    /// Commits the whole filesystem behind the descriptor (directory entries included).
    public func syncfs() throws {
        _ = try Sys.retrying { encfsd_syncfs(number) }
        OperationLog.shared.record(.syncAll)
    }

    /// fdatasync, or fsync where the backing refuses it (some FUSE and network filesystems):
    /// fsync makes strictly more durable, so every caller's ordering argument still holds.
    public func fdatasync() throws {
        do {
            _ = try Sys.retrying { Glibc.fdatasync(number) }
        } catch StoreError.system(let code) where code == EINVAL || code == ENOSYS || code == EOPNOTSUPP {
            _ = try Sys.retrying { Glibc.fsync(number) }
        }
        OperationLog.shared.record(.sync(inode: loggedInode))
    }

    /// Whether `fdatasync` succeeds, for the capability probe: nothing is recorded or thrown.
    func probeFdatasync() -> Bool { Sys.probeCall { Glibc.fdatasync(number) } }

    public func ftruncate(_ length: Int64) throws {
        _ = try Sys.retrying { Glibc.ftruncate(number, off_t(length)) }
        OperationLog.shared.record(.truncate(inode: loggedInode, length: length))
    }

    public func fstat() throws -> stat {
        var st = stat()
        try Sys.check(Glibc.fstat(number, &st))
        return st
    }

    /// The entry `name` of this directory, a symlink not followed. (`fstatat(2)`)
    public func fstatAt(_ name: [UInt8]) throws -> stat {
        try Sys.withCName(name) { p throws in
            var st = stat()
            try Sys.check(Glibc.fstatat(number, p, &st, AT_SYMLINK_NOFOLLOW))
            return st
        }
    }

    public func mkdirAt(_ name: [UInt8], mode: mode_t) throws {
        try Sys.withCName(name) { p throws in try Sys.check(Glibc.mkdirat(number, p, mode)) }
        if OperationLog.shared.isRecording, let st = try? fstatAt(name) {
            OperationLog.shared.record(.mkdir(directory: loggedInode, name: name, inode: UInt64(st.st_ino)))
        }
    }

    public func unlinkAt(_ name: [UInt8], directory: Bool = false) throws {
        try Sys.withCName(name) { p throws in try Sys.check(Glibc.unlinkat(number, p, directory ? AT_REMOVEDIR : 0)) }
        OperationLog.shared.record(.unlink(directory: loggedInode, name: name))
    }

    /// Renames the entry `from` of this directory to `to` in `toDir` (which may be this one).
    /// (`renameat2(2)`)
    public func renameAt(_ from: [UInt8], _ toDir: borrowing FileDescriptor, _ to: [UInt8], flags: UInt32 = 0) throws {
        try Sys.withCName(from) { f throws in
            try Sys.withCName(to) { t throws in try Sys.check(encfsd_renameat2(number, f, toDir.number, t, flags)) }
        }
        OperationLog.shared.record(.rename(from: loggedInode, fromName: from, to: toDir.loggedInode, toName: to, flags: flags))
    }

    /// Renames without replacing anything: `RENAME_NOREPLACE` where the backing has it (`native`),
    /// else EEXIST if the target exists and a plain rename otherwise. The check and the rename
    /// are one step only because nothing else changes the store's namespace meanwhile: the caller
    /// holds the volume's namespace lock (or is fsck), and the store lock keeps other daemons out.
    public func renameNoReplace(_ from: [UInt8], _ toDir: borrowing FileDescriptor, _ to: [UInt8], native: Bool) throws {
        if native { return try renameAt(from, toDir, to, flags: Sys.renameNoReplace) }
        do {
            _ = try toDir.fstatAt(to)
            throw StoreError.system(EEXIST)
        } catch StoreError.system(ENOENT) {}
        try renameAt(from, toDir, to)
    }

    /// Gives the inode behind this descriptor the new name `name` in `toDir` (`linkat(2)`). By
    /// the descriptor itself (AT_EMPTY_PATH) where the kernel allows it (CAP_DAC_READ_SEARCH, as
    /// a daemon run by root has): the path through /proc the fallback takes costs a walk of
    /// procfs, 40% of the link (3 µs of every create on tmpfs).
    public func linkAt(toDir: borrowing FileDescriptor, _ name: [UInt8]) throws {
        try Sys.withCName(name) { p throws in
            let byDescriptor = Sys.linksByDescriptor.load(ordering: .relaxed)
            if byDescriptor {
                if Glibc.linkat(number, "", toDir.number, p, Sys.emptyPath) == 0 { return }
                // Without the capability the kernel answers ENOENT, as if there were no path.
                guard errno == ENOENT else { throw Sys.failure() }
            }
            try Sys.withProcPath(number) { path throws in try Sys.check(Glibc.linkat(AT_FDCWD, path, toDir.number, p, AT_SYMLINK_FOLLOW)) }
            // The path linked what the descriptor could not: a refusal, not a missing file.
            if byDescriptor { Sys.linksByDescriptor.store(false, ordering: .relaxed) }
        }
        OperationLog.shared.record(.link(directory: toDir.loggedInode, name: name, inode: loggedInode))
    }

    /// Sets times by the descriptor's own path (AT_EMPTY_PATH), so it works on O_PATH
    /// descriptors (directories) too; through /proc where the kernel refuses the flag. The
    /// /proc path costs three times the call itself (4 µs against 1.3 on tmpfs).
    public func setTimes(_ times: (timespec, timespec)) throws {
        var t = try resolvingOmitted(times)
        if Sys.timesByEmptyPath.load(ordering: .relaxed) {
            if Glibc.utimensat(number, "", &t, Sys.emptyPath) == 0 { return }
            guard errno == EINVAL else { throw Sys.failure() }
            Sys.timesByEmptyPath.store(false, ordering: .relaxed)
        }
        try Sys.withProcPath(number) { path throws in try Sys.check(Glibc.utimensat(AT_FDCWD, path, &t, 0)) }
    }

    /// Moves only the ctime of the object behind the descriptor (an O_PATH descriptor will do):
    /// a chown to the owner it has.
    public func touchChangeTime() throws {
        try Sys.check(Glibc.fchownat(number, "", uid_t.max, gid_t.max, Sys.emptyPath))
    }

    public func futimens(_ times: (timespec, timespec)) throws {
        var t = try resolvingOmitted(times)
        try Sys.check(Glibc.futimens(number, &t))
    }

    /// Puts back a modification time the store's own header write changed. GlusterFS refuses any
    /// setattr of a file whose last name is gone (ESTALE), and that must not fail the commit the
    /// header write belonged to: backing times are unauthenticated, and an unlinked file's show
    /// only through its open descriptors.
    /// - Parameter accessTime: the atime, when the caller has just read it: passing it saves the
    ///   `fstat` an omitted one costs (see `resolvingOmitted`).
    public func restoreModificationTime(_ time: timespec, accessTime: timespec? = nil) throws {
        do {
            try futimens((accessTime ?? Sys.omitTime, time))
        } catch StoreError.system(ESTALE) {}
    }

    /// Sets the atime to now (which gives it the instant the ctime gets) and the mtime to
    /// `modified` (nil: left alone): the mark of an atime-only header write (`writeAccessTime`).
    func markUnchangedSinceWrite(modified: timespec?) throws {
        do {
            try futimens((Sys.nowTime, modified ?? Sys.omitTime))
        } catch StoreError.system(ESTALE) {}
    }

    /// A time left alone (UTIME_OMIT) is passed as its current value instead: bindfs (1.14) takes
    /// an omitted time to mean "now", which made every chmod look like a content change.
    private func resolvingOmitted(_ times: (timespec, timespec)) throws -> [timespec] {
        let omitted = { (t: timespec) in t.tv_nsec == Sys.omitTime.tv_nsec }
        guard omitted(times.0) || omitted(times.1), Sys.omittedTimesNeedResolving.load(ordering: .relaxed) else {
            return [times.0, times.1]
        }
        let st = try fstat()
        return [omitted(times.0) ? st.st_atim : times.0, omitted(times.1) ? st.st_mtim : times.1]
    }

    public func fallocate(mode: Int32, offset: Int64, length: Int64) throws {
        let before = OperationLog.shared.isRecording ? try fstat().st_size : 0
        _ = try Sys.retrying { encfsd_fallocate(number, mode, off_t(offset), off_t(length)) }
        // For the crash-state checker: a punched range reads as zeros; an allocation may grow the file.
        if mode & 0x02 != 0 {
            let end = min(offset + length, Int64(before))
            if end > offset { OperationLog.shared.record(.write(inode: loggedInode, offset: offset, bytes: [UInt8](repeating: 0, count: Int(end - offset)))) }
        } else if mode & 0x01 == 0 && offset + length > Int64(before) {
            OperationLog.shared.record(.truncate(inode: loggedInode, length: offset + length))
        }
    }

    public func fstatvfs() throws -> statvfs {
        var s = statvfs()
        try Sys.check(Glibc.fstatvfs(number, &s))
        return s
    }

    /// Entries of this directory, without "." and "..", with the inode and type getdents gives.
    public func listDirectory() throws -> [Sys.RawEntry] {
        // O_NOATIME as in `reopen`: a listing must not move the backing atime, which is the
        // plaintext atime of a directory whose header keeps none.
        let fd: Int32
        do {
            fd = try Sys.retrying { Glibc.openat(number, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC | encfsd_O_NOATIME) }
        } catch StoreError.system(EPERM) {
            fd = try Sys.retrying { Glibc.openat(number, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        }
        // The stream owns the new descriptor from here: closedir closes it.
        guard let dir = fdopendir(fd) else {
            let e = errno
            Glibc.close(fd)
            throw StoreError.system(e)
        }
        defer { closedir(dir) }
        var entries: [Sys.RawEntry] = []
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
            entries.append(Sys.RawEntry(name: name, inode: UInt64(entry.pointee.d_ino),
                                        isDirectory: entry.pointee.d_type == UInt8(DT_DIR)))
        }
        return entries
    }

    /// An ioctl whose argument is a buffer read and written in place.
    public func ioctl(_ request: UInt, _ buffer: inout [UInt8]) throws {
        let rc = buffer.withUnsafeMutableBytes { encfsd_ioctl(number, request, $0.baseAddress) }
        try Sys.check(rc)
    }

    /// The kernel file handle of the entry `name` of this directory (`name` empty and `flags`
    /// AT_EMPTY_PATH: of this descriptor's own object), with its type in the first four bytes;
    /// nil where the filesystem gives none. (`name_to_handle_at(2)`)
    func fileHandle(_ name: [UInt8], flags: Int32) -> (type: Int32, handle: [UInt8])? {
        var bytes = [UInt8](repeating: 0, count: 132)
        var length: UInt32 = 0
        var type: Int32 = 0
        let rc = (try? Sys.withCName(name) { p in
            bytes.withUnsafeMutableBufferPointer { encfsd_file_handle(number, p, flags, $0.baseAddress! + 4, 128, &length, &type) }
        }) ?? -1
        guard rc == 0 else { return nil }
        withUnsafeBytes(of: type.littleEndian) { for i in 0..<4 { bytes[i] = $0[i] } }
        return (type, Array(bytes.prefix(4 + Int(length))))
    }

    // MARK: extended attributes on backing objects

    public func fsetxattr(_ name: String, _ value: [UInt8], flags: Int32) throws {
        try Sys.check(value.withUnsafeBytes { CLinux.fsetxattr(number, name, $0.baseAddress, $0.count, flags) })
    }

    public func fgetxattr(_ name: String) throws -> [UInt8] {
        while true {
            let size = try Sys.retrying { CLinux.fgetxattr(number, name, nil, 0) }
            var value = [UInt8](repeating: 0, count: size)
            let n = value.withUnsafeMutableBytes { CLinux.fgetxattr(number, name, $0.baseAddress, $0.count) }
            if n >= 0 { return Array(value.prefix(n)) }
            if errno != ERANGE { throw Sys.failure() }
        }
    }

    public func flistxattr() throws -> [String] {
        while true {
            let size = try Sys.retrying { CLinux.flistxattr(number, nil, 0) }
            if size == 0 { return [] }
            var buf = [CChar](repeating: 0, count: size)
            let n = CLinux.flistxattr(number, &buf, buf.count)
            if n < 0 {
                if errno == ERANGE { continue }
                throw Sys.failure()
            }
            return buf.prefix(n).split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        }
    }

    public func fremovexattr(_ name: String) throws {
        try Sys.check(CLinux.fremovexattr(number, name))
    }

    // MARK: the store lock and the size limit

    /// Takes an exclusive open file description lock on all of the file, without waiting:
    /// false when another description holds a conflicting lock. (`fcntl(F_OFD_SETLK)`)
    func lockWholeFile() throws -> Bool {
        do {
            _ = try Sys.retrying { encfsd_ofd_lock_whole(number, encfsd_F_WRLCK) }
            return true
        } catch StoreError.system(let code) where code == EAGAIN || code == EACCES {
            return false
        }
    }

    /// The largest length `ftruncate` accepts for a file in this directory's filesystem, up to
    /// `limit`; nil if that cannot be found out. The kernel exposes a filesystem's largest file
    /// size (`s_maxbytes`) only this way: the probe is an unnamed `O_TMPFILE` file, sparse, that
    /// vanishes when closed. Its calls are not in the operation log: it never touches the store's
    /// state. (The daemon ignores SIGXFSZ, so an `RLIMIT_FSIZE` shows here as EFBIG.)
    func probeLargestFile(upTo limit: Int64) -> Int64? {
        guard let probe = try? Sys.openUnnamed(in: self, mode: 0o600) else { return nil }
        func fits(_ length: Int64) -> Bool? {
            while true {
                if Glibc.ftruncate(probe.number, off_t(length)) == 0 { return true }
                switch errno {
                case EINTR: continue
                case EFBIG, EINVAL: return false
                default: return nil
                }
            }
        }
        guard let all = fits(limit) else { return nil }
        if all { return limit }
        var low: Int64 = 0, high = limit - 1 // low fits, high + 1 does not
        while low < high {
            let middle = low + (high - low + 1) / 2
            guard let ok = fits(middle) else { return nil }
            if ok { low = middle } else { high = middle - 1 }
        }
        return low
    }
}

extension Sys {
    /// Runs `body` with "/proc/self/fd/<number>" as a C string built on the stack: every lookup
    /// reopens through it, and an interpolated String cost an allocation and a number
    /// formatting per call.
    static func withProcPath<R: ~Copyable>(_ number: Int32, _ body: (UnsafePointer<CChar>) throws -> R) rethrows -> R {
        let prefix: StaticString = "/proc/self/fd/"
        let length = prefix.utf8CodeUnitCount
        return try withUnsafeTemporaryAllocation(of: CChar.self, capacity: length + 12) { buffer in
            let base = buffer.baseAddress!
            UnsafeMutableRawPointer(base).copyMemory(from: prefix.utf8Start, byteCount: length)
            var digits = 1
            var rest = UInt32(bitPattern: number) / 10
            while rest > 0 { digits += 1; rest /= 10 }
            var value = UInt32(bitPattern: number)
            for at in stride(from: length + digits - 1, through: length, by: -1) {
                base[at] = CChar(0x30 + value % 10)
                value /= 10
            }
            base[length + digits] = 0
            return try body(base)
        }
    }
}
