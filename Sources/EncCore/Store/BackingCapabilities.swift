import Foundation
import EncCrypto
import EncFormat
import EncKeys
#if canImport(Glibc)
import Glibc
#endif

/// What the backing filesystem can do of what encfsd uses, found by trying each thing once in a
/// scratch directory of the store (`.probe-<hex>`, FORMAT.md 2.5) at `init`, at every mount and
/// at every fsck. Network and FUSE filesystems (NFS, SMB, sshfs, bindfs, GlusterFS) lack some of
/// them, and a capability assumed but missing used to fail every create (EOPNOTSUPP) and every
/// mkdir (EINVAL). Each missing one has a fallback with the same crash-safety promises
/// (DESIGN.md, "Backing capabilities"), except the two without which encfsd refuses the store:
/// an exclusive lock and inode numbers that survive a rename.
public struct BackingCapabilities: Equatable, Sendable, CustomStringConvertible {
    public enum Capability: String, CaseIterable, Sendable, Codable {
        /// `O_TMPFILE`: files are made unnamed and linked in complete. Fallback: made under a
        /// reserved `.nf-` name and renamed into place without replacing.
        case unnamedFiles = "O_TMPFILE"
        /// `linkat` of an open file through /proc/self/fd (how an O_TMPFILE file gets its name).
        /// Fallback: as for `unnamedFiles`.
        case linkOpenFile = "linkat-open-file"
        /// `renameat2(RENAME_NOREPLACE)`. Fallback: the target checked absent, then a plain
        /// rename, both under the volume's namespace lock (and the store lock: one daemon).
        case renameNoReplace = "RENAME_NOREPLACE"
        /// `renameat2(RENAME_EXCHANGE)`. Fallback: three plain renames through a reserved `.xc-`
        /// name, each made durable before the next, after an intent record in `.journal`;
        /// recovery at the next mount completes an interrupted one (`ExchangeRecord`).
        case renameExchange = "RENAME_EXCHANGE"
        /// `fdatasync`. Fallback: `fsync`, which does strictly more.
        case fdatasync
        /// `user.` extended attributes. Without them, every xattr is kept in the object's side
        /// object (`Volume+XattrSide`); a store older than version 3 has none, and xattr calls
        /// there fail with EOPNOTSUPP.
        case userXattrs = "user-xattrs"
        /// An exclusive `F_OFD_SETLK` that a second open file description cannot also take.
        /// Required: without it the store is refused (two daemons would corrupt it).
        case lock = "ofd-lock"
        /// The backing inode number survives a rename. Required: nodes are keyed by it.
        case stableInodes = "stable-inodes"
        /// Two hard links of a file show one inode number (not so on sshfs, whose libfuse gives
        /// each path a number of its own). Without it `link` fails with EPERM: two numbers would
        /// make two nodes, each with its own copy of the header, for one object.
        case hardLinks = "hard-links"

        /// Whether encfsd refuses the store without it.
        public var isRequired: Bool { self == .lock || self == .stableInodes }

        /// The path taken when the backing lacks it.
        public var fallback: String {
            switch self {
            case .unnamedFiles, .linkOpenFile: "temporary .nf- name, renamed into place under the namespace lock"
            case .renameNoReplace: "absence checked, then a plain rename, under the namespace lock"
            case .renameExchange: "journaled three-rename sequence through a .xc- name"
            case .fdatasync: "fsync"
            case .userXattrs: "every xattr in side objects (.xattrs/; a version 3 store)"
            case .hardLinks: "link fails with EPERM"
            case .lock, .stableInodes: "none: the store is refused"
            }
        }
    }

    /// Who else the store lock excludes, judged from the backing's filesystem type: a probe on
    /// one host cannot see whether a lock reaches another.
    public enum LockScope: String, Sendable, Codable {
        /// A filesystem only this machine mounts (ext4, xfs, btrfs, tmpfs, ...).
        case thisMachine = "this machine"
        /// A network filesystem whose client forwards locks to the server (NFS, SMB, GlusterFS,
        /// CephFS): honoured between hosts.
        case allClients = "all clients"
        /// A network filesystem whose client keeps locks local (sshfs): another host's daemon
        /// is not excluded. encfsd mounts, with a warning.
        case thisHostOnly = "this host only"
        /// A FUSE or other filesystem encfsd knows nothing about.
        case unknown
    }

    /// A bit per capability present (bit i: the i-th case of `Capability`), as the status ioctl
    /// carries them. Kept as bits, not a set: `has` is asked several times per request, and a set
    /// of string-valued cases hashes the string each time.
    public private(set) var bits: UInt32
    public var present: Set<Capability> {
        get { Self.capabilities(fromBits: bits) }
        set { bits = newValue.reduce(0) { $0 | Self.bit($1) } }
    }
    /// The backing's filesystem type as /proc/self/mountinfo names it (e.g. `fuse.glusterfs`).
    public var filesystemType: String
    public var lockScope: LockScope

    public init(present: Set<Capability>, filesystemType: String, lockScope: LockScope) {
        bits = present.reduce(0) { $0 | Self.bit($1) }
        self.filesystemType = filesystemType
        self.lockScope = lockScope
    }

    /// Everything a local Linux filesystem has.
    public static let local = BackingCapabilities(present: Set(Capability.allCases), filesystemType: "ext4", lockScope: .thisMachine)

    public func has(_ capability: Capability) -> Bool { bits & Self.bit(capability) != 0 }

    /// The case's bit: its place among the cases, which `BackingCapabilitiesTests` holds to.
    static func bit(_ capability: Capability) -> UInt32 {
        switch capability {
        case .unnamedFiles: 1 << 0
        case .linkOpenFile: 1 << 1
        case .renameNoReplace: 1 << 2
        case .renameExchange: 1 << 3
        case .fdatasync: 1 << 4
        case .userXattrs: 1 << 5
        case .lock: 1 << 6
        case .stableInodes: 1 << 7
        case .hardLinks: 1 << 8
        }
    }

    /// Files can be created unnamed and linked in.
    var createsUnnamed: Bool { has(.unnamedFiles) && has(.linkOpenFile) }

    /// Some namespace change checks a target and then renames, or renames in several steps:
    /// the volume then runs namespace changes one at a time.
    var needsNamespaceLock: Bool { !createsUnnamed || !has(.renameNoReplace) || !has(.renameExchange) }

    /// Why the store cannot be used on this backing, if it cannot.
    public var refusal: String? {
        let missing = Capability.allCases.filter { $0.isRequired && !has($0) }
        guard !missing.isEmpty else { return nil }
        return "the backing filesystem (\(filesystemType)) lacks " + missing.map(\.rawValue).joined(separator: " and ")
            + ", which encfsd needs"
    }

    /// Said at mount when the lock does not keep other hosts out.
    public var lockWarning: String? {
        switch lockScope {
        case .thisMachine, .allClients: nil
        case .thisHostOnly:
            "\(filesystemType) does not forward locks: the store lock keeps out other daemons on this host only; mount the store from one host at a time"
        case .unknown:
            "cannot tell whether \(filesystemType) honours locks between hosts: mount the store from one host at a time"
        }
    }

    /// One line per capability: native, or the fallback used.
    public var lines: [String] {
        Capability.allCases.map { c in
            let name = c.rawValue.padding(toLength: 18, withPad: " ", startingAt: 0)
            return has(c) ? "\(name) native" : "\(name) missing: \(c.fallback)"
        } + ["lock scope         \(lockScope.rawValue) (\(filesystemType))"]
    }

    public var description: String { lines.joined(separator: "\n") }

    /// One line for a log: what is native, what falls back.
    public var summary: String {
        let missing = Capability.allCases.filter { !has($0) }
        return "backing \(filesystemType): " + (missing.isEmpty ? "every capability native" : "fallbacks for " + missing.map(\.rawValue).joined(separator: ", "))
            + "; lock scope \(lockScope.rawValue)"
    }

    public static func capabilities(fromBits bits: UInt32) -> Set<Capability> {
        Set(Capability.allCases.enumerated().filter { bits & 1 << UInt32($0.offset) != 0 }.map(\.element))
    }

    public static let lockScopes: [LockScope] = [.thisMachine, .allClients, .thisHostOnly, .unknown]

    // MARK: probing

    static let probePrefix: [UInt8] = Array(".probe-".utf8)

    /// Probes the store at `storePath` (its root directory must exist and be writable).
    public static func probe(storePath: String) throws -> BackingCapabilities {
        let root = try Sys.openStoreRoot(storePath)
        return try probe(storeFD: root)
    }

    /// Probes in a fresh scratch directory of the store root, removed again afterwards. A crash
    /// mid-probe leaves a `.probe-` directory that no reader takes for an entry and that the next
    /// probe (or fsck) removes.
    static func probe(storeFD: borrowing FileDescriptor) throws -> BackingCapabilities {
        removeStaleProbes(storeFD)
        let name = probePrefix + Array(Hex.encode(OpenSSL.random(count: 8)).utf8)
        // The root's times are the plaintext root's: the probe's scratch directory must not show.
        let root = try storeFD.fstat()
        try storeFD.mkdirAt(name, mode: 0o700)
        defer {
            removeProbe(storeFD, name)
            try? storeFD.setTimes((root.st_atim, root.st_mtim))
        }
        let dir = try storeFD.openEntry(name, .directory, .path)
        let type = filesystemType(of: try dir.fstat())
        return BackingCapabilities(present: try probeAll(in: dir), filesystemType: type, lockScope: lockScope(of: type))
    }

    private static func probeAll(in dir: borrowing FileDescriptor) throws -> Set<Capability> {
        var found: Set<Capability> = []
        let (a, b) = (Array("a".utf8), Array("b".utf8))
        if let unnamed = try? dir.createUnnamed(mode: 0o600) {
            found.insert(.unnamedFiles)
            if (try? unnamed.linkAt(toDir: dir, Array("linked".utf8))) != nil { found.insert(.linkOpenFile) }
        }
        let fileA = try dir.createEntry(a, mode: 0o600)
        let fileB = try dir.createEntry(b, mode: 0o600)
        if fileA.probeFdatasync() { found.insert(.fdatasync) }
        if (try? fileA.fsetxattr("user.encfsd.probe", [1], flags: 0)) != nil,
           (try? fileA.fgetxattr("user.encfsd.probe")) == [1] { found.insert(.userXattrs) }
        // A second open file description of the same file must be refused the lock.
        let again = try dir.openEntry(a, .regularFile, .readWrite)
        if (try? fileA.lockWholeFile()) == true, (try? again.lockWholeFile()) == false { found.insert(.lock) }
        let inodeA = try fileA.fstat().st_ino, inodeB = try fileB.fstat().st_ino
        let moved = Array("moved".utf8)
        try dir.renameAt(a, dir, moved)
        if (try? dir.fstatAt(moved).st_ino) == inodeA { found.insert(.stableInodes) }
        let link = Array("link".utf8)
        if (try? fileB.linkAt(toDir: dir, link)) != nil, (try? dir.fstatAt(link).st_ino) == inodeB,
           (try? dir.fstatAt(b).st_ino) == inodeB { found.insert(.hardLinks) }
        // Onto a free name: the VFS itself answers EEXIST for a taken one, before the
        // filesystem is asked whether it knows the flag at all.
        let fresh = Array("fresh".utf8)
        if (try? dir.renameAt(moved, dir, fresh, flags: Sys.renameNoReplace)) != nil {
            found.insert(.renameNoReplace)
            try dir.renameAt(fresh, dir, moved)
        }
        if (try? dir.renameAt(moved, dir, b, flags: Sys.renameExchange)) != nil {
            if (try? dir.fstatAt(b).st_ino) == inodeA, (try? dir.fstatAt(moved).st_ino) == inodeB { found.insert(.renameExchange) }
        }
        return found
    }

    private static func removeProbe(_ storeFD: borrowing FileDescriptor, _ name: [UInt8]) {
        guard let dir = try? storeFD.openEntry(name, .directory, .path) else { return }
        for entry in (try? dir.listDirectory()) ?? [] where !entry.isDirectory {
            try? dir.unlinkAt(entry.name)
        }
        try? storeFD.unlinkAt(name, directory: true)
    }

    /// Scratch directories of probes that a crash interrupted (only files, never deeper).
    private static func removeStaleProbes(_ storeFD: borrowing FileDescriptor) {
        for entry in (try? storeFD.listDirectory()) ?? [] where entry.isDirectory && isProbeName(entry.name) {
            removeProbe(storeFD, entry.name)
        }
    }

    static func isProbeName(_ name: [UInt8]) -> Bool { name.starts(with: probePrefix) }

    /// The type of the mount the store lives on, from /proc/self/mountinfo (field 3 is the
    /// device, the one after " - " the type).
    static func filesystemType(of st: stat) -> String {
        let device = "\(major(st.st_dev)):\(minor(st.st_dev))"
        guard let table = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return "unknown" }
        var type = "unknown"
        for line in table.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count > 2, fields[2] == device, let dash = fields.firstIndex(of: "-"), dash + 1 < fields.count else { continue }
            type = String(fields[dash + 1]) // the last mount of the device wins, as the kernel's view does
        }
        return type
    }

    private static func major(_ dev: dev_t) -> UInt64 { (UInt64(dev) >> 8 & 0xfff) | (UInt64(dev) >> 32 & ~0xfff) }
    private static func minor(_ dev: dev_t) -> UInt64 { (UInt64(dev) & 0xff) | (UInt64(dev) >> 12 & ~0xff) }

    /// Filesystem types whose clients forward POSIX and OFD locks to a server all clients share.
    static let lockForwarding: Set<String> = ["nfs", "nfs4", "cifs", "smb3", "fuse.glusterfs", "ceph", "fuse.ceph-fuse", "gfs2", "ocfs2"]
    /// Network filesystems whose client keeps locks to itself.
    static let lockLocal: Set<String> = ["fuse.sshfs"]
    /// Filesystems of one machine's disks or memory.
    static let singleMachine: Set<String> = ["ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "bcachefs", "overlay", "jfs", "reiserfs"]

    static func lockScope(of type: String) -> LockScope {
        if lockForwarding.contains(type) { return .allClients }
        if lockLocal.contains(type) { return .thisHostOnly }
        if singleMachine.contains(type) { return .thisMachine }
        return .unknown
    }
}

/// The status reply's backing fields (FORMAT.md 9.1), in the capabilities' terms.
extension ControlProtocol.StatusArgument {
    /// What the daemon found of its backing, nil when it did not say.
    public var capabilities: BackingCapabilities? {
        guard lockScope > 0, Int(lockScope) <= BackingCapabilities.lockScopes.count else { return nil }
        return BackingCapabilities(present: BackingCapabilities.capabilities(fromBits: backingCapabilities),
                                   filesystemType: filesystemType, lockScope: BackingCapabilities.lockScopes[Int(lockScope) - 1])
    }

    public mutating func report(_ capabilities: BackingCapabilities) {
        backingCapabilities = capabilities.bits
        lockScope = UInt32(BackingCapabilities.lockScopes.firstIndex(of: capabilities.lockScope)! + 1)
        filesystemType = String(decoding: Array(capabilities.filesystemType.utf8.prefix(31)), as: UTF8.self)
    }
}
