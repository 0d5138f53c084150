import CLinux
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// System calls of the store lock (`StoreLock`) and the size limit (`SizeLimit`): part of `Sys`,
/// the one door to the backing store's system calls, in a file of their own.
extension Sys {
    /// Takes an exclusive open file description lock on all of `fd`'s file, without waiting:
    /// false when another description holds a conflicting lock. (`fcntl(F_OFD_SETLK)`)
    static func lockWholeFile(_ fd: Int32) throws -> Bool {
        if encfsd_ofd_lock_whole(fd, encfsd_F_WRLCK) == 0 { return true }
        if errno == EAGAIN || errno == EACCES { return false }
        throw StoreError.system(errno)
    }

    /// The largest length `ftruncate` accepts for a file in `directory`'s filesystem, up to
    /// `limit`; nil if that cannot be found out. The kernel exposes a filesystem's largest file
    /// size (`s_maxbytes`) only this way: the probe is an unnamed `O_TMPFILE` file, sparse, that
    /// vanishes when closed. Its calls are not in the operation log: it never touches the store's
    /// state. (The daemon ignores SIGXFSZ, so an `RLIMIT_FSIZE` shows here as EFBIG.)
    static func probeLargestFile(in directory: Int32, upTo limit: Int64) -> Int64? {
        let fd = Glibc.openat(directory, ".", oTmpFile | O_RDWR | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        func fits(_ length: Int64) -> Bool? {
            while true {
                if Glibc.ftruncate(fd, off_t(length)) == 0 { return true }
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
