import CKeyutils
import CLinux
import EncCrypto
#if canImport(Glibc)
import Glibc
#endif

/// Every call encfsd makes into the kernel keyring (libkeyutils), in one place.
///
/// Keys live in the user keyring of the user who added them, as `user` keys described
/// `encfsd:<identifier>:<nonce>`. The daemon reads them by serial with its thread's filesystem identity
/// switched to the requesting user, so the kernel's own permission check decides what a caller
/// may hand over: nobody can make the daemon load a key they could not read themselves.
public enum Keyring {
    public static let descriptionPrefix = "encfsd:"

    /// `encfsd:<identifier>:<nonce>`: a fresh entry for every add, so revoking one claim's entry
    /// (when its key is wiped) can never hit an entry another add or another mount is using.
    public static func description(for identifier: KeyIdentifier) -> String {
        descriptionPrefix + identifier.hex + ":" + Hex.encode(OpenSSL.random(count: 8))
    }

    /// Possessor: everything; owner: view, read, write, search, link, setattr (so the owner's
    /// daemon can read and later revoke it); nobody else anything.
    package static let permissions: UInt32 = 0x3f3f_0000

    /// Adds `payload` as a `user` key in the calling user's keyring; returns its serial.
    public static func addUserKey(description: String, payload: UnsafeRawBufferPointer) throws -> Int32 {
        let serial = add_key("user", description, payload.baseAddress, payload.count, KEY_SPEC_USER_KEYRING)
        guard serial > 0 else { throw KeyError.system(errno) }
        guard keyctl_setperm(serial, permissions) == 0 else { throw KeyError.system(errno) }
        return serial
    }

    public struct KeyInfo: Equatable, Sendable {
        public var type: String
        public var uid: UInt32
        public var description: String
    }

    /// `keyctl_describe`: "type;uid;gid;perm;description".
    public static func describe(_ serial: Int32) throws -> KeyInfo {
        var buffer: UnsafeMutablePointer<CChar>?
        guard keyctl_describe_alloc(serial, &buffer) >= 0, let buffer else { throw KeyError.system(errno) }
        defer { free(buffer) }
        let fields = String(cString: buffer).split(separator: ";", maxSplits: 4, omittingEmptySubsequences: false)
        guard fields.count == 5, let uid = UInt32(fields[1]) else { throw KeyError.rejected }
        return KeyInfo(type: String(fields[0]), uid: uid, description: String(fields[4]))
    }

    /// Reads a master key's raw bytes straight into locked memory and builds the key from them.
    /// EINVAL for an empty or oversized payload, EKEYREJECTED for a key that is not a `user` key.
    public static func loadMasterKey(serial: Int32) throws -> MasterKey {
        guard try describe(serial).type == "user" else { throw KeyError.rejected }
        let size = keyctl_read(serial, nil, 0)
        guard size >= 0 else { throw KeyError.system(errno) }
        guard (MasterKey.minimumCount...MasterKey.maximumCount).contains(size) else { throw KeyError.invalidArgument }
        let raw = try SecureBytes(count: size) { buffer in
            let n = keyctl_read(serial, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), buffer.count)
            guard n == buffer.count else { throw KeyError.system(n < 0 ? errno : EINVAL) }
        }
        return try raw.withBytes { try MasterKey(raw: $0) }
    }

    /// Serials of the `encfsd:` keys in the calling user's keyring.
    public static func encfsdKeysInUserKeyring() -> [Int32] {
        var buffer: UnsafeMutableRawPointer?
        let size = keyctl_read_alloc(KEY_SPEC_USER_KEYRING, &buffer)
        guard size > 0, let buffer else { return [] }
        defer { free(buffer) }
        let serials = (0..<(Int(size) / 4)).map { buffer.load(fromByteOffset: $0 * 4, as: Int32.self) }
        return serials.filter { (try? describe($0))?.description.hasPrefix(descriptionPrefix) == true }
    }

    /// Invalidates the entry: unusable at once, unlinked from every keyring, and collected
    /// straight away. (A merely revoked key keeps counting against its owner's key quota until
    /// the kernel's delayed garbage collection, so a user who adds and removes keys often would
    /// run out; and a revoked key can no longer be invalidated.)
    public static func revoke(_ serial: Int32) {
        if keyctl_invalidate(serial) != 0 { _ = keyctl_revoke(serial) }
    }

    /// Removes a key the CLI placed when the daemon then refused it.
    public static func unlinkFromUserKeyring(_ serial: Int32) {
        _ = keyctl_unlink(serial, KEY_SPEC_USER_KEYRING)
    }

    /// Lets the key's owner read it, as the daemon reads on the owner's behalf. A key made with
    /// `keyctl add` grants its owner only "view"; the possessor (the caller) may change that.
    public static func grantOwnerRead(_ serial: Int32) throws {
        var buffer: UnsafeMutablePointer<CChar>?
        guard keyctl_describe_alloc(serial, &buffer) >= 0, let buffer else { throw KeyError.system(errno) }
        defer { free(buffer) }
        let fields = String(cString: buffer).split(separator: ";", maxSplits: 4, omittingEmptySubsequences: false)
        guard fields.count == 5, let permission = UInt32(fields[3], radix: 16) else { throw KeyError.rejected }
        let ownerViewRead: UInt32 = 0x0003_0000
        if permission & ownerViewRead != ownerViewRead {
            guard keyctl_setperm(serial, permission | ownerViewRead) == 0 else { throw KeyError.system(errno) }
        }
    }

    /// Runs `body` with this thread's filesystem identity set to `uid`/`gid`, then restores it.
    /// The kernel checks key permissions against the filesystem identity.
    public static func asUser<R>(uid: UInt32, gid: UInt32, _ body: () throws -> R) rethrows -> R {
        let previousGID = encfsd_setfsgid(gid)
        let previousUID = encfsd_setfsuid(uid)
        defer {
            _ = encfsd_setfsuid(UInt32(bitPattern: previousUID))
            _ = encfsd_setfsgid(UInt32(bitPattern: previousGID))
        }
        return try body()
    }
}
