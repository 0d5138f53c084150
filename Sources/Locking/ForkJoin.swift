import Synchronization
import CLinux
#if canImport(Glibc)
import Glibc
#endif

/// Runs the pieces of one loop of independent work (the extents of one write, read or commit) on
/// the calling thread and on helper threads that live as long as the process, and returns when
/// every piece is done.
///
/// Without the writeback cache the kernel sends a single writer's WRITE requests one at a time
/// and waits for each reply, so sealing a 1 MiB request ran on one core while the others idled
/// (PERFORMANCE.md, "Extents sealed on every core"). The caller works too, taking pieces until
/// none are left, so it never waits for a helper that has not started: when the helpers are
/// busy with another request's loop, the caller simply does all of it, as before. It waits only
/// for pieces a helper has already taken.
///
/// Invariant making this `@unchecked Sendable`: `wake` is a semaphore at a fixed heap address for
/// the life of the process, touched only through `sem_post` and `sem_wait`, which are
/// thread-safe; everything else is a constant or behind `current`'s lock.
public final class ForkJoin: @unchecked Sendable {
    /// One helper per CPU this process may run on beyond the caller's, at most 7: a helper
    /// beyond the CPUs would be preempted holding a piece its caller waits for.
    public static let shared = ForkJoin(helpers: min(7, max(0, usableCPUs() - 1)))

    /// Helpers actually running (fewer than asked when the system refused a thread).
    public let helpers: Int
    /// The loop helpers may join: one at a time, so a helper never has to choose.
    private let current = Lock<Job?>(nil)
    /// Counts wake-ups owed to the helpers. Never freed: the helpers wait on it for the life of
    /// the process.
    private let wake: UnsafeMutablePointer<sem_t>

    public init(helpers wanted: Int) {
        wake = .allocate(capacity: 1)
        precondition(sem_init(wake, 0, 0) == 0, "sem_init failed")
        // A thread limit reached (RLIMIT_NPROC, a cgroup's pids.max) leaves fewer helpers, never a
        // failed request: the caller does whatever no helper takes.
        var started = 0
        while started < wanted && Self.startHelper(wake: wake, current: current) { started += 1 }
        helpers = started
    }

    /// CPUs in this process's affinity mask (a container's or `taskset`'s), or the online CPUs.
    private static func usableCPUs() -> Int {
        let allowed = Int(encfsd_usable_cpus())
        return allowed > 0 ? allowed : sysconf(Int32(_SC_NPROCESSORS_ONLN))
    }

    /// Calls `body(i)` once for every `i` in `0..<count`, in any order and on any of the
    /// participating threads (the caller's always among them); `body` must be safe to run
    /// concurrently with itself for different `i`.
    public func forEach(_ count: Int, _ body: (Int) -> Void) {
        guard count > 1, helpers > 0 else {
            for i in 0..<count { body(i) }
            return
        }
        withoutActuallyEscaping(body) { escapable in
            var piece = escapable
            withUnsafePointer(to: &piece) { pointer in
                let job = Job(count: count, body: UnsafeRawPointer(pointer))
                let published = current.withLock { slot -> Bool in
                    guard slot == nil else { return false }
                    slot = job
                    return true
                }
                if published {
                    for _ in 0..<min(helpers, count - 1) { sem_post(wake) }
                }
                job.work()
                if published {
                    current.withLock { slot in if slot === job { slot = nil } }
                    job.waitForHelpers()
                }
            }
        }
    }

    /// What a helper thread needs: the pool's wake-ups and its published loop, not the pool.
    private final class HelperContext {
        let wake: UnsafeMutablePointer<sem_t>
        let current: Lock<Job?>
        init(wake: UnsafeMutablePointer<sem_t>, current: Lock<Job?>) {
            self.wake = wake
            self.current = current
        }

        func serve() -> Never {
            while true {
                while sem_wait(wake) != 0 {} // EINTR
                // A wake-up may outlive its loop: then there is nothing (or a later loop) to join.
                if let job = current.withLock({ $0 }) { job.work() }
            }
        }
    }

    /// Starts one helper; false if the system refused the thread.
    private static func startHelper(wake: UnsafeMutablePointer<sem_t>, current: Lock<Job?>) -> Bool {
        // Every signal blocked before the thread exists, so none is ever handled on a helper
        // (shutdown and request interruption are for the daemon's own threads); the creator's
        // mask is restored after.
        var all = sigset_t(), previous = sigset_t()
        sigfillset(&all)
        pthread_sigmask(SIG_SETMASK, &all, &previous)
        defer { pthread_sigmask(SIG_SETMASK, &previous, nil) }
        var thread = pthread_t()
        let context = Unmanaged.passRetained(HelperContext(wake: wake, current: current)).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            Unmanaged<HelperContext>.fromOpaque(raw!).takeRetainedValue().serve()
        }, context)
        guard rc == 0 else {
            Unmanaged<HelperContext>.fromOpaque(context).release()
            return false
        }
        pthread_detach(thread)
        return true
    }

    /// One loop's progress. A helper can hold the job after the loop returned (it woke late, or
    /// found every piece taken); it then only reads `next`, never `body`, whose closure lives
    /// on the caller's stack.
    ///
    /// Invariant making this `@unchecked Sendable`: `body` is dereferenced only for a piece
    /// taken from `next` below `count`, and the caller does not return before `finished`
    /// reaches `count`, so the closure it points to is alive at every dereference.
    private final class Job: @unchecked Sendable {
        let count: Int
        let body: UnsafeRawPointer
        let next = Atomic<Int>(0)
        let finished = Atomic<Int>(0)
        let done: UnsafeMutablePointer<sem_t>

        init(count: Int, body: UnsafeRawPointer) {
            self.count = count
            self.body = body
            done = .allocate(capacity: 1)
            precondition(sem_init(done, 0, 0) == 0, "sem_init failed")
        }

        deinit {
            sem_destroy(done)
            done.deallocate()
        }

        /// Takes pieces until none are left; whoever finishes the last one tells the caller.
        func work() {
            while true {
                let i = next.wrappingAdd(1, ordering: .relaxed).oldValue
                guard i < count else { return }
                run(i)
                if finished.wrappingAdd(1, ordering: .acquiringAndReleasing).newValue == count {
                    sem_post(done)
                }
            }
        }

        @inline(never)
        private func run(_ i: Int) {
            body.assumingMemoryBound(to: ((Int) -> Void).self).pointee(i)
        }

        /// Called by the caller after its own `work`: every piece is taken, some may still run.
        func waitForHelpers() {
            while finished.load(ordering: .acquiring) < count {
                while sem_wait(done) != 0 {} // EINTR
            }
        }
    }
}
