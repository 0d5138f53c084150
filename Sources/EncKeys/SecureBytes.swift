import EncCrypto
#if canImport(Glibc)
import Glibc
#endif

/// Key material in memory that is locked against swapping, excluded from core dumps, and
/// overwritten when the last reference goes away.
///
/// Invariant making this `@unchecked Sendable`: the bytes are written only during `init`
/// (before the object is shared) and are read-only afterwards until `deinit`.
public final class SecureBytes: @unchecked Sendable {
    public let count: Int
    private let base: UnsafeMutableRawPointer
    private let mapped: Int

    public init(count: Int, fill: (UnsafeMutableRawBufferPointer) throws -> Void) rethrows {
        self.count = count
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        mapped = max(page, (count + page - 1) / page * page)
        guard let p = mmap(nil, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              p != MAP_FAILED else { fatalError("mmap for key material failed") }
        base = p
        // mlock can fail under a small RLIMIT_MEMLOCK; the key still works, and MADV_DONTDUMP
        // still keeps it out of core files. SECURITY.md documents raising the limit.
        _ = mlock(base, mapped)
        _ = madvise(base, mapped, MADV_DONTDUMP)
        do {
            try fill(UnsafeMutableRawBufferPointer(start: base, count: count))
        } catch {
            OpenSSL.cleanse(UnsafeMutableRawBufferPointer(start: base, count: mapped))
            munmap(base, mapped)
            throw error
        }
    }

    public convenience init(copying bytes: UnsafeRawBufferPointer) {
        self.init(count: bytes.count) { $0.copyMemory(from: bytes) }
    }

    public func withBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: base, count: count))
    }

    deinit {
        OpenSSL.cleanse(UnsafeMutableRawBufferPointer(start: base, count: mapped))
        munlock(base, mapped)
        munmap(base, mapped)
    }
}
