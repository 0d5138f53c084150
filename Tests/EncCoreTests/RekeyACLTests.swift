import Testing
import Foundation
@testable import EncCore
@testable import EncKeys

/// Between a rekey converting an object's header (its policy now the new key) and moving its
/// attributes, the ACLs are still sealed under the previous key. The daemon's own uses of them
/// (a new object inheriting its directory's default ACL, the access ACL following a chmod, an ACL
/// that says no more than the mode being dropped) must find them there, and what they change must
/// not be brought back by the move.
@Suite struct RekeyACLTests {
    let caller = Caller(uid: 0, gid: 0)

    static func xattr(_ entries: [(tag: Int, permissions: Int, id: UInt32)]) -> [UInt8] {
        var acl: [UInt8] = [2, 0, 0, 0]
        for (tag, permissions, id) in entries {
            acl += [UInt8(tag), 0, UInt8(permissions), 0] + withUnsafeBytes(of: id.littleEndian, Array.init)
        }
        return acl
    }

    /// user::rwx, user:1000:rwx, group::r-x, mask::rwx, other::---
    static let acl = xattr([(0x01, 7, .max), (0x02, 7, 1000), (0x04, 5, .max), (0x10, 7, .max), (0x20, 0, .max)])
    /// user::rw-, group::r--, other::---: no more than a mode says.
    static let modeOnly = xattr([(0x01, 6, .max), (0x04, 4, .max), (0x20, 0, .max)])

    static func mask(_ value: [UInt8]?) -> UInt16? {
        value.flatMap(PosixACL.init(xattr:))?.entries.first { $0.tag == 0x10 }?.permissions
    }

    @Test func theACLsUnderThePreviousKeyStillCountUntilTheyAreMoved() throws {
        try RekeyTestKeys.withVolume("encfsd-rekey-acl", owner: caller) { volume in
            let (dir, _) = try volume.mkdir(parent: Volume.rootID, name: Array("d".utf8), mode: 0o755, caller: caller)
            try volume.setxattr(dir, name: PosixACL.defaultName, value: Self.acl, mode: .any)
            let (file, _, handle) = try volume.create(parent: Volume.rootID, name: Array("f".utf8), mode: 0o644, caller: caller)
            try volume.release(handle: handle)
            try volume.setxattr(file, name: PosixACL.accessName, value: Self.acl, mode: .any)
            let (plain, _, plainHandle) = try volume.create(parent: Volume.rootID, name: Array("p".utf8), mode: 0o644, caller: caller)
            try volume.release(handle: plainHandle)
            try volume.setxattr(plain, name: PosixACL.accessName, value: Self.acl, mode: .any)

            // The rekey has converted these headers and moved nothing yet.
            try volume.startRekey(Volume.rootID, to: RekeyTestKeys.new.identifier, caller: caller)
            for id in [Volume.rootID, dir, file, plain] { try volume.convertForRekey(try volume.node(id)) }

            let (inheriting, attributes, h) = try volume.create(parent: dir, name: Array("g".utf8), mode: 0o666,
                                                                caller: Caller(uid: 0, gid: 0, umask: 0o077))
            try volume.release(handle: h)
            #expect(attributes.mode & 0o777 == 0o660, "the default ACL, not the umask, decides")
            #expect(try volume.getxattr(inheriting, name: PosixACL.accessName) != nil)
            let (sub, _) = try volume.mkdir(parent: dir, name: Array("sub".utf8), mode: 0o777, caller: caller)
            #expect(try volume.getxattr(sub, name: PosixACL.defaultName) != nil)

            var chmod = AttributeChanges()
            chmod.mode = 0o700
            _ = try volume.setattr(file, chmod)
            #expect(Self.mask(try volume.getxattr(file, name: PosixACL.accessName)) == 0, "the mask follows the chmod")

            // An access ACL the mode says in full is dropped, under either key.
            try volume.setxattr(plain, name: PosixACL.accessName, value: Self.modeOnly, mode: .any)
            #expect(try volume.getxattr(plain, name: PosixACL.accessName) == nil)

            volume.rekeyUntilDone()
            #expect(volume.rekeys.active.isEmpty)
            #expect(Self.mask(try volume.getxattr(file, name: PosixACL.accessName)) == 0, "the move brought the old ACL back")
            #expect(try volume.getxattr(plain, name: PosixACL.accessName) == nil, "the move brought a dropped ACL back")
            #expect(try volume.getxattr(dir, name: PosixACL.defaultName) == Self.acl)
        }
    }
}
