import Locking
import EncCore
import Foundation
import FuseBridge
import EncCrypto
import EncKeys
import EncFormat

/// Makes the kernel forget what it cached under a policy when its key comes or goes: after a
/// removal no name, attribute or page of plaintext stays visible, and after an add no no-key
/// name lingers in place of a plaintext one (fscrypt does the same by evicting inodes).
final class CacheInvalidator: Sendable {
    private let session = Lock<FuseSession?>(nil)
    private let volume = Lock<Volume?>(nil)

    func attach(session: FuseSession) { self.session.withLock { $0 = session } }
    func attach(volume: Volume) { self.volume.withLock { $0 = volume } }

    /// Invalidates synchronously: called from ioctl handlers, which hold no directory lock, so
    /// the reply reaches the caller only when the kernel has forgotten.
    func invalidate(policy: KeyIdentifier) {
        guard let session = session.withLock({ $0 }), let volume = volume.withLock({ $0 }) else { return }
        let (nodes, names) = volume.cachedEntries(under: policy)
        for entry in names { session.invalidateEntry(parent: entry.parent, name: entry.name) }
        for node in nodes { session.invalidateInode(node) }
    }

    /// An atime an access moved (Volume.attributesMoved): the kernel's copy of the attributes goes.
    func attributesMoved(_ node: UInt64) {
        session.withLock { $0 }?.invalidateAttributes(node)
    }

    /// A removed key was wiped when its last open file closed (inside that file's release, maybe
    /// under a lock): the invalidation and keyring revocation run on their own thread.
    func keyWiped(_ identifier: KeyIdentifier, keys: KeyTable) {
        Thread.detachNewThread { [self] in
            Log.notice("key \(identifier) wiped from memory")
            invalidate(policy: identifier)
            for claim in keys.takeRevocations(identifier) {
                Keyring.asUser(uid: claim.uid, gid: UInt32.max) { Keyring.revoke(claim.serial) }
            }
        }
    }
}
