import EncCore
import FuseBridge
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Adding, removing and querying master keys on a live mount.
struct KeyService: Sendable {
    static let releaseGraceMilliseconds = 200
    let keys: KeyTable
    let invalidator: CacheInvalidator

    /// Loads the key at keyring `serial` on behalf of the caller: read with the caller's identity
    /// (the kernel checks the caller may read it), and only a key the caller owns.
    func add(serial: Int32, context: RequestContext) throws -> KeyIdentifier {
        let (key, ours) = try Keyring.asUser(uid: context.uid, gid: context.gid) { () throws -> (MasterKey, Bool) in
            let info = try Keyring.describe(serial)
            guard info.uid == context.uid else { throw StoreError.accessDenied }
            return (try Keyring.loadMasterKey(serial: serial), info.description.hasPrefix(Keyring.descriptionPrefix))
        }
        let identifier = try keys.add(key, claim: .init(uid: context.uid, serial: serial, revokeWhenWiped: ours))
        invalidator.invalidate(policy: identifier)
        return identifier
    }

    /// Unlocks, at mount, every key the mounting user already holds in the keyring, so a daemon
    /// restart needs no re-entry of keys. Returns the identifiers loaded.
    func addKeysFromUserKeyring() -> [KeyIdentifier] {
        Keyring.encfsdKeysInUserKeyring().compactMap { serial in
            guard let key = try? Keyring.loadMasterKey(serial: serial) else { return nil }
            return try? keys.add(key, claim: .init(uid: getuid(), serial: serial, revokeWhenWiped: true))
        }
    }

    func remove(_ identifier: KeyIdentifier, allUsers: Bool, context: RequestContext) throws -> UInt32 {
        // Removing every user's claim is for the administrator only, as in fscrypt.
        if allUsers && context.uid != 0 { throw StoreError.accessDenied }
        var outcome = try keys.remove(identifier, uid: context.uid, allUsers: allUsers)
        if outcome != .otherUsersRemain { invalidator.invalidate(policy: identifier) }
        // The kernel sends RELEASE in the background after the last close(2) returns, so a file
        // its user has already closed can still hold the key for a moment. fscrypt would evict
        // such an inode at once; give in-flight releases that moment before calling files busy.
        if outcome == .filesBusy {
            outcome = keys.awaitWipe(identifier, uid: context.uid, allUsers: allUsers, milliseconds: Self.releaseGraceMilliseconds)
        }
        switch outcome {
        case .removed: return 0
        case .filesBusy: return FscryptIoctl.RemoveKeyArgument.filesBusy
        case .otherUsersRemain: return FscryptIoctl.RemoveKeyArgument.otherUsers
        }
    }

    func status(_ identifier: KeyIdentifier, context: RequestContext) -> FscryptIoctl.KeyStatusArgument {
        var reply = FscryptIoctl.KeyStatusArgument(identifier: identifier)
        switch keys.status(of: identifier, uid: context.uid) {
        case .absent:
            reply.status = FscryptIoctl.KeyStatusArgument.absent
        case .incompletelyRemoved:
            reply.status = FscryptIoctl.KeyStatusArgument.incompletelyRemoved
        case .present(let users, let addedBySelf):
            reply.status = FscryptIoctl.KeyStatusArgument.present
            reply.userCount = UInt32(users)
            reply.statusFlags = addedBySelf ? FscryptIoctl.KeyStatusArgument.addedBySelf : 0
        }
        return reply
    }
}
