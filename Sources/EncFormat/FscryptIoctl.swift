import EncCrypto
import EncKeys

/// The Linux fscrypt ioctls encfsd answers unchanged (linux/fscrypt.h), so stock tools such as
/// `xfs_io -c rm_enckey` and `xfs_io -c enckey_status` work on an encfsd mount. Only those with a
/// fixed-size argument can pass through a restricted FUSE ioctl.
public enum FscryptIoctl {
    package static func iowr(_ number: UInt8, _ size: Int) -> UInt32 {
        ControlProtocol.ioc(read: true, write: true, type: UInt8(ascii: "f"), number: number, size: size)
    }

    public static let removeKey = iowr(24, RemoveKeyArgument.byteCount)           // 0xc0406618
    public static let removeKeyAllUsers = iowr(25, RemoveKeyArgument.byteCount)   // 0xc0406619
    public static let getKeyStatus = iowr(26, KeyStatusArgument.byteCount)        // 0xc080661a
    public static let getNonce = ControlProtocol.ioc(read: true, write: false, type: UInt8(ascii: "f"), number: 27, size: 16)
    public static let encryptFlag: UInt32 = 0x800 // FS_ENCRYPT_FL

    package static let keySpecifierIdentifier: UInt32 = 2 // FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER

    /// struct fscrypt_key_specifier { u32 type; u32 reserved; u8 u[32]; }, identifier form only
    /// (v1 descriptors belong to v1 policies, which encfsd does not have).
    package static func decodeKeySpecifier(_ r: inout ByteReader) -> KeyIdentifier? {
        guard r.u32() == keySpecifierIdentifier, r.u32() == 0, let identifier = r.raw(16), let rest = r.raw(16),
              rest.allSatisfy({ $0 == 0 }) else { return nil }
        return KeyIdentifier(bytes: identifier)
    }

    package static func encodeKeySpecifier(_ w: inout ByteWriter, _ identifier: KeyIdentifier) {
        w.u32(keySpecifierIdentifier)
        w.u32(0)
        w.raw(identifier.bytes)
        w.zeros(16)
    }

    /// struct fscrypt_remove_key_arg { key_specifier; u32 removal_status_flags; u32 reserved[5]; }
    public struct RemoveKeyArgument: Equatable, Sendable {
        public static let byteCount = 64
        public static let filesBusy: UInt32 = 0x1
        public static let otherUsers: UInt32 = 0x2
        public var identifier: KeyIdentifier
        public var statusFlags: UInt32 = 0

        public init(identifier: KeyIdentifier, statusFlags: UInt32 = 0) {
            self.identifier = identifier
            self.statusFlags = statusFlags
        }

        public static func decode(_ bytes: [UInt8]) -> RemoveKeyArgument? {
            guard bytes.count == byteCount else { return nil }
            var r = ByteReader(bytes[...])
            guard let identifier = decodeKeySpecifier(&r), r.u32() == 0, r.raw(20)?.allSatisfy({ $0 == 0 }) == true else { return nil }
            return RemoveKeyArgument(identifier: identifier)
        }

        /// Reads the daemon's reply, whose status flags are set.
        public static func decodeReply(_ bytes: [UInt8]) -> RemoveKeyArgument? {
            guard bytes.count == byteCount else { return nil }
            var r = ByteReader(bytes[...])
            guard let identifier = decodeKeySpecifier(&r), let flags = r.u32() else { return nil }
            return RemoveKeyArgument(identifier: identifier, statusFlags: flags)
        }

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: Self.byteCount)
            encodeKeySpecifier(&w, identifier)
            w.u32(statusFlags)
            w.zeros(20)
            return w.bytes
        }
    }

    /// struct fscrypt_get_key_status_arg { key_specifier; u32 reserved[6];
    ///   u32 status; u32 status_flags; u32 user_count; u32 out_reserved[13]; }
    public struct KeyStatusArgument: Equatable, Sendable {
        public static let byteCount = 128
        public static let absent: UInt32 = 1, present: UInt32 = 2, incompletelyRemoved: UInt32 = 3
        public static let addedBySelf: UInt32 = 0x1
        public var identifier: KeyIdentifier
        public var status: UInt32 = 0
        public var statusFlags: UInt32 = 0
        public var userCount: UInt32 = 0

        public init(identifier: KeyIdentifier) { self.identifier = identifier }

        public static func decode(_ bytes: [UInt8]) -> KeyStatusArgument? {
            guard bytes.count == byteCount else { return nil }
            var r = ByteReader(bytes[...])
            guard let identifier = decodeKeySpecifier(&r), r.raw(24)?.allSatisfy({ $0 == 0 }) == true else { return nil }
            var arg = KeyStatusArgument(identifier: identifier)
            arg.status = r.u32() ?? 0
            arg.statusFlags = r.u32() ?? 0
            arg.userCount = r.u32() ?? 0
            return arg
        }

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: Self.byteCount)
            encodeKeySpecifier(&w, identifier)
            w.zeros(24)
            w.u32(status)
            w.u32(statusFlags)
            w.u32(userCount)
            w.zeros(52)
            return w.bytes
        }
    }
}
