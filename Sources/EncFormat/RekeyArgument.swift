import EncKeys

extension ControlProtocol {
    /// ENCFSD_IOC_REKEY_START = _IOW('E', 5, struct encfsd_policy_arg /* 32 bytes */): the new key's
    /// identifier; flags bit 0 = retire the old key's passphrase entry when done (a passphrase change).
    public static let rekeyStart = ioc(read: false, write: true, type: UInt8(ascii: "E"), number: 5, size: PolicyArgument.byteCount)
    public static let retirePassphrase: UInt32 = 1

    /// ENCFSD_IOC_REKEY_STATUS = _IOR('E', 6, struct encfsd_rekey_status_arg /* 128 bytes */).
    public static let rekeyStatus = ioc(read: true, write: false, type: UInt8(ascii: "E"), number: 6, size: RekeyStatusArgument.byteCount)

    /// struct encfsd_rekey_status_arg {
    ///     u32 version;          // 1
    ///     u32 state;            // 0 none, 1 running, 2 finished (since the mount)
    ///     u8  from[16];
    ///     u8  to[16];
    ///     u64 objects_done, objects_total, bytes_done, bytes_total;
    ///     u64 objects_locked;   // still under `from`, whose key is gone: they read ENOKEY
    ///     u64 bytes_rewritten;  // re-encrypted since the daemon started on the tree
    ///     u64 elapsed_ns;       // since the daemon started on the tree
    ///     u8  reserved[32];     // zero
    /// };
    public struct RekeyStatusArgument: Equatable, Sendable {
        public static let byteCount = 128
        public enum State: UInt32, Sendable { case none = 0, running = 1, finished = 2 }
        public var state: State = .none
        public var from = KeyIdentifier(bytes: [UInt8](repeating: 0, count: 16))!
        public var to = KeyIdentifier(bytes: [UInt8](repeating: 0, count: 16))!
        public var objectsDone: UInt64 = 0
        public var objectsTotal: UInt64 = 0
        public var bytesDone: UInt64 = 0
        public var bytesTotal: UInt64 = 0
        public var objectsLocked: UInt64 = 0
        public var bytesRewritten: UInt64 = 0
        public var elapsedNanoseconds: UInt64 = 0

        public init() {}

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: Self.byteCount)
            w.u32(ControlProtocol.version)
            w.u32(state.rawValue)
            w.raw(from.bytes)
            w.raw(to.bytes)
            for value in [objectsDone, objectsTotal, bytesDone, bytesTotal, objectsLocked, bytesRewritten, elapsedNanoseconds] {
                w.u64(value)
            }
            w.zeros(32)
            return w.bytes
        }

        public static func decode(_ bytes: [UInt8]) -> RekeyStatusArgument? {
            guard bytes.count == byteCount else { return nil }
            var r = ByteReader(bytes[...])
            guard r.u32() == ControlProtocol.version, let raw = r.u32(), let state = State(rawValue: raw),
                  let from = r.raw(16).flatMap(KeyIdentifier.init(bytes:)), let to = r.raw(16).flatMap(KeyIdentifier.init(bytes:))
            else { return nil }
            var values: [UInt64] = []
            for _ in 0..<7 {
                guard let v = r.u64() else { return nil }
                values.append(v)
            }
            guard r.raw(32)?.allSatisfy({ $0 == 0 }) == true else { return nil }
            var a = RekeyStatusArgument()
            a.state = state
            a.from = from
            a.to = to
            (a.objectsDone, a.objectsTotal, a.bytesDone, a.bytesTotal) = (values[0], values[1], values[2], values[3])
            (a.objectsLocked, a.bytesRewritten, a.elapsedNanoseconds) = (values[4], values[5], values[6])
            return a
        }

        /// Share of the tree's bytes (objects, for a tree without contents) under the new key.
        public var percentDone: Int {
            if state == .finished { return 100 }
            if bytesTotal > 0 { return Int(min(100, bytesDone * 100 / bytesTotal)) }
            return objectsTotal > 0 ? Int(min(100, objectsDone * 100 / objectsTotal)) : 0
        }
    }
}
