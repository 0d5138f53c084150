#if canImport(Glibc)
import Glibc
#endif

/// A pthread reader-writer lock.
///
/// It lets reads of one file decrypt in parallel on several FUSE workers while a commit, which
/// rewrites extents in place, waits for them and holds them off. `Lock` cannot express shared
/// holders, and the lock is released by a different scope than the one that takes it (the read
/// takes it under the node lock and finishes after dropping that), so it is a class with explicit
/// lock and unlock.
///
/// Invariant making this `@unchecked Sendable`: the pthread lock lives at a fixed heap address for
/// the object's whole life and is only touched through the pthread calls, which are thread-safe.
public final class ReadWriteLock: @unchecked Sendable {
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    public init() {
        lock = .allocate(capacity: 1)
        lock.initialize(to: pthread_rwlock_t())
        precondition(pthread_rwlock_init(lock, nil) == 0, "pthread_rwlock_init failed")
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    public func lockShared() { precondition(pthread_rwlock_rdlock(lock) == 0) }
    public func unlockShared() { precondition(pthread_rwlock_unlock(lock) == 0) }

    public func withExclusive<R>(_ body: () throws -> R) rethrows -> R {
        precondition(pthread_rwlock_wrlock(lock) == 0)
        defer { precondition(pthread_rwlock_unlock(lock) == 0) }
        return try body()
    }
}
