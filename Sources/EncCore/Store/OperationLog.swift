import Locking
import Synchronization
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// What the backing store was asked to do, recorded for the crash-state checker (tests only).
/// Objects are named by backing inode, so renames of ancestors and unnamed O_TMPFILE files need
/// no path bookkeeping.
public enum BackingOperation: Sendable, Equatable {
    case write(inode: UInt64, offset: Int64, bytes: [UInt8])
    case truncate(inode: UInt64, length: Int64)
    /// fsync or fdatasync: everything before it on this inode (data, or entries of a directory)
    /// is durable.
    case sync(inode: UInt64)
    /// syncfs: everything before it is durable.
    case syncAll
    case newInode(inode: UInt64)
    case create(directory: UInt64, name: [UInt8], inode: UInt64)
    case mkdir(directory: UInt64, name: [UInt8], inode: UInt64)
    case link(directory: UInt64, name: [UInt8], inode: UInt64)
    case rename(from: UInt64, fromName: [UInt8], to: UInt64, toName: [UInt8], flags: UInt32)
    case unlink(directory: UInt64, name: [UInt8])
}

/// Records backing operations while enabled. Disabled (always, outside tests), recording costs
/// one relaxed atomic load per system call.
public final class OperationLog: Sendable {
    public static let shared = OperationLog()
    private let enabled = Atomic<Bool>(false)
    private let operations = Lock<[BackingOperation]>([])
    /// Only the thread that started recording is recorded: the workload runs on it, and other
    /// work in the same process (tests running in parallel) must not leak into its log.
    private let owner = Lock<pthread_t?>(nil)

    public var isRecording: Bool { enabled.load(ordering: .relaxed) }

    public func start() {
        operations.withLock { $0.removeAll() }
        owner.withLock { $0 = pthread_self() }
        enabled.store(true, ordering: .sequentiallyConsistent)
    }

    public func stop() -> [BackingOperation] {
        enabled.store(false, ordering: .sequentiallyConsistent)
        return operations.withLock { $0 }
    }

    /// The number of operations so far: a point in the log.
    public var count: Int { operations.withLock { $0.count } }

    func record(_ operation: @autoclosure () -> BackingOperation) {
        guard isRecording, let owner = owner.withLock({ $0 }), pthread_equal(owner, pthread_self()) != 0 else { return }
        let op = operation()
        operations.withLock { $0.append(op) }
    }
}
