import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// One store, one daemon: an exclusive lock on `encfsd.lock` at the top of the store, held by a
/// mounting daemon for its whole life and by fsck while it runs. Two daemons serving one store
/// would each cache headers and journal into the same files, and fsck repairing under a daemon
/// would race its commits.
///
/// The lock is an open file description lock (`F_OFD_SETLK`): the kernel drops it when the
/// holder's last descriptor closes, so a daemon killed with SIGKILL leaves nothing that blocks
/// the next mount (no pid file to judge stale). After locking, the holder records its pid and
/// host name in the file, for the message a refused second mount or fsck gives.
///
/// The store is hostile ground: whatever sits at the name is opened without following a link
/// and without side effects (`O_PATH`) first, and only a regular file with no other links is
/// opened for writing; a symlink, FIFO, device or directory planted there is refused.
///
/// A non-copyable value: the lock is held exactly as long as the holder's binding lives (to the
/// end of its scope), and no copy can keep it past that or drop it early.
public struct StoreLock: ~Copyable, Sendable {
    public static let fileName = "encfsd.lock"
    /// A holder record longer than this is not one encfsd wrote.
    static let recordLimit = 1024

    /// Who holds the lock, as the holder recorded it.
    public struct Holder: Codable, Equatable, Sendable, CustomStringConvertible {
        public var pid: Int32
        public var host: String
        /// The holder is unmounted and finishing (committing, syncing, closing its epoch): a new
        /// mount may wait for the lock instead of refusing. Absent in records of older builds.
        public var closing: Bool?
        public var description: String { "pid \(pid) on host \(host)" }
    }

    public enum Failure: Error, Equatable, CustomStringConvertible {
        /// Another daemon or fsck holds the lock (nil: it has not recorded itself, or the record
        /// is not readable).
        case held(Holder?)
        /// Something other than a regular file of one link sits at the lock's name.
        case notRegularFile(String)
        case system(String, Int32)

        public var description: String {
            switch self {
            case .held(let holder?): "the store is in use by encfsd \(holder) (mounted, or being checked by fsck)"
            case .held(nil): "the store is in use by another encfsd (mounted, or being checked by fsck)"
            case .notRegularFile(let what):
                "\(StoreLock.fileName) in the store is \(what), not a regular file: refusing to use it (remove it if you did not make it)"
            case .system(let what, let code): "cannot \(what) \(StoreLock.fileName): \(String(cString: strerror(code)))"
            }
        }
    }

    private let file: FileDescriptor

    private init(file: consuming FileDescriptor) { self.file = file }

    /// Takes the lock of the store at `storePath`, creating the lock file if there is none.
    public static func acquire(storePath: String) throws(Failure) -> StoreLock {
        let store: FileDescriptor
        do { store = try Sys.openStoreRoot(storePath) } catch { throw .system("open the store for", errno(of: error)) }
        let file = try open(in: store)
        let locked: Bool
        do { locked = try file.lockWholeFile() } catch { throw .system("lock", errno(of: error)) }
        guard locked else { throw .held(readHolder(file)) }
        let lock = StoreLock(file: file)
        lock.record(Holder(pid: getpid(), host: hostName()))
        return lock
    }

    /// Gives the lock up: the end of the holder's use, said where it is (the descriptor closes).
    public consuming func release() {}

    /// Records that this holder has unmounted and is finishing, so an `umount` followed at once
    /// by a `mount` waits for the lock rather than failing on it.
    public func markClosing() {
        record(Holder(pid: getpid(), host: Self.hostName(), closing: true))
    }

    /// The lock file, through the store boundary: opened for writing only once it is known to
    /// be a regular file with one link (a hard link to a file elsewhere would receive the record).
    private static func open(in store: borrowing FileDescriptor) throws(Failure) -> FileDescriptor {
        let name = Array(fileName.utf8)
        while true {
            do {
                return try store.openPrivateFile(name)
            } catch StoreError.system(ENOENT) {
                do {
                    return try store.createEntry(name, mode: 0o644)
                } catch StoreError.system(EEXIST) {
                    continue // made by someone else meanwhile: check what it is
                } catch {
                    throw .system("create", errno(of: error))
                }
            } catch StoreError.unusableObject(_, let what) {
                throw .notRegularFile(what)
            } catch {
                throw .system("open", errno(of: error))
            }
        }
    }

    /// Writes the record over the old one, then cuts off any rest: a reader sees a whole record
    /// (the old holder's or this one) except in the instant between the two calls. Best effort:
    /// the lock holds without it.
    private func record(_ holder: Holder) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        guard var bytes = try? encoder.encode(holder) else { return }
        bytes.append(0x0a)
        _ = try? bytes.withUnsafeBytes { try file.pwrite($0, offset: 0) }
        _ = try? file.ftruncate(Int64(bytes.count))
    }

    /// The holder a lock file names, if it names one readably. Its text comes from the store, so
    /// the host name is cut short and stripped to printable ASCII before anyone prints it.
    static func readHolder(_ fd: borrowing FileDescriptor) -> Holder? {
        var buffer = [UInt8](repeating: 0, count: recordLimit)
        guard let count = try? buffer.withUnsafeMutableBytes({ try fd.pread($0, offset: 0) }), count < recordLimit,
              var holder = try? JSONDecoder().decode(Holder.self, from: Data(buffer[0..<count])) else { return nil }
        holder.host = String(String.UnicodeScalarView(holder.host.unicodeScalars.prefix(255).map {
            (0x21...0x7e).contains($0.value) ? $0 : "?"
        }))
        return holder
    }

    private static func hostName() -> String {
        var name = [CChar](repeating: 0, count: 256)
        guard gethostname(&name, name.count - 1) == 0 else { return "(unknown)" }
        return String(decoding: name.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private static func errno(of error: any Error) -> Int32 {
        if case StoreError.system(let code) = error { return code }
        return EIO
    }
}
