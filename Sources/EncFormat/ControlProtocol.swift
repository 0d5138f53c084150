import EncCrypto
import EncKeys

/// The control interface between the `encfsd` CLI and a running daemon: ioctls on any path
/// inside the mount, as fscryptctl drives the kernel. Fixed-size arguments, because FUSE passes
/// only `_IOC_SIZE(cmd)` bytes of a restricted ioctl through (FORMAT.md, "Control ioctls").
public enum ControlProtocol {
    public static let version: UInt32 = 1

    /// `_IOC(dir, type, nr, size)` as Linux encodes it on x86-64 and arm64.
    public static func ioc(read: Bool, write: Bool, type: UInt8, number: UInt8, size: Int) -> UInt32 {
        let dir: UInt32 = (read ? 2 : 0) | (write ? 1 : 0)
        return dir << 30 | UInt32(size) << 16 | UInt32(type) << 8 | UInt32(number)
    }

    /// ENCFSD_IOC_ADD_KEY = _IOWR('E', 1, struct encfsd_add_key_arg /* 128 bytes */).
    public static let addKey = ioc(read: true, write: true, type: UInt8(ascii: "E"), number: 1, size: AddKeyArgument.byteCount)

    /// ENCFSD_IOC_SET_POLICY = _IOW('E', 2, struct encfsd_policy_arg /* 32 bytes */).
    public static let setPolicy = ioc(read: false, write: true, type: UInt8(ascii: "E"), number: 2, size: PolicyArgument.byteCount)
    /// ENCFSD_IOC_GET_POLICY = _IOR('E', 3, struct encfsd_policy_arg /* 32 bytes */).
    public static let getPolicy = ioc(read: true, write: false, type: UInt8(ascii: "E"), number: 3, size: PolicyArgument.byteCount)

    /// struct encfsd_policy_arg {
    ///     u32 version;          // 1
    ///     u32 flags;            // out (get): bit 0 = the directory has this policy of its own
    ///     u8  identifier[16];
    ///     u8  reserved[8];      // must be zero
    /// };
    public struct PolicyArgument: Equatable, Sendable {
        public static let byteCount = 32
        public static let ownPolicy: UInt32 = 1
        public var identifier: KeyIdentifier
        public var flags: UInt32

        public init(identifier: KeyIdentifier, flags: UInt32 = 0) {
            self.identifier = identifier
            self.flags = flags
        }

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: Self.byteCount)
            w.u32(ControlProtocol.version)
            w.u32(flags)
            w.raw(identifier.bytes)
            w.zeros(8)
            return w.bytes
        }

        public static func decode(_ bytes: [UInt8]) -> PolicyArgument? {
            guard bytes.count == byteCount else { return nil }
            var r = ByteReader(bytes[...])
            guard r.u32() == ControlProtocol.version, let flags = r.u32(), let id = r.raw(16).flatMap(KeyIdentifier.init(bytes:)),
                  r.raw(8)?.allSatisfy({ $0 == 0 }) == true else { return nil }
            return PolicyArgument(identifier: id, flags: flags)
        }
    }

    public enum KeySource: UInt32, Sendable {
        case raw = 1
        case keyring = 2
    }

    /// struct encfsd_add_key_arg {
    ///     u32 version;          // 1
    ///     u32 source;           // 1: raw bytes below, 2: keyring serial
    ///     s32 keyring_serial;
    ///     u32 raw_size;         // 16..64
    ///     u8  raw[64];
    ///     u8  identifier[16];   // out: the key identifier
    ///     u8  reserved[32];     // must be zero
    /// };
    public struct AddKeyArgument: Equatable, Sendable {
        public static let byteCount = 128
        public var source: KeySource
        public var keyringSerial: Int32
        public var raw: [UInt8]
        public var identifier: [UInt8]

        public init(source: KeySource, keyringSerial: Int32 = 0, raw: [UInt8] = [], identifier: [UInt8] = []) {
            self.source = source
            self.keyringSerial = keyringSerial
            self.raw = raw
            self.identifier = identifier
        }

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: Self.byteCount)
            w.u32(ControlProtocol.version)
            w.u32(source.rawValue)
            w.u32(UInt32(bitPattern: keyringSerial))
            w.u32(UInt32(raw.count))
            w.raw(raw + [UInt8](repeating: 0, count: 64 - raw.count))
            w.raw(identifier + [UInt8](repeating: 0, count: 16 - identifier.count))
            w.zeros(32)
            return w.bytes
        }

        /// Parses what a caller sent; nil for anything malformed (the daemon answers EINVAL).
        public static func decode(_ bytes: [UInt8]) -> AddKeyArgument? {
            guard bytes.count == byteCount else { return nil }
            var r = ByteReader(bytes[...])
            guard r.u32() == ControlProtocol.version, let sourceRaw = r.u32(), let source = KeySource(rawValue: sourceRaw),
                  let serial = r.u32(), let rawSize = r.u32().map(Int.init), rawSize <= 64,
                  let raw = r.raw(64), let identifier = r.raw(16), let reserved = r.raw(32),
                  reserved.allSatisfy({ $0 == 0 })
            else { return nil }
            return AddKeyArgument(source: source, keyringSerial: Int32(bitPattern: serial),
                                  raw: Array(raw.prefix(rawSize)), identifier: identifier)
        }
    }
}
