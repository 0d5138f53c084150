/// A POSIX ACL in the kernel's xattr form (`system.posix_acl_access` / `_default`, the
/// `posix_acl_xattr_header` and entries of include/uapi/linux/posix_acl_xattr.h), and the three
/// rules a filesystem applies itself when the kernel leaves ACLs to it (FUSE_CAP_POSIX_ACL): the
/// mode an access ACL implies (`posix_acl_update_mode`), the ACL a chmod leaves
/// (`posix_acl_chmod`) and the ACLs a new object inherits (`posix_acl_create`). The kernel
/// enforces ACLs from its cache; the daemon only keeps them consistent with the mode.
public struct PosixACL: Equatable, Sendable {
    public struct Entry: Equatable, Sendable {
        public var tag: UInt16
        public var permissions: UInt16
        public var id: UInt32
    }

    public static let accessName = Array("system.posix_acl_access".utf8)
    public static let defaultName = Array("system.posix_acl_default".utf8)

    static let version: UInt32 = 2
    static let userObject: UInt16 = 0x01
    static let user: UInt16 = 0x02
    static let groupObject: UInt16 = 0x04
    static let group: UInt16 = 0x08
    static let mask: UInt16 = 0x10
    static let other: UInt16 = 0x20

    public var entries: [Entry]

    /// Parses the kernel's xattr form; nil for anything else (the kernel validated what it sends,
    /// so nil means a value that did not come from it).
    public init?(xattr bytes: [UInt8]) {
        guard bytes.count >= 4, (bytes.count - 4) % 8 == 0 else { return nil }
        func u16(_ at: Int) -> UInt16 { UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8 }
        func u32(_ at: Int) -> UInt32 { UInt32(u16(at)) | UInt32(u16(at + 2)) << 16 }
        guard u32(0) == Self.version else { return nil }
        entries = stride(from: 4, to: bytes.count, by: 8).map { Entry(tag: u16($0), permissions: u16($0 + 2), id: u32($0 + 4)) }
        guard entries.contains(where: { $0.tag == Self.userObject }), entries.contains(where: { $0.tag == Self.groupObject }),
              entries.contains(where: { $0.tag == Self.other }) else { return nil }
    }

    public var xattr: [UInt8] {
        var out: [UInt8] = []
        func put16(_ v: UInt16) { out += [UInt8(v & 0xff), UInt8(v >> 8)] }
        func put32(_ v: UInt32) { put16(UInt16(v & 0xffff)); put16(UInt16(v >> 16)) }
        put32(Self.version)
        for e in entries {
            put16(e.tag)
            put16(e.permissions)
            put32(e.id)
        }
        return out
    }

    /// Whether the mode bits alone say what this ACL says (only the three base entries): such an
    /// ACL is not stored, as ext4 stores none.
    public var isEquivalentToMode: Bool {
        entries.allSatisfy { [Self.userObject, Self.groupObject, Self.other].contains($0.tag) }
    }

    /// The permission bits (0o777) the ACL implies: owner, mask (or owning group) and other.
    public var permissionBits: UInt32 {
        func bits(_ tag: UInt16) -> UInt32? { entries.first { $0.tag == tag }.map { UInt32($0.permissions & 7) } }
        let groupClass = bits(Self.mask) ?? bits(Self.groupObject) ?? 0
        return (bits(Self.userObject) ?? 0) << 6 | groupClass << 3 | (bits(Self.other) ?? 0)
    }

    /// After a chmod: the owner, group-class (mask if present, else owning group) and other
    /// entries take the new mode's bits; named entries keep theirs.
    public func chmod(_ mode: UInt32) -> PosixACL {
        let hasMask = entries.contains { $0.tag == Self.mask }
        var result = self
        for i in result.entries.indices {
            switch result.entries[i].tag {
            case Self.userObject: result.entries[i].permissions = UInt16((mode >> 6) & 7)
            case Self.mask: result.entries[i].permissions = UInt16((mode >> 3) & 7)
            case Self.groupObject where !hasMask: result.entries[i].permissions = UInt16((mode >> 3) & 7)
            case Self.other: result.entries[i].permissions = UInt16(mode & 7)
            default: break
            }
        }
        return result
    }

    /// A new object's access ACL from its directory's default ACL, and the mode it gets: each
    /// class entry is limited by the requested mode and the mode by the entry
    /// (`posix_acl_create_masq`). The set-ID and sticky bits of `mode` are kept.
    public func inherited(mode: UInt32) -> (acl: PosixACL, mode: UInt32) {
        let hasMask = entries.contains { $0.tag == Self.mask }
        var result = self
        var newMode = mode
        func limit(_ i: Int, shift: UInt32) {
            let allowed = UInt16((mode >> shift) & 7)
            result.entries[i].permissions &= allowed
            newMode &= ~(7 << shift) | (UInt32(result.entries[i].permissions) << shift)
        }
        for i in result.entries.indices {
            switch result.entries[i].tag {
            case Self.userObject: limit(i, shift: 6)
            case Self.mask: limit(i, shift: 3)
            case Self.groupObject where !hasMask: limit(i, shift: 3)
            case Self.other: limit(i, shift: 0)
            default: break
            }
        }
        return (result, newMode)
    }
}
