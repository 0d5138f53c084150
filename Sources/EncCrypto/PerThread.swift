#if canImport(Glibc)
import Glibc
#endif

/// One `T` per thread, made on the thread's first use and released when the thread exits
/// (pthread key destructor). For state a FUSE worker reuses on every request and must never
/// share: OpenSSL contexts, scratch buffers.
///
/// Invariant making this `@unchecked Sendable`: `key` and `make` are set in `init` and never
/// change; each thread only ever touches its own value.
package final class PerThread<T: AnyObject>: @unchecked Sendable {
    /// A `let`: read on every seal and open, and a `var` would be checked for exclusive access at
    /// run time on each read.
    private let key: pthread_key_t
    private let make: () -> T

    package init(_ make: @escaping () -> T) {
        var key = pthread_key_t()
        let rc = pthread_key_create(&key) { raw in
            guard let raw else { return }
            Unmanaged<AnyObject>.fromOpaque(raw).release()
        }
        precondition(rc == 0, "pthread_key_create failed: \(rc)")
        self.key = key
        self.make = make
    }

    /// The calling thread's value. Never hand it to another thread.
    package var current: T {
        if let raw = pthread_getspecific(key) {
            return Unmanaged<T>.fromOpaque(raw).takeUnretainedValue()
        }
        let fresh = make()
        // Released by the destructor as AnyObject: the same single object reference.
        pthread_setspecific(key, Unmanaged<T>.passRetained(fresh).toOpaque())
        return fresh
    }

    /// Runs `body` with the calling thread's value, without the retain and release returning it
    /// costs: the thread's own reference keeps it alive until the thread exits, which cannot
    /// happen during `body`. For the per-extent path.
    @inline(__always)
    package func withCurrent<R>(_ body: (T) -> R) -> R {
        if let raw = pthread_getspecific(key) {
            return Unmanaged<T>.fromOpaque(raw)._withUnsafeGuaranteedRef(body)
        }
        return body(current)
    }
}
