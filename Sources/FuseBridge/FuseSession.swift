import Locking
import CFuse3
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

// Every libfuse call encfsd makes is in this file.
//
// libfuse calls the operations below from its worker threads. They are nonisolated file-scope
// functions (C function pointers cannot capture), and reach the filesystem through the
// session's userdata, an unmanaged reference to `BridgeContext` that outlives the session loop.

/// State the callbacks reach through `fuse_req_userdata`.
final class BridgeContext: Sendable {
    let fileSystem: any FileSystem
    let options: MountOptions
    let counts: RequestCounts
    /// The session, for notifications sent while answering a request (set once it exists).
    let session = Atomic<UInt>(0)
    let privileges = PrivilegeNegotiation()
    init(fileSystem: any FileSystem, options: MountOptions, counts: RequestCounts) {
        self.fileSystem = fileSystem
        self.options = options
        self.counts = counts
    }
}

/// Every request the kernel has sent the session, one relaxed add each: `encfsd status` shows
/// them so a benchmark can count round trips per operation without debug logs, and `--idle`
/// watches `answered` (forgets come from the kernel's cache pressure, not from a user).
public final class RequestCounts: Sendable {
    /// Requests that get a reply (every operation but the two forgets).
    private let answeredCount = Atomic<UInt64>(0)
    /// FORGET and BATCH_FORGET requests (one per request, however many nodes a batch names).
    private let forgetCount = Atomic<UInt64>(0)

    public init() {}

    public var answered: UInt64 { answeredCount.load(ordering: .relaxed) }
    public var forgets: UInt64 { forgetCount.load(ordering: .relaxed) }

    @inline(__always) func countAnswered() { answeredCount.wrappingAdd(1, ordering: .relaxed) }
    @inline(__always) func countForget() { forgetCount.wrappingAdd(1, ordering: .relaxed) }
}

public enum FuseError: Error, CustomStringConvertible {
    case sessionCreation
    case mount(String)
    case loop(Int32)

    public var description: String {
        switch self {
        case .sessionCreation: "libfuse refused the mount options"
        case .mount(let point): "cannot mount on \(point) (is it an existing directory, and is /dev/fuse usable?)"
        case .loop(let rc): "the FUSE session ended with error \(rc)"
        }
    }
}

/// A mounted FUSE session.
///
/// Invariant making this `@unchecked Sendable`: `session` is set in `init` and only passed to
/// libfuse functions that are documented thread-safe (loop, exit, notify), or used in `deinit`.
public final class FuseSession: @unchecked Sendable {
    private let session: OpaquePointer
    private let context: Unmanaged<BridgeContext>
    private let options: MountOptions
    private var mounted = false
    /// Posted when a request thread stops or `exit` is called; the thread in `run` waits on it
    /// (and a signal interrupts the wait).
    private let finished: UnsafeMutablePointer<sem_t>

    public init(fileSystem: any FileSystem, options: MountOptions, counts: RequestCounts = RequestCounts()) throws {
        self.options = options
        let context = Unmanaged.passRetained(BridgeContext(fileSystem: fileSystem, options: options, counts: counts))
        self.context = context
        var mountOptions = ["fsname=\(options.fsName)", "subtype=encfsd", "default_permissions"]
        if options.allowOther { mountOptions.append("allow_other") }
        mountOptions += options.extra
        let argv = ["encfsd", "-o", mountOptions.joined(separator: ",")]
        var ops = makeOperations()
        let cStrings = argv.map { strdup($0) }
        defer { cStrings.forEach { free($0) } }
        var cArgv: [UnsafeMutablePointer<CChar>?] = cStrings
        let created: OpaquePointer? = cArgv.withUnsafeMutableBufferPointer { buf in
            var args = fuse_args(argc: Int32(argv.count), argv: buf.baseAddress, allocated: 0)
            defer { fuse_opt_free_args(&args) }
            return fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, context.toOpaque())
        }
        guard let created else {
            context.release()
            throw FuseError.sessionCreation
        }
        guard fuse_set_signal_handlers(created) == 0 else {
            fuse_session_destroy(created)
            context.release()
            throw FuseError.sessionCreation
        }
        guard fuse_session_mount(created, options.mountpoint) == 0 else {
            fuse_remove_signal_handlers(created)
            fuse_session_destroy(created)
            context.release()
            throw FuseError.mount(options.mountpoint)
        }
        // Every reply passes through `deviceWritev`, so the INIT reply can name
        // FUSE_HANDLE_KILLPRIV_V2 (see `PrivilegeNegotiation`); reads are plain reads.
        var io = fuse_custom_io(writev: deviceWritev, read: deviceRead, splice_receive: nil, splice_send: nil)
        guard fuse_session_custom_io(created, &io, fuse_session_fd(created)) == 0 else {
            fuse_session_unmount(created)
            fuse_remove_signal_handlers(created)
            fuse_session_destroy(created)
            context.release()
            throw FuseError.sessionCreation
        }
        session = created
        finished = .allocate(capacity: 1)
        sem_init(finished, 0, 0)
        context.takeUnretainedValue().session.store(UInt(bitPattern: Int(bitPattern: UnsafeRawPointer(created))), ordering: .releasing)
        mounted = true
    }

    /// Serves requests on a pool of threads until unmounted, signalled or `exit`ed; returns
    /// normally for all three, so the daemon closes its store cleanly after a SIGTERM too (every
    /// request thread has finished its request by then). It does not unmount: that closes the
    /// session's descriptor while other threads may still send notifications through it.
    public func run() throws {
        try RequestLoop(session: session, context: context.takeUnretainedValue(), options: options, finished: finished).serve()
    }

    /// Ends `run`: its threads finish the requests they hold and stop.
    public func exit() {
        fuse_session_exit(session)
        sem_post(finished)
    }

    /// How many requests the session has answered (forgets aside): unchanged means idle.
    public var requestCount: UInt64 { context.takeUnretainedValue().counts.answered }

    /// Makes the kernel forget a cached name (`fuse_lowlevel_notify_inval_entry`). Safe from any
    /// thread; never call it while handling a request on `parent` that holds its lock (none of
    /// encfsd's callers do: ioctls, releases and background work hold no directory lock).
    public func invalidateEntry(parent: UInt64, name: [UInt8]) {
        _ = name.withUnsafeBufferPointer { buf in
            buf.baseAddress!.withMemoryRebound(to: CChar.self, capacity: buf.count) {
                fuse_lowlevel_notify_inval_entry(session, parent, $0, buf.count)
            }
        }
    }

    /// Makes the kernel drop an inode's cached attributes and pages (`..._inval_inode`).
    public func invalidateInode(_ node: UInt64) {
        _ = fuse_lowlevel_notify_inval_inode(session, node, 0, 0)
    }

    /// Makes the kernel drop an inode's cached attributes only, its pages staying (a negative
    /// offset to `..._inval_inode`). Takes no page or inode lock in the kernel, so it is safe
    /// inside any request, one on the same inode included.
    public func invalidateAttributes(_ node: UInt64) {
        _ = fuse_lowlevel_notify_inval_inode(session, node, -1, 0)
    }

    deinit {
        if mounted { fuse_session_unmount(session) }
        fuse_remove_signal_handlers(session)
        fuse_session_destroy(session)
        context.release()
        sem_destroy(finished)
        finished.deallocate()
    }
}

// MARK: - the request loop

/// The threads that read requests from /dev/fuse and answer them. It stands where libfuse's
/// `fuse_session_loop_mt` stood, for one reason: libfuse 3.14 (Debian 12's) answers FUSE_STATX,
/// which Linux 6.6+ sends when statx asks for a birth time, with ENOSYS, and the kernel then
/// never asks again. Each thread reads a request into a buffer of its own with the public
/// `fuse_session_receive_buf`, answers FUSE_STATX itself, and gives every other request to
/// `fuse_session_process_buf`, which dispatches it exactly as libfuse's loop would (interrupts,
/// forgets and the rest stay libfuse's business). The only work added to an ordinary request is
/// reading its opcode, which libfuse's loop also does to keep forgets from starting threads, and
/// for a write, setattr or open the kill flag libfuse does not decode (`PrivilegeNegotiation`).
///
/// Threads come and go as in libfuse's loop: one to start, another whenever a request finds no
/// thread waiting, up to `threads`; a thread that finishes a request while more than the idle
/// limit are waiting stops. Exit signals are blocked on these threads, so they interrupt the
/// wait in `serve`; unmounting ends every read with ENODEV.
///
/// An ordinary request touches only atomics here: every thread counted itself in and out under
/// one lock twice per request, the most contended lock in the daemon (PERFORMANCE.md, "Locks
/// that convoy"). The lock is taken only to start or end a thread, and to stop.
///
/// Invariant making this `@unchecked Sendable`: every stored property is immutable, an Atomic,
/// or a Lock.
private final class RequestLoop: @unchecked Sendable {
    /// One request thread, shared by the table and the thread itself.
    final class Worker: Sendable {
        let id: Int
        /// 0 until `launch` knows it; set once, before the thread is signalled.
        let thread = Atomic<UInt>(0)
        /// Waiting for a request in (or on the way into) `fuse_session_receive_buf`: only then
        /// may `stop` signal it (a signal elsewhere could end a backing-store call with EINTR).
        let receiving = Atomic<Bool>(true)
        init(id: Int) { self.id = id }
    }

    struct State {
        /// Threads in the loop: a thread removes itself, under the lock, as the last thing it
        /// does with the session, so a thread named here is alive and may be signalled.
        var workers: [Int: Worker] = [:]
        var nextID = 0
        var stopping = false
        /// The read error that ended the loop, negated errno; 0 for an unmount or a signal.
        var error: Int32 = 0
    }

    let session: OpaquePointer
    let context: BridgeContext
    let maxThreads: Int
    let maxWaiting: Int
    let finished: UnsafeMutablePointer<sem_t>
    let state = Lock(State())
    /// Threads waiting for a request, or about to (libfuse's `numavail`). Only a heuristic for
    /// starting and ending threads: the table under `state` is what `stop` trusts.
    let waiting = Atomic<Int>(0)

    init(session: OpaquePointer, context: BridgeContext, options: MountOptions, finished: UnsafeMutablePointer<sem_t>) {
        self.session = session
        self.context = context
        maxThreads = max(1, options.threads)
        maxWaiting = max(2, options.threads / 2)
        self.finished = finished
    }

    func serve() throws {
        let wakeSignal = encfsd_install_wake_signal()
        guard wakeSignal > 0 else { throw FuseError.loop(-errno) }
        guard let first = state.withLock({ reserve(&$0) }), launch(first) else { throw FuseError.loop(-EAGAIN) }
        // A signal interrupts sem_wait (libfuse installs its handlers without SA_RESTART).
        while fuse_session_exited(session) == 0 { sem_wait(finished) }
        stop(wakeSignal)
        let error = state.withLock { $0.error }
        if error != 0 { throw FuseError.loop(error) }
    }

    /// Counts a thread about to start, if the limit allows one; `launch` starts it.
    private func reserve(_ s: inout State) -> Worker? {
        guard !s.stopping, s.workers.count < maxThreads else { return nil }
        let worker = Worker(id: s.nextID)
        s.nextID += 1
        s.workers[worker.id] = worker
        waiting.add(1, ordering: .relaxed)
        return worker
    }

    private func launch(_ worker: Worker) -> Bool {
        var exitSignals = sigset_t(), previous = sigset_t()
        sigemptyset(&exitSignals)
        for signal in [SIGTERM, SIGINT, SIGHUP, SIGQUIT] { sigaddset(&exitSignals, signal) }
        pthread_sigmask(SIG_BLOCK, &exitSignals, &previous)
        let start = Unmanaged.passRetained(WorkerStart(loop: self, worker: worker))
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            let start = Unmanaged<WorkerStart>.fromOpaque(raw!).takeRetainedValue()
            start.loop.work(start.worker)
            return nil
        }, start.toOpaque())
        pthread_sigmask(SIG_SETMASK, &previous, nil)
        guard rc == 0 else {
            start.release()
            state.withLock { _ = $0.workers.removeValue(forKey: worker.id) }
            waiting.subtract(1, ordering: .relaxed)
            return false
        }
        pthread_detach(thread)
        worker.thread.store(UInt(thread), ordering: .releasing)
        return true
    }

    private func work(_ worker: Worker) {
        var buffer = fuse_buf()
        defer { free(buffer.mem) }
        while fuse_session_exited(session) == 0 {
            let received = fuse_session_receive_buf(session, &buffer)
            if received == -EINTR { continue }
            if received <= 0 {
                // 0 is an unmount (libfuse has marked the session exited); below it the device failed.
                if received < 0 {
                    state.withLock { $0.error = received }
                    fuse_session_exit(session)
                }
                break
            }
            // A request spliced into a pipe (never a small one) has no header in memory to read.
            let opcode = buffer.flags.rawValue & FUSE_BUF_IS_FD.rawValue == 0
                ? buffer.mem!.load(as: encfsd_fuse_in_header.self).opcode : 0
            // A burst of forgets must not start a thread per forget.
            let isForget = opcode == encfsd_FUSE_FORGET || opcode == encfsd_FUSE_BATCH_FORGET
            worker.receiving.store(false, ordering: .sequentiallyConsistent)
            if !isForget, waiting.subtract(1, ordering: .relaxed).newValue == 0,
               let another = state.withLock({ reserve(&$0) }) {
                _ = launch(another)
            }
            if opcode == encfsd_FUSE_STATX {
                answerStatx(buffer.mem!, count: Int(received))
            } else {
                let dropsSetID = opcode != 0 && context.privileges.examine(buffer.mem!, count: Int(received), opcode: opcode)
                if dropsSetID { DispatchedRequest.dropsSetID = true }
                fuse_session_process_buf(session, &buffer)
                if dropsSetID { DispatchedRequest.dropsSetID = false }
                // The INIT reply has been processed (the kernel handles it inside the write that
                // sent it): only now does the mount's read-ahead stay as set.
                if opcode == encfsd_FUSE_INIT { KernelReadAhead.apply(context.options) }
            }
            if !isForget, waiting.add(1, ordering: .relaxed).newValue > maxWaiting, leaveIfIdle(worker) { return }
            worker.receiving.store(true, ordering: .sequentiallyConsistent)
        }
        // Posted before the thread leaves the table: `stop` returns once the table is empty, and
        // the semaphore goes with the session after that.
        sem_post(finished)
        state.withLock { _ = $0.workers.removeValue(forKey: worker.id) }
        waiting.subtract(1, ordering: .relaxed)
    }

    /// Ends an idle thread while more than the idle limit wait, keeping the last one. The count
    /// is tested again as it is decremented: others may have taken requests since this thread
    /// saw it high, and leaving then could leave no thread reading the device.
    private func leaveIfIdle(_ worker: Worker) -> Bool {
        state.withLock { s -> Bool in
            guard s.workers.count > 1, !s.stopping else { return false }
            var seen = waiting.load(ordering: .relaxed)
            while seen > maxWaiting {
                let (exchanged, current) = waiting.compareExchange(expected: seen, desired: seen - 1, ordering: .relaxed)
                if exchanged {
                    s.workers[worker.id] = nil
                    return true
                }
                seen = current
            }
            return false
        }
    }

    /// Wakes the threads blocked reading the device and waits until every thread has left.
    /// Threads busy with a request finish it first. A wake can land between a thread's check of
    /// the exit flag and its read and be lost, so waiting threads are signalled again until they
    /// have all gone.
    private func stop(_ wakeSignal: Int32) {
        state.withLock { $0.stopping = true }
        while state.withLock({ s -> Bool in
            for worker in s.workers.values where worker.receiving.load(ordering: .sequentiallyConsistent) {
                let thread = worker.thread.load(ordering: .acquiring)
                if thread != 0 { pthread_kill(pthread_t(thread), wakeSignal) }
            }
            return !s.workers.isEmpty
        }) {
            var deadline = timespec()
            clock_gettime(CLOCK_REALTIME, &deadline)
            deadline.tv_nsec += 10_000_000
            if deadline.tv_nsec >= 1_000_000_000 {
                deadline.tv_sec += 1
                deadline.tv_nsec -= 1_000_000_000
            }
            _ = sem_timedwait(finished, &deadline)
        }
    }

    /// FUSE_STATX: the attributes GETATTR answers with, from the same call, plus the birth time
    /// when the store knows it. The kernel asks for the basic stats and the birth time whatever
    /// statx asked (its `sx_mask` is always both), and caches the basic stats only when the
    /// reply holds them all. An interrupt for this request finds no libfuse request to mark;
    /// libfuse keeps it and answers it EAGAIN with its next request, which the kernel drops once
    /// this reply is in.
    private func answerStatx(_ request: UnsafeMutableRawPointer, count: Int) {
        context.counts.countAnswered()
        let header = request.load(as: encfsd_fuse_in_header.self)
        var reply = encfsd_fuse_statx_reply()
        reply.header.unique = header.unique
        do {
            guard count >= MemoryLayout<encfsd_fuse_in_header>.size + MemoryLayout<encfsd_fuse_statx_in>.size else {
                throw BridgeError.invalid
            }
            let attributes = try context.fileSystem.getattr(header.nodeid)
            (reply.attr_valid, reply.attr_valid_nsec) = validity(context.options.attributeTimeout)
            reply.stat = statxOf(attributes)
            reply.header.len = UInt32(MemoryLayout<encfsd_fuse_statx_reply>.size)
        } catch {
            reply.header.error = -context.fileSystem.errnoValue(of: error)
            reply.header.len = UInt32(MemoryLayout<encfsd_fuse_out_header>.size)
        }
        // A failed write is a request the kernel no longer waits for (ENOENT: interrupted) or a
        // connection gone (ENODEV): nobody to tell either way.
        let length = Int(reply.header.len)
        _ = withUnsafeBytes(of: &reply) { write(fuse_session_fd(session), $0.baseAddress, length) }
    }
}

/// What a request thread starts with (pthread_create passes one pointer).
private final class WorkerStart {
    let loop: RequestLoop
    let worker: RequestLoop.Worker
    init(loop: RequestLoop, worker: RequestLoop.Worker) {
        self.loop = loop
        self.worker = worker
    }
}

/// An attribute timeout as the kernel takes it, seconds and nanoseconds, rounded as libfuse
/// rounds the one it sends with GETATTR.
private func validity(_ timeout: Double) -> (UInt64, UInt32) {
    guard timeout > 0 else { return (0, 0) }
    guard timeout < Double(UInt64.max) else { return (UInt64.max, 0) }
    let seconds = UInt64(timeout)
    let fraction = timeout - Double(seconds)
    return (seconds, fraction >= 0.999999999 ? 999_999_999 : UInt32(fraction * 1e9))
}

/// The statx record of `a`: every basic field as `statOf` gives it to GETATTR (rdev through the
/// same 32-bit encoding the kernel decodes there), and STATX_BTIME only with a birth time.
private func statxOf(_ a: FileAttributes) -> encfsd_fuse_statx {
    func time(_ t: (seconds: Int64, nanoseconds: Int64)) -> encfsd_fuse_sx_time {
        encfsd_fuse_sx_time(tv_sec: t.seconds, tv_nsec: UInt32(truncatingIfNeeded: t.nanoseconds), reserved: 0)
    }
    var sx = encfsd_fuse_statx()
    sx.mask = encfsd_STATX_BASIC_STATS
    sx.blksize = a.blockSize
    sx.nlink = a.linkCount
    sx.uid = a.uid
    sx.gid = a.gid
    sx.mode = UInt16(truncatingIfNeeded: a.mode)
    sx.ino = a.inode
    sx.size = a.size
    sx.blocks = a.blocks
    sx.atime = time(a.accessTime)
    sx.mtime = time(a.modificationTime)
    sx.ctime = time(a.changeTime)
    let rdev = UInt32(truncatingIfNeeded: a.rdev)
    sx.rdev_major = (rdev & 0xfff00) >> 8
    sx.rdev_minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00)
    if let born = a.birthTime {
        sx.mask |= encfsd_STATX_BTIME
        sx.btime = time(born)
    }
    return sx
}

// MARK: - the mount's read-ahead

/// Sets the read-ahead of this mount's backing device info (`/sys/class/bdi/<dev>/read_ahead_kb`).
///
/// The kernel gives a FUSE mount the smaller of its default read-ahead, 128 KiB, and the INIT
/// reply's `max_readahead`, so a stream reached the daemon as 128 KiB READs whatever it asked for.
/// Each READ then decrypted its few extents on one core, with little in flight at a time. At
/// 4 MiB the kernel sends 1 MiB READs, which the fan-out spreads over the cores: 1.5 → 1.9 GB/s
/// on tmpfs (PERFORMANCE.md, "Read-ahead"). Best effort: without write access to sysfs (a
/// container, a mount without root) the mount keeps the kernel's default.
enum KernelReadAhead {
    static func apply(_ options: MountOptions) {
        guard options.readAheadKiB > 0, let device = device(of: options.mountpoint) else { return }
        let fd = Glibc.open("/sys/class/bdi/\(device)/read_ahead_kb", O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        defer { close(fd) }
        let text = Array("\(options.readAheadKiB)\n".utf8)
        _ = text.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }

    /// The `major:minor` of the newest FUSE mount at `mountpoint`, from /proc/self/mountinfo:
    /// reading it sends no request to the mount (a stat of the mount point would, to this very
    /// daemon).
    static func device(of mountpoint: String) -> String? {
        guard let table = readAll("/proc/self/mountinfo") else { return nil }
        var found: String?
        for line in table.split(separator: "\n") {
            let halves = line.split(separator: " - ", maxSplits: 1)
            let fields = halves[0].split(separator: " ")
            // "fuse" or "fuse.<subtype>": a fuseblk mount's numbers are its block device's.
            guard halves.count == 2, fields.count >= 5, halves[1].hasPrefix("fuse ") || halves[1].hasPrefix("fuse."),
                  unescaped(fields[4]) == mountpoint else { continue }
            found = String(fields[2])
        }
        return found
    }

    private static func readAll(_ path: String) -> String? {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return n == 0 ? String(decoding: bytes, as: UTF8.self) : nil }
            bytes += chunk[0..<n]
        }
    }

    /// mountinfo writes space, tab, newline and backslash in a path as octal escapes.
    static func unescaped(_ field: Substring) -> String {
        var bytes: [UInt8] = []
        var rest = Array(field.utf8)[...]
        while let first = rest.first {
            if first == 0x5c, rest.count >= 4, let value = UInt8(String(decoding: rest.dropFirst().prefix(3), as: UTF8.self), radix: 8) {
                bytes.append(value)
                rest = rest.dropFirst(4)
            } else {
                bytes.append(first)
                rest = rest.dropFirst()
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

// MARK: - killing privileges in the daemon (FUSE_HANDLE_KILLPRIV_V2)

/// FUSE_HANDLE_KILLPRIV_V2 moves the decision whether a write, truncate or chown drops set-ID bits
/// from a round trip to a flag. Without it the kernel asks for `security.capability` (GETXATTR)
/// before every write, since FUSE caches no xattr; with it the kernel marks the superblock
/// SB_NOSEC, stops asking once an inode was found to hold neither set-ID bits nor a capability,
/// and sends FUSE_WRITE_KILL_SUIDGID, FATTR_KILL_SUIDGID or FUSE_OPEN_KILL_SUIDGID where the
/// caller lacks CAP_FSETID (and FATTR_KILL_SUIDGID on every chown of a non-directory). The
/// daemon then clears the bits itself (`FileSystem` gets a `dropSetID` flag).
///
/// libfuse 3.14 knows neither the INIT flag nor the request flags: `fuse_conn_info` has no
/// capability bit for it, and its decoders drop `write_flags`, `open_flags` and the kill bit of
/// `valid`. So the daemon takes both ends itself, through libfuse's public interfaces: the
/// request loop reads the raw request before `fuse_session_process_buf` dispatches it (as it
/// already does for the opcode), and the INIT reply goes out through `fuse_session_custom_io`'s
/// writev, which adds the flag when the kernel offered it. libfuse's own state does not depend
/// on the flag, so it never learns.
///
/// FUSE_HANDLE_KILLPRIV (v1), which libfuse could negotiate, is not used: it makes the daemon kill
/// on every write whatever the caller's capabilities and keeps the per-write probe.
final class PrivilegeNegotiation: Sendable {
    /// The unique ID of the INIT request whose reply is to carry the flag; 0 when none.
    private let initUnique = Atomic<UInt64>(0)
    private let negotiatedFlag = Atomic<Bool>(false)

    /// Whether the kernel accepted FUSE_HANDLE_KILLPRIV_V2 for this session.
    var negotiated: Bool { negotiatedFlag.load(ordering: .relaxed) }

    /// Looks at a request before libfuse dispatches it: an INIT that offers the flag is noted
    /// for its reply; for a write, setattr or open, returns whether it carries a kill flag. Any
    /// other request costs a comparison or two. CREATE can carry FUSE_OPEN_KILL_SUIDGID too (an
    /// O_CREAT|O_TRUNC open), but it concerns a file that already exists, and encfsd's create
    /// never opens one (the name is entered with RENAME_NOREPLACE or linkat, EEXIST otherwise):
    /// a new file keeps the mode it was created with, as on ext4.
    func examine(_ request: UnsafeMutableRawPointer, count: Int, opcode: UInt32) -> Bool {
        let headerSize = MemoryLayout<encfsd_fuse_in_header>.size
        func field<T>(_ type: T.Type) -> T? {
            count >= headerSize + MemoryLayout<T>.size ? request.loadUnaligned(fromByteOffset: headerSize, as: T.self) : nil
        }
        switch opcode {
        case encfsd_FUSE_WRITE:
            guard negotiated, let write = field(encfsd_fuse_write_in.self) else { return false }
            return write.write_flags & encfsd_FUSE_WRITE_KILL_SUIDGID != 0
        case encfsd_FUSE_SETATTR:
            // `valid` leads fuse_setattr_in. A SETATTR that sets nothing can be a kill too: where
            // the VFS kills privileges itself (file_modified before a fallocate, chown(f, -1, -1))
            // fuse strips ATTR_KILL_SUID/SGID and the mode they imply, sends what is left and,
            // under killpriv v2, adds no flag. The same empty SETATTR follows a kill of
            // `security.capability` alone, by a writer whose CAP_FSETID keeps the set-ID bits, so
            // the writer's capability decides, as in should_remove_suid.
            guard negotiated, let valid = field(UInt32.self) else { return false }
            if valid & encfsd_FATTR_KILL_SUIDGID != 0 { return true }
            guard valid & ~(encfsd_FATTR_FH | encfsd_FATTR_LOCKOWNER | encfsd_FATTR_CTIME) == 0 else { return false }
            return !Self.holdsFSETID(thread: request.load(as: encfsd_fuse_in_header.self).pid)
        case encfsd_FUSE_OPEN:
            guard negotiated, let open = field(encfsd_fuse_open_in.self) else { return false }
            return open.open_flags & encfsd_FUSE_OPEN_KILL_SUIDGID != 0
        case encfsd_FUSE_INIT:
            if let offered = field(encfsd_fuse_init_prefix.self), offered.flags & encfsd_FUSE_HANDLE_KILLPRIV_V2 != 0 {
                initUnique.store(request.load(as: encfsd_fuse_in_header.self).unique, ordering: .relaxed)
            }
            return false
        default:
            return false
        }
    }

    /// Whether the requesting thread (the request header's pid, a thread ID in the mount's pid
    /// namespace) has CAP_FSETID in the daemon's user namespace, from /proc. The thread waits in
    /// its system call until the reply, so its ID names it throughout. Anything unknown (pid 0
    /// for a caller in a pid namespace the mount cannot see, another user namespace, an
    /// unreadable status) counts as lacking it: the bits then go, the safe way to be wrong.
    static func holdsFSETID(thread: UInt32) -> Bool {
        guard thread != 0 else { return false }
        var own = stat(), theirs = stat()
        guard stat("/proc/self/ns/user", &own) == 0, stat("/proc/\(thread)/ns/user", &theirs) == 0,
              own.st_ino == theirs.st_ino, own.st_dev == theirs.st_dev else { return false }
        let fd = Glibc.open("/proc/\(thread)/status", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var status = [UInt8](repeating: 0, count: 4096)
        let n = status.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0, let text = String(validating: status[0..<n], as: UTF8.self),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("CapEff:") }),
              let effective = UInt64(line.dropFirst("CapEff:".count).trimmingPrefix(while: { $0 == "\t" || $0 == " " }), radix: 16)
        else { return false }
        let capFSETID: UInt64 = 4
        return effective & (1 << capFSETID) != 0
    }

    /// Adds FUSE_HANDLE_KILLPRIV_V2 (and takes v1 out) if `iov` is the successful reply to the
    /// INIT `examine` noted. libfuse sends every reply as the header and then its body.
    func amendInitReply(_ iov: UnsafeMutablePointer<iovec>, count: Int32) {
        let unique = initUnique.load(ordering: .relaxed)
        guard unique != 0, count >= 2,
              iov[0].iov_len >= MemoryLayout<encfsd_fuse_out_header>.size, let headerBytes = iov[0].iov_base,
              iov[1].iov_len >= MemoryLayout<encfsd_fuse_init_prefix>.size, let body = iov[1].iov_base else { return }
        let header = headerBytes.loadUnaligned(as: encfsd_fuse_out_header.self)
        guard header.unique == unique else { return }
        initUnique.store(0, ordering: .relaxed)
        guard header.error == 0 else { return }
        var reply = body.loadUnaligned(as: encfsd_fuse_init_prefix.self)
        reply.flags = reply.flags & ~encfsd_FUSE_HANDLE_KILLPRIV | encfsd_FUSE_HANDLE_KILLPRIV_V2
        body.storeBytes(of: reply, as: encfsd_fuse_init_prefix.self)
        negotiatedFlag.store(true, ordering: .relaxed)
    }
}

/// `fuse_custom_io.writev`: every reply and notification of the session.
private func deviceWritev(_ fd: Int32, _ iov: UnsafeMutablePointer<iovec>?, _ count: Int32, _ userdata: UnsafeMutableRawPointer?) -> Int {
    if let iov, let userdata {
        Unmanaged<BridgeContext>.fromOpaque(userdata).takeUnretainedValue().privileges.amendInitReply(iov, count: count)
    }
    return writev(fd, iov, count)
}

/// `fuse_custom_io.read`: what libfuse itself would do without custom I/O.
private func deviceRead(_ fd: Int32, _ buffer: UnsafeMutableRawPointer?, _ count: Int, _ userdata: UnsafeMutableRawPointer?) -> Int {
    read(fd, buffer, count)
}

/// What the request loop learned from the raw request a thread is dispatching, for the
/// callback libfuse calls on that same thread inside `fuse_session_process_buf` (libfuse hands
/// the callbacks only what it decoded). A thread dispatches one request at a time.
enum DispatchedRequest {
    private static let dropKey: pthread_key_t = {
        var key = pthread_key_t()
        let rc = pthread_key_create(&key, nil)
        precondition(rc == 0, "pthread_key_create failed: \(rc)")
        return key
    }()

    /// Whether the kernel asked this request to drop set-ID bits (a FUSE_*KILL_SUIDGID flag).
    static var dropsSetID: Bool {
        get { pthread_getspecific(dropKey) != nil }
        set { pthread_setspecific(dropKey, newValue ? UnsafeRawPointer(bitPattern: 1) : nil) }
    }
}

// MARK: - the operation table

private func makeOperations() -> fuse_lowlevel_ops {
    var ops = fuse_lowlevel_ops()
    ops.`init` = opInit
    ops.lookup = opLookup
    ops.forget = opForget
    ops.forget_multi = opForgetMulti
    ops.getattr = opGetattr
    ops.setattr = opSetattr
    ops.readlink = opReadlink
    ops.mknod = opMknod
    ops.mkdir = opMkdir
    ops.unlink = opUnlink
    ops.rmdir = opRmdir
    ops.symlink = opSymlink
    ops.rename = opRename
    ops.link = opLink
    ops.open = opOpen
    ops.read = opRead
    ops.write = opWrite
    ops.flush = opFlush
    ops.release = opRelease
    ops.fsync = opFsync
    ops.opendir = opOpendir
    ops.readdir = opReaddir
    ops.readdirplus = opReaddirplus
    ops.releasedir = opReleasedir
    ops.fsyncdir = opFsyncdir
    ops.statfs = opStatfs
    ops.setxattr = opSetxattr
    ops.getxattr = opGetxattr
    ops.listxattr = opListxattr
    ops.removexattr = opRemovexattr
    ops.create = opCreate
    ops.ioctl = opIoctl
    ops.fallocate = opFallocate
    ops.lseek = opLseek
    return ops
}

// MARK: - helpers

@inline(__always)
private func bridge(_ req: fuse_req_t?) -> BridgeContext {
    Unmanaged<BridgeContext>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
}

/// Runs `body` and answers the request with its errno when it throws.
@inline(__always)
private func answer(_ req: fuse_req_t?, _ body: (BridgeContext) throws -> Void) {
    let context = bridge(req)
    context.counts.countAnswered()
    do {
        try body(context)
    } catch {
        fuse_reply_err(req, context.fileSystem.errnoValue(of: error))
    }
}

private func bytes(_ name: UnsafePointer<CChar>?) -> [UInt8] {
    guard let name else { return [] }
    return Array(UnsafeRawBufferPointer(start: name, count: strlen(name)))
}

private func requestContext(_ req: fuse_req_t?) -> RequestContext {
    let ctx = fuse_req_ctx(req)!.pointee
    return RequestContext(uid: ctx.uid, gid: ctx.gid, pid: ctx.pid, umask: UInt32(ctx.umask))
}

private func statOf(_ a: FileAttributes) -> stat {
    var st = stat()
    st.st_ino = UInt(a.inode)
    st.st_mode = a.mode
    st.st_nlink = UInt(a.linkCount)
    st.st_uid = a.uid
    st.st_gid = a.gid
    st.st_rdev = UInt(a.rdev)
    st.st_size = Int(truncatingIfNeeded: a.size)
    st.st_blocks = Int(truncatingIfNeeded: a.blocks)
    st.st_blksize = Int(a.blockSize)
    st.st_atim = timespec(tv_sec: Int(a.accessTime.seconds), tv_nsec: Int(a.accessTime.nanoseconds))
    st.st_mtim = timespec(tv_sec: Int(a.modificationTime.seconds), tv_nsec: Int(a.modificationTime.nanoseconds))
    st.st_ctim = timespec(tv_sec: Int(a.changeTime.seconds), tv_nsec: Int(a.changeTime.nanoseconds))
    return st
}

private func entryParam(_ ctx: BridgeContext, _ entry: Entry) -> fuse_entry_param {
    var param = fuse_entry_param()
    param.ino = entry.node
    param.generation = 1
    param.attr = statOf(entry.attributes)
    param.attr_timeout = ctx.options.attributeTimeout
    param.entry_timeout = ctx.options.entryTimeout
    return param
}

private func replyEntry(_ req: fuse_req_t?, _ ctx: BridgeContext, _ entry: Entry) {
    var param = entryParam(ctx, entry)
    // The caller was interrupted and the kernel never took this entry: give its reference back.
    if fuse_reply_entry(req, &param) != 0 { ctx.fileSystem.forget(entry.node, count: 1) }
}

private func replyAttr(_ req: fuse_req_t?, _ ctx: BridgeContext, _ attributes: FileAttributes) {
    var st = statOf(attributes)
    fuse_reply_attr(req, &st, ctx.options.attributeTimeout)
}

private func fillOpen(_ fi: UnsafeMutablePointer<fuse_file_info>?, _ reply: OpenReply) {
    guard let fi else { return }
    fi.pointee.fh = reply.handle
    fi.pointee.keep_cache = reply.keepCache ? 1 : 0
}

// MARK: - callbacks

private func opInit(_ userdata: UnsafeMutableRawPointer?, _ conn: UnsafeMutablePointer<fuse_conn_info>?) {
    guard let conn, let userdata else { return }
    let options = Unmanaged<BridgeContext>.fromOpaque(userdata).takeUnretainedValue().options
    // 1 MiB requests: fewer round trips per streamed MiB, and whole extents per write.
    conn.pointee.max_write = 1 << 20
    conn.pointee.max_readahead = 1 << 20
    // Let the kernel send O_TRUNC with open, so truncate-on-open is one request.
    if conn.pointee.capable & UInt32(FUSE_CAP_ATOMIC_O_TRUNC) != 0 {
        conn.pointee.want |= UInt32(FUSE_CAP_ATOMIC_O_TRUNC)
    }
    if conn.pointee.capable & UInt32(FUSE_CAP_IOCTL_DIR) != 0 {
        conn.pointee.want |= UInt32(FUSE_CAP_IOCTL_DIR)
    }
    // Optional (-o writeback_cache): the kernel's page cache absorbs small writes and sends them
    // as large ones at writeback. Measured here it lost more than it won (twice, the second time
    // against the floor, PERFORMANCE.md 2026-12-01): untar sends 13.3 requests per file instead
    // of 15.2 but is no faster, every removed file costs an extra SETATTR (the kernel writes back
    // its ctime), and streaming writes use more daemon CPU than write-through 1 MiB requests. What it requires of the daemon holds:
    // O_WRONLY handles may be read (the store never checks the access mode; the kernel already
    // did), O_APPEND offsets come from the kernel, and mtime arrives by setattr, which wins over
    // the time the buffered writes reached the daemon.
    if options.writebackCache && conn.pointee.capable & UInt32(FUSE_CAP_WRITEBACK_CACHE) != 0 {
        conn.pointee.want |= UInt32(FUSE_CAP_WRITEBACK_CACHE)
    }
    // POSIX ACLs: the kernel caches and enforces them (and turns default_permissions on); the
    // store keeps them in step with the mode and gives new objects their directory's default
    // ACL, so it must also see the umask unapplied (a default ACL replaces it).
    if conn.pointee.capable & UInt32(FUSE_CAP_POSIX_ACL) != 0 && conn.pointee.capable & UInt32(FUSE_CAP_DONT_MASK) != 0 {
        conn.pointee.want |= UInt32(FUSE_CAP_POSIX_ACL | FUSE_CAP_DONT_MASK)
    }
    // Locks stay in the kernel (local semantics, as ext4 gives on one host): no lock ops here.
    conn.pointee.want &= ~UInt32(FUSE_CAP_POSIX_LOCKS | FUSE_CAP_FLOCK_LOCKS)
}

private func opLookup(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    answer(req) { ctx in replyEntry(req, ctx, try ctx.fileSystem.lookup(parent: parent, name: bytes(name))) }
}

private func opForget(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ nlookup: UInt64) {
    let context = bridge(req)
    context.counts.countForget()
    context.fileSystem.forget(ino, count: nlookup)
    fuse_reply_none(req)
}

private func opForgetMulti(_ req: fuse_req_t?, _ count: Int, _ forgets: UnsafeMutablePointer<fuse_forget_data>?) {
    let context = bridge(req)
    context.counts.countForget()
    let fs = context.fileSystem
    for i in 0..<count {
        guard let f = forgets?[i] else { continue }
        fs.forget(f.ino, count: f.nlookup)
    }
    fuse_reply_none(req)
}

private func opGetattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in replyAttr(req, ctx, try ctx.fileSystem.getattr(ino)) }
}

private func opSetattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ attr: UnsafeMutablePointer<stat>?, _ toSet: Int32,
                       _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        guard let attr = attr?.pointee else { throw BridgeError.invalid }
        var changes = SetAttributes()
        if toSet & FUSE_SET_ATTR_MODE != 0 { changes.mode = attr.st_mode }
        if toSet & FUSE_SET_ATTR_UID != 0 { changes.uid = attr.st_uid }
        if toSet & FUSE_SET_ATTR_GID != 0 { changes.gid = attr.st_gid }
        if toSet & FUSE_SET_ATTR_SIZE != 0 { changes.size = UInt64(attr.st_size) }
        if toSet & FUSE_SET_ATTR_ATIME_NOW != 0 {
            changes.accessTime = .now
        } else if toSet & FUSE_SET_ATTR_ATIME != 0 {
            changes.accessTime = .set(seconds: Int64(attr.st_atim.tv_sec), nanoseconds: Int64(attr.st_atim.tv_nsec))
        }
        if toSet & FUSE_SET_ATTR_MTIME_NOW != 0 {
            changes.modificationTime = .now
        } else if toSet & FUSE_SET_ATTR_MTIME != 0 {
            changes.modificationTime = .set(seconds: Int64(attr.st_mtim.tv_sec), nanoseconds: Int64(attr.st_mtim.tv_nsec))
        }
        changes.handle = fi?.pointee.fh
        changes.dropSetID = DispatchedRequest.dropsSetID
        replyAttr(req, ctx, try ctx.fileSystem.setattr(ino, changes))
    }
}

private func opReadlink(_ req: fuse_req_t?, _ ino: fuse_ino_t) {
    answer(req) { ctx in
        let target = try ctx.fileSystem.readlink(ino)
        _ = (target + [0]).withUnsafeBufferPointer { buf in
            buf.baseAddress!.withMemoryRebound(to: CChar.self, capacity: buf.count) { fuse_reply_readlink(req, $0) }
        }
    }
}

private func opMknod(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ mode: mode_t, _ rdev: dev_t) {
    answer(req) { ctx in
        replyEntry(req, ctx, try ctx.fileSystem.mknod(parent: parent, name: bytes(name), mode: mode, rdev: UInt64(rdev),
                                                      context: requestContext(req)))
    }
}

private func opMkdir(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ mode: mode_t) {
    answer(req) { ctx in
        replyEntry(req, ctx, try ctx.fileSystem.mkdir(parent: parent, name: bytes(name), mode: mode, context: requestContext(req)))
    }
}

private func opUnlink(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    answer(req) { ctx in
        try ctx.fileSystem.unlink(parent: parent, name: bytes(name))
        fuse_reply_err(req, 0)
    }
}

private func opRmdir(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    answer(req) { ctx in
        try ctx.fileSystem.rmdir(parent: parent, name: bytes(name))
        fuse_reply_err(req, 0)
    }
}

private func opSymlink(_ req: fuse_req_t?, _ link: UnsafePointer<CChar>?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    answer(req) { ctx in
        replyEntry(req, ctx, try ctx.fileSystem.symlink(target: bytes(link), parent: parent, name: bytes(name),
                                                        context: requestContext(req)))
    }
}

private func opRename(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ newParent: fuse_ino_t,
                      _ newName: UnsafePointer<CChar>?, _ flags: UInt32) {
    answer(req) { ctx in
        try ctx.fileSystem.rename(parent: parent, name: bytes(name), newParent: newParent, newName: bytes(newName), flags: flags,
                                 context: requestContext(req))
        fuse_reply_err(req, 0)
    }
}

private func opLink(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ newParent: fuse_ino_t, _ newName: UnsafePointer<CChar>?) {
    answer(req) { ctx in replyEntry(req, ctx, try ctx.fileSystem.link(ino, newParent: newParent, newName: bytes(newName))) }
}

private func opOpen(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        let reply = try ctx.fileSystem.open(ino, flags: fi?.pointee.flags ?? 0, dropSetID: DispatchedRequest.dropsSetID)
        fillOpen(fi, reply)
        if fuse_reply_open(req, fi) != 0 {
            // The opener was interrupted and is gone: nobody will release this handle.
            try? ctx.fileSystem.release(ino, handle: reply.handle)
        }
    }
}

private func opCreate(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ mode: mode_t,
                      _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        let (entry, reply) = try ctx.fileSystem.create(parent: parent, name: bytes(name), mode: mode,
                                                       flags: fi?.pointee.flags ?? 0, context: requestContext(req))
        fillOpen(fi, reply)
        var param = entryParam(ctx, entry)
        if fuse_reply_create(req, &param, fi) != 0 {
            try? ctx.fileSystem.release(entry.node, handle: reply.handle)
            ctx.fileSystem.forget(entry.node, count: 1)
        }
    }
}

private func opRead(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ offset: off_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        guard let fi, offset >= 0 else { throw BridgeError.invalid }
        let buffer = ReplyBuffer.current.bytes(size)
        let count = try ctx.fileSystem.read(ino, handle: fi.pointee.fh, offset: UInt64(offset), into: buffer)
        fuse_reply_buf(req, buffer.baseAddress?.assumingMemoryBound(to: CChar.self), count)
    }
}

private func opWrite(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ buf: UnsafePointer<CChar>?, _ size: Int, _ offset: off_t,
                     _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        guard let fi, offset >= 0 else { throw BridgeError.invalid }
        let direct = fi.pointee.flags & encfsd_O_DIRECT != 0 && fi.pointee.writepage == 0
        let (written, pagesMayBeOlder) = try ctx.fileSystem.write(ino, handle: fi.pointee.fh, offset: UInt64(offset),
                                                                  data: UnsafeRawBufferPointer(start: buf, count: size),
                                                                  dropSetID: DispatchedRequest.dropsSetID, bypassesPageCache: direct)
        if pagesMayBeOlder { DirectWriteCoherence.dropCachedPages(ctx, ino) }
        fuse_reply_write(req, written)
    }
}

private func opFlush(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        guard let fi else { throw BridgeError.invalid }
        try ctx.fileSystem.flush(ino, handle: fi.pointee.fh)
        fuse_reply_err(req, 0)
    }
}

private func opRelease(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        guard let fi else { throw BridgeError.invalid }
        try ctx.fileSystem.release(ino, handle: fi.pointee.fh)
        fuse_reply_err(req, 0)
    }
}

private func opFsync(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ datasync: Int32, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        guard let fi else { throw BridgeError.invalid }
        try ctx.fileSystem.fsync(ino, handle: fi.pointee.fh, dataOnly: datasync != 0)
        fuse_reply_err(req, 0)
    }
}

private func opFallocate(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ mode: Int32, _ offset: off_t, _ length: off_t,
                         _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        guard let fi, offset >= 0, length > 0 else { throw BridgeError.invalid }
        try ctx.fileSystem.fallocate(ino, handle: fi.pointee.fh, mode: mode, offset: UInt64(offset), length: UInt64(length))
        fuse_reply_err(req, 0)
    }
}

/// SEEK_DATA and SEEK_HOLE only: the kernel answers SEEK_SET/CUR/END itself.
private func opLseek(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ offset: off_t, _ whence: Int32,
                     _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        guard let fi, offset >= 0, whence == encfsd_SEEK_DATA || whence == encfsd_SEEK_HOLE else { throw BridgeError.invalid }
        let found = try ctx.fileSystem.seek(ino, handle: fi.pointee.fh, from: UInt64(offset), data: whence == encfsd_SEEK_DATA)
        fuse_reply_lseek(req, off_t(found))
    }
}

private func opOpendir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        let handle = try ctx.fileSystem.opendir(ino)
        fi?.pointee.fh = handle
        if fuse_reply_open(req, fi) != 0 { ctx.fileSystem.releasedir(ino, handle: handle) }
    }
}

private func opReaddir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ offset: off_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        guard let fi, offset >= 0 else { throw BridgeError.invalid }
        let items = try ctx.fileSystem.readdir(ino, handle: fi.pointee.fh, offset: Int(offset), limit: direntLimit(size))
        let buffer = ReplyBuffer.current.bytes(size)
        var used = 0
        var next = Int(offset)
        for item in items {
            next += 1
            var st = stat()
            st.st_ino = UInt(item.inode)
            st.st_mode = item.typeBits
            let needed = (item.name + [0]).withUnsafeBufferPointer { name in
                name.baseAddress!.withMemoryRebound(to: CChar.self, capacity: name.count) { cName in
                    fuse_add_direntry(req, buffer.baseAddress!.assumingMemoryBound(to: CChar.self) + used, size - used, cName, &st, off_t(next))
                }
            }
            if needed > size - used { break }
            used += needed
        }
        fuse_reply_buf(req, buffer.baseAddress?.assumingMemoryBound(to: CChar.self), used)
    }
}

/// Entries with their attributes, so `ls -l`, `rm -rf` and `find` need no LOOKUP per entry: one
/// round trip per page of entries instead of one per name. Every entry added carries a kernel
/// reference (except "." and "..", which the kernel never looks up); one that does not fit, or a
/// reply the kernel never takes, gives its reference back. An entry whose lookup fails goes out
/// without attributes, and the kernel's own LOOKUP later reports the error.
private func opReaddirplus(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ offset: off_t,
                           _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        guard let fi, offset >= 0 else { throw BridgeError.invalid }
        let items = try ctx.fileSystem.readdir(ino, handle: fi.pointee.fh, offset: Int(offset), limit: direntLimit(size))
        let buffer = ReplyBuffer.current.bytes(size)
        var used = 0
        var next = Int(offset)
        var referenced: [UInt64] = []
        for item in items {
            next += 1
            var param = fuse_entry_param()
            var node: UInt64?
            if item.lookupKey != nil, let entry = try? ctx.fileSystem.lookup(parent: ino, listed: item) {
                param = entryParam(ctx, entry)
                node = entry.node
            } else {
                param.attr.st_ino = UInt(item.inode)
                param.attr.st_mode = item.typeBits
            }
            let needed = (item.name + [0]).withUnsafeBufferPointer { name in
                name.baseAddress!.withMemoryRebound(to: CChar.self, capacity: name.count) { cName in
                    fuse_add_direntry_plus(req, buffer.baseAddress!.assumingMemoryBound(to: CChar.self) + used,
                                           size - used, cName, &param, off_t(next))
                }
            }
            if needed > size - used {
                if let node { ctx.fileSystem.forget(node, count: 1) }
                break
            }
            used += needed
            if let node { referenced.append(node) }
        }
        if fuse_reply_buf(req, buffer.baseAddress?.assumingMemoryBound(to: CChar.self), used) != 0 {
            for node in referenced { ctx.fileSystem.forget(node, count: 1) }
        }
    }
}

/// The most entries a `size`-byte reply can hold: a dirent is at least 32 bytes (24 of header and
/// a name padded to 8), a direntplus more.
private func direntLimit(_ size: Int) -> Int { size / 32 + 1 }

private func opReleasedir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    let context = bridge(req)
    context.counts.countAnswered()
    if let fi { context.fileSystem.releasedir(ino, handle: fi.pointee.fh) }
    fuse_reply_err(req, 0)
}

private func opFsyncdir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ datasync: Int32, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    answer(req) { ctx in
        try ctx.fileSystem.fsyncdir(ino, handle: fi?.pointee.fh ?? 0, dataOnly: datasync != 0)
        fuse_reply_err(req, 0)
    }
}

private func opStatfs(_ req: fuse_req_t?, _ ino: fuse_ino_t) {
    answer(req) { ctx in
        let s = try ctx.fileSystem.statfs(ino)
        var v = statvfs()
        v.f_bsize = UInt(s.blockSize)
        v.f_frsize = UInt(s.blockSize)
        v.f_blocks = UInt(s.blocks)
        v.f_bfree = UInt(s.blocksFree)
        v.f_bavail = UInt(s.blocksAvailable)
        v.f_files = UInt(s.files)
        v.f_ffree = UInt(s.filesFree)
        v.f_favail = UInt(s.filesFree)
        v.f_namemax = UInt(s.nameMax)
        fuse_reply_statfs(req, &v)
    }
}

private func opSetxattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ value: UnsafePointer<CChar>?,
                        _ size: Int, _ flags: Int32) {
    answer(req) { ctx in
        let bytesValue = size > 0 ? Array(UnsafeRawBufferPointer(start: value, count: size)) : []
        try ctx.fileSystem.setxattr(ino, name: bytes(name), value: bytesValue, flags: flags)
        fuse_reply_err(req, 0)
    }
}

/// getxattr and listxattr share the size protocol: size 0 asks for the length only.
private func replySized(_ req: fuse_req_t?, _ data: [UInt8], _ size: Int) {
    if size == 0 {
        fuse_reply_xattr(req, data.count)
    } else if data.count > size {
        fuse_reply_err(req, ERANGE)
    } else {
        _ = data.withUnsafeBytes { fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
    }
}

private func opGetxattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ size: Int) {
    answer(req) { ctx in
        guard let value = try ctx.fileSystem.getxattr(ino, name: bytes(name)) else { fuse_reply_err(req, ENODATA); return }
        replySized(req, value, size)
    }
}

private func opListxattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int) {
    answer(req) { ctx in
        let names = try ctx.fileSystem.listxattr(ino, context: requestContext(req))
        replySized(req, names.flatMap { $0 + [0] }, size)
    }
}

private func opRemovexattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    answer(req) { ctx in
        try ctx.fileSystem.removexattr(ino, name: bytes(name))
        fuse_reply_err(req, 0)
    }
}

private func opIoctl(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ cmd: UInt32, _ arg: UnsafeMutableRawPointer?,
                     _ fi: UnsafeMutablePointer<fuse_file_info>?, _ flags: UInt32, _ inBuf: UnsafeRawPointer?,
                     _ inSize: Int, _ outSize: Int) {
    answer(req) { ctx in
        // 32-bit callers would lay structures out differently; encfsd's ioctls are 64-bit only.
        guard flags & UInt32(FUSE_IOCTL_COMPAT) == 0 else { throw BridgeError.notTTY }
        let input = inSize > 0 && inBuf != nil ? Array(UnsafeRawBufferPointer(start: inBuf, count: inSize)) : []
        let reply = try ctx.fileSystem.ioctl(ino, command: cmd, input: input, outputSize: outSize, context: requestContext(req))
        guard reply.output.count <= outSize else { throw BridgeError.invalid }
        _ = reply.output.withUnsafeBytes { fuse_reply_ioctl(req, reply.result, $0.baseAddress, $0.count) }
    }
}

/// One reply buffer per worker thread, so a read request allocates nothing: the filesystem fills
/// it and libfuse copies it to the kernel. It grows to the largest read the thread has served
/// (the kernel's max_read, 1 MiB here) and is freed with the thread.
final class ReplyBuffer {
    private var storage = UnsafeMutableRawBufferPointer(start: nil, count: 0)

    func bytes(_ count: Int) -> UnsafeMutableRawBufferPointer {
        if storage.count < count {
            storage.deallocate()
            storage = .allocate(byteCount: count, alignment: 64)
        }
        return UnsafeMutableRawBufferPointer(rebasing: storage[0..<count])
    }

    deinit { storage.deallocate() }

    static var current: ReplyBuffer {
        let key = ReplyBufferKey.shared.key
        if let raw = pthread_getspecific(key) {
            return Unmanaged<ReplyBuffer>.fromOpaque(raw).takeUnretainedValue()
        }
        let fresh = ReplyBuffer()
        pthread_setspecific(key, Unmanaged.passRetained(fresh).toOpaque())
        return fresh
    }
}

/// Invariant making this `@unchecked Sendable`: `key` is written once in `init`, before `shared`
/// is published, and only read afterwards.
private final class ReplyBufferKey: @unchecked Sendable {
    static let shared = ReplyBufferKey()
    var key = pthread_key_t()
    private init() {
        let rc = pthread_key_create(&key) { raw in
            guard let raw else { return }
            Unmanaged<ReplyBuffer>.fromOpaque(raw).release()
        }
        precondition(rc == 0, "pthread_key_create failed: \(rc)")
    }
}

/// Errors the bridge itself detects in what the kernel handed it.
enum BridgeError: ErrnoConvertible {
    case invalid
    case notTTY

    var errnoValue: Int32 {
        switch self {
        case .invalid: EINVAL
        case .notTTY: ENOTTY
        }
    }
}

// MARK: - direct writes and the page cache

/// The kernel drops cached pages before an O_DIRECT write but not after an asynchronous one
/// completes, so a buffered read of the range while the write was in flight left pages holding the
/// old bytes, served after the write had completed (issue 12). The daemon drops them itself,
/// before it answers the write, so the write completes only once no page older than it is cached.
///
/// The drop runs on a thread of its own with a bounded wait: when the kernel falls back from a
/// direct write to a buffered one (it could not drop a page that was mapped), that request holds
/// the pages locked until it is answered, and dropping them from the answering thread would wait
/// for itself. Those pages already hold the new bytes; the drop then finishes after the answer.
///
/// Only a file the kernel may have filled pages of since the last drop needs one: the store marks
/// each read and each write into the page cache, and a direct write takes the mark
/// (`FileSystem.write`). A thread per direct write was 2 of the 16 system calls each 4 KiB direct
/// write cost (PERFORMANCE.md, "A page drop only where pages came from"). The drop covers the
/// whole file: a read marked before the take may have filled any range, and an earlier direct
/// write of another range may have taken the mark first.
enum DirectWriteCoherence {
    static let patienceNanoseconds: Int64 = 100_000_000

    /// Drops every cached page of `ino` (offset 0, length 0: the whole file).
    static func dropCachedPages(_ ctx: BridgeContext, _ ino: fuse_ino_t) {
        let raw = ctx.session.load(ordering: .acquiring)
        guard raw != 0, let session = OpaquePointer(bitPattern: raw) else { return }
        let job = Unmanaged.passRetained(PageDrop(session: session, ino: ino))
        var thread = pthread_t()
        let started = pthread_create(&thread, nil, { raw in
            let job = Unmanaged<PageDrop>.fromOpaque(raw!).takeRetainedValue()
            _ = fuse_lowlevel_notify_inval_inode(job.session, job.ino, 0, 0)
            job.finish()
            return nil
        }, job.retain().toOpaque())
        defer { job.release() }
        guard started == 0 else {
            job.release()
            // No thread: drop the pages here. Only a buffered fallback can make this wait, and
            // thread creation failing is already a daemon in trouble.
            _ = fuse_lowlevel_notify_inval_inode(session, ino, 0, 0)
            return
        }
        pthread_detach(thread)
        job.takeUnretainedValue().wait(nanoseconds: patienceNanoseconds)
    }
}

/// One file's drop and its completion.
///
/// Invariant making this `@unchecked Sendable`: `done` is read and written only under `lock`; the
/// other fields are immutable. The mutex and condition live in memory of their own, allocated
/// once: pthread objects must not move, and Swift gives no fixed address to a stored property
/// passed with `&`.
private final class PageDrop: @unchecked Sendable {
    let session: OpaquePointer
    let ino: fuse_ino_t
    private let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let signal = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var done = false

    init(session: OpaquePointer, ino: fuse_ino_t) {
        self.session = session
        self.ino = ino
        lock.initialize(to: pthread_mutex_t())
        signal.initialize(to: pthread_cond_t())
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(signal, &attributes)
        pthread_condattr_destroy(&attributes)
        pthread_mutex_init(lock, nil)
    }

    deinit {
        pthread_cond_destroy(signal)
        pthread_mutex_destroy(lock)
        signal.deallocate()
        lock.deallocate()
    }

    func finish() {
        pthread_mutex_lock(lock)
        done = true
        pthread_cond_broadcast(signal)
        pthread_mutex_unlock(lock)
    }

    func wait(nanoseconds: Int64) {
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        let total = Int64(deadline.tv_nsec) + nanoseconds
        deadline.tv_sec += Int(total / 1_000_000_000)
        deadline.tv_nsec = Int(total % 1_000_000_000)
        pthread_mutex_lock(lock)
        while !done && pthread_cond_timedwait(signal, lock, &deadline) != ETIMEDOUT {}
        pthread_mutex_unlock(lock)
    }
}
