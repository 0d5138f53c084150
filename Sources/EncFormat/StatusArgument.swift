import EncCrypto
import EncKeys
extension ControlProtocol {
    /// ENCFSD_IOC_GET_STATUS = _IOR('E', 4, struct encfsd_status_arg /* 4096 bytes */).
    public static let getStatus = ioc(read: true, write: false, type: UInt8(ascii: "E"), number: 4, size: StatusArgument.byteCount)

    /// What `encfsd status` shows of a running daemon; one page, the most a restricted FUSE ioctl
    /// passes comfortably, with room for 124 policies.
    ///
    /// struct encfsd_status_arg {
    ///     u32 version;            //   0: 1
    ///     u32 policy_count;       //   4: entries used in policies[]
    ///     u32 pid;                //   8: the daemon's
    ///     u32 format_version;     //  12: the store's (encfsd.conf)
    ///     u64 started;            //  16: when the daemon mounted, Unix seconds
    ///     u64 open_files;         //  24
    ///     u64 open_directories;   //  32
    ///     u64 buffered_bytes;     //  40: written, not yet committed
    ///     u64 journal_entries;    //  48: shadows in .journal
    ///     u64 journal_bytes;      //  56
    ///     u32 backing_capabilities; // 64: bit i set: BackingCapabilities.Capability.allCases[i] native
    ///     u32 lock_scope;         //  68: 1 + index in BackingCapabilities.lockScopes (0: not reported)
    ///     u8  filesystem_type[32];//  72: the backing's, NUL-padded
    ///     u64 requests;           // 104: FUSE requests answered since the mount
    ///     u64 forget_requests;    // 112: FORGET and BATCH_FORGET requests since the mount
    ///     u8  reserved[8];        // 120: zero
    ///     struct {                // 128 + 32 * i
    ///         u8  identifier[16];
    ///         u32 status;         // as FS_IOC_GET_ENCRYPTION_KEY_STATUS: 1 absent, 2 present, 3 incompletely removed
    ///         u32 status_flags;   // bit 0: added by the caller
    ///         u32 user_count;
    ///         u32 flags;          // bit 0: the root policy
    ///     } policies[124];
    /// };
    public struct StatusArgument: Equatable, Sendable {
        public static let byteCount = 4096
        public static let maximumPolicies = (byteCount - 128) / 32
        public static let rootPolicy: UInt32 = 1

        public struct Policy: Equatable, Sendable {
            public var identifier: KeyIdentifier
            public var status: UInt32
            public var statusFlags: UInt32
            public var userCount: UInt32
            public var flags: UInt32
            public init(identifier: KeyIdentifier, status: UInt32, statusFlags: UInt32, userCount: UInt32, flags: UInt32) {
                self.identifier = identifier
                self.status = status
                self.statusFlags = statusFlags
                self.userCount = userCount
                self.flags = flags
            }
        }

        public var pid: UInt32 = 0
        public var formatVersion: UInt32 = 0
        public var started: UInt64 = 0
        public var openFiles: UInt64 = 0
        public var openDirectories: UInt64 = 0
        public var bufferedBytes: UInt64 = 0
        public var journalEntries: UInt64 = 0
        public var journalBytes: UInt64 = 0
        public var requests: UInt64 = 0
        public var forgetRequests: UInt64 = 0
        public var policies: [Policy] = []
        public var backingCapabilities: UInt32 = 0
        public var lockScope: UInt32 = 0
        public var filesystemType = ""

        public init() {}

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: Self.byteCount)
            let listed = policies.prefix(Self.maximumPolicies)
            w.u32(ControlProtocol.version)
            w.u32(UInt32(listed.count))
            w.u32(pid)
            w.u32(formatVersion)
            for value in [started, openFiles, openDirectories, bufferedBytes, journalEntries, journalBytes] { w.u64(value) }
            w.u32(backingCapabilities)
            w.u32(lockScope)
            let type = Array(filesystemType.utf8.prefix(31))
            w.raw(type)
            w.zeros(32 - type.count)
            w.u64(requests)
            w.u64(forgetRequests)
            w.zeros(8)
            for policy in listed {
                w.raw(policy.identifier.bytes)
                for value in [policy.status, policy.statusFlags, policy.userCount, policy.flags] { w.u32(value) }
            }
            w.zeros(Self.byteCount - w.bytes.count)
            return w.bytes
        }

        /// Parses a daemon's reply; nil for anything malformed.
        public static func decode(_ bytes: [UInt8]) -> StatusArgument? {
            guard bytes.count == byteCount else { return nil }
            var r = ByteReader(bytes[...])
            guard r.u32() == ControlProtocol.version, let count = r.u32().map(Int.init), count <= maximumPolicies,
                  let pid = r.u32(), let formatVersion = r.u32() else { return nil }
            var s = StatusArgument()
            s.pid = pid
            s.formatVersion = formatVersion
            guard let started = r.u64(), let openFiles = r.u64(), let openDirectories = r.u64(), let buffered = r.u64(),
                  let journalEntries = r.u64(), let journalBytes = r.u64(), let capabilityBits = r.u32(), let lockScope = r.u32(),
                  let type = r.raw(32), type.last == 0, let requests = r.u64(), let forgets = r.u64(),
                  r.raw(8)?.allSatisfy({ $0 == 0 }) == true
            else { return nil }
            (s.backingCapabilities, s.lockScope) = (capabilityBits, lockScope)
            s.filesystemType = String(decoding: type.prefix(while: { $0 != 0 }), as: UTF8.self)
            (s.started, s.openFiles, s.openDirectories, s.bufferedBytes) = (started, openFiles, openDirectories, buffered)
            (s.journalEntries, s.journalBytes, s.requests, s.forgetRequests) = (journalEntries, journalBytes, requests, forgets)
            for _ in 0..<count {
                guard let id = r.raw(16).flatMap(KeyIdentifier.init(bytes:)), let status = r.u32(), let statusFlags = r.u32(),
                      let users = r.u32(), let flags = r.u32() else { return nil }
                s.policies.append(Policy(identifier: id, status: status, statusFlags: statusFlags, userCount: users, flags: flags))
            }
            return s
        }
    }
}
