import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// When reads move an object's atime: the mount's atime options. With FUSE the kernel marks every
/// inode S_NOATIME and never updates an atime itself, and the VFS mount flags (`noatime`,
/// `relatime`, ...) it applies never reach the daemon; so `encfsd mount` reads them from its own
/// `-o` options and the store applies them (DESIGN.md, "Access times").
public struct AccessTimeOptions: Sendable, Equatable {
    public enum Rule: Sendable, Equatable {
        /// Never (`noatime`).
        case never
        /// When the atime is not after the mtime or the ctime, or is a day old (`relatime`, the
        /// default, as on ext4).
        case relative
        /// At every access (`strictatime`).
        case always
    }

    public var rule: Rule = .relative
    /// `nodiratime`: listing a directory never moves its atime.
    public var directories = true
    /// `lazytime`: a moved atime is written when the kernel forgets the object, with the object's
    /// next header write of another kind, or at unmount, instead of at each close (what lazytime
    /// asks of ext4: atimes kept in memory, at the price of those a crash loses).
    public var lazy = false
    /// `ro`: no access moves an atime, as on any read-only mount (the VFS skips atime updates
    /// there, and the kernel keeps its cached atime of a read-only FUSE inode, so a moved one
    /// would not even show). Not an atime option: it still goes on to the mount.
    public var readOnly = false

    public init(rule: Rule = .relative, directories: Bool = true, lazy: Bool = false) {
        self.rule = rule
        self.directories = directories
        self.lazy = lazy
    }

    /// Applies one mount option; false if `option` is not an atime option.
    public mutating func apply(_ option: String) -> Bool {
        switch option {
        case "noatime": rule = .never
        case "relatime", "atime", "nostrictatime": rule = .relative
        case "strictatime", "norelatime": rule = .always
        case "nodiratime": directories = false
        case "diratime": directories = true
        case "lazytime": lazy = true
        case "nolazytime": lazy = false
        case "ro":
            readOnly = true
            return false
        case "rw":
            readOnly = false
            return false
        default: return false
        }
        return true
    }

    static let day: UInt64 = 86_400 * 1_000_000_000

    /// Whether an access at `now` moves an atime of `atime` given the object's mtime and ctime
    /// (all nanoseconds since the epoch).
    func isDue(atime: UInt64, modified: UInt64, changed: UInt64, now: UInt64, directory: Bool) -> Bool {
        if readOnly || (directory && !directories) { return false }
        switch rule {
        case .never: return false
        case .always: return atime != now
        // An atime in the future is not old (the kernel's relatime compares signed).
        case .relative: return atime <= modified || atime <= changed || (now > atime && now - atime >= Self.day)
        }
    }
}

extension Timestamp {
    /// Nanoseconds since the epoch; times before it count as 0.
    var nanosecondsSinceEpoch: UInt64 {
        seconds < 0 ? 0 : UInt64(seconds) &* 1_000_000_000 &+ UInt64(max(0, nanoseconds))
    }

    init(_ t: timespec) {
        self.init(seconds: Int64(t.tv_sec), nanoseconds: Int64(t.tv_nsec))
    }

    init(nanosecondsSinceEpoch ns: UInt64) {
        self.init(seconds: Int64(ns / 1_000_000_000), nanoseconds: Int64(ns % 1_000_000_000))
    }
}

extension Volume {
    /// Whether this store keeps inode flags and atimes in headers (format version 3).
    var keepsInodeMetadata: Bool { slots.newObjectVersion >= 3 }

    /// An access (an open for reading, a read under strictatime, a listing) by a handle that did
    /// not ask for O_NOATIME: the new atime, if the mount's rule says one is due, is kept in the
    /// node and written with its handle's last close (`writeAccessTime`), never on the read path.
    ///
    /// - Parameter tellKernel: invalidate the kernel's copy of the attributes now (it keeps them
    ///   for the attribute timeout, and a stat right after the access must show the new atime, as
    ///   on ext4). An open passes false and tells it later (`tellKernelOfAccess`).
    /// - Returns: whether the atime moved.
    @discardableResult
    func noteAccess(_ node: Node, tellKernel: Bool = true) -> Bool {
        guard keepsInodeMetadata, accessTimes.rule != .never, !accessTimes.readOnly, !(node.isDirectory && !accessTimes.directories) else { return false }
        guard !node.state.withLock({ $0.header.inodeFlags.contains(.noAccessTime) }) else { return false }
        let now = Self.nowNanoseconds()
        if accessTimes.rule != .always {
            guard let current = try? attributes(node),
                  accessTimes.isDue(atime: current.accessTime.nanosecondsSinceEpoch, modified: current.modificationTime.nanosecondsSinceEpoch,
                                    changed: current.changeTime.nanosecondsSinceEpoch, now: now, directory: node.isDirectory)
            else { return false }
        }
        node.state.withLock { $0.accessedAt = max($0.accessedAt ?? 0, now) }
        if tellKernel { attributesMoved.withLock { $0 }?.notify(node.id) }
        return true
    }

    /// The key an atime write of `node` needs, if it has an atime to write and the key is there
    /// (without it the atime is dropped).
    func accessTimeKey(_ node: Node) -> MasterKey? {
        guard node.state.withLock({ $0.accessedAt != nil }) else { return nil }
        return try? key(for: node, .header).key
    }

    /// Writes an atime `noteAccess` kept, as a header write that leaves the plaintext ctime where it
    /// was: the write moves the backing ctime, so the header records the plaintext one
    /// (`changeTime`) and a futimens then sets the backing atime to now, which gives it the
    /// backing ctime's instant. While the two stay equal nothing else changed the backing object,
    /// and `changeTime` is the ctime (`attributes`). For a caller holding the node's lock: a
    /// release writes through the open file's descriptor before closing it, where a write after
    /// the close reopened the file (read-all: 6% of the daemon's time).
    func writeAccessTimeLocked(_ node: Node, _ state: inout NodeState, key: MasterKey) throws {
        guard let accessed = state.accessedAt else { return }
        state.accessedAt = nil
        state.accessTimeWrites += 1
        if state.header.flags.contains(.pendingWrite) { try recoverLocked(node, &state, key: key) }
        let headerFD = try headerDescriptor(node, state, writable: true)
        let before = try headerFD.descriptor.fstat()
        var header = state.header
        header.accessTime = accessed
        header.changeTime = Self.changeTime(before, header: header)
        try slots.writeMetadata(fd: headerFD.descriptor, header: &header, key: key, sync: false, safety: &state.slotSafety)
        state.header = header
        try headerFD.descriptor.markUnchangedSinceWrite(modified: node.isDirectory ? nil : before.st_mtim)
    }

    /// The atimes still only in memory (lazytime), written at unmount before the epoch ends.
    func writePendingAccessTimes() {
        for node in table.withLock({ Array($0.byID.values) }) where node.state.withLock({ $0.accessedAt != nil }) {
            writeAccessTimeReporting(node)
        }
    }

    /// `writeAccessTime` at a handle's close, which has no caller to fail: an atime that cannot be
    /// written is logged and lost, as a crash would lose it.
    func writeAccessTimeReporting(_ node: Node) {
        guard let key = accessTimeKey(node) else { return }
        node.state.withLock { state in writeAccessTimeReporting(node, &state, key: key) }
    }

    /// `writeAccessTimeReporting` for a caller holding the node's lock.
    func writeAccessTimeReporting(_ node: Node, _ state: inout NodeState, key: MasterKey) {
        do {
            try writeAccessTimeLocked(node, &state, key: key)
        } catch {
            Diagnostics.report("atime of object \(Hex.encode(state.header.objectID)) not written: \(error)")
        }
    }

    /// The plaintext ctime an object's header file shows: the one its header kept over its last
    /// atime write while nothing has changed it since (atime equal to ctime), else its own.
    static func changeTime(_ st: stat, header: ObjectHeader) -> UInt64 {
        if header.changeTime != 0 && st.st_atim.tv_sec == st.st_ctim.tv_sec && st.st_atim.tv_nsec == st.st_ctim.tv_nsec {
            return header.changeTime
        }
        return Timestamp(st.st_ctim).nanosecondsSinceEpoch
    }
}
