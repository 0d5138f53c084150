import EncCrypto
import EncKeys
import EncFormat

/// What a key is wanted for.
///
/// Each use needs a different key of the object (its `policy`'s or its `macPolicy`'s), accepts or
/// refuses a key that was removed while open files still hold it ("lingering", as fscrypt's pinned
/// inodes keep theirs), and owes something first (the header verified, an interrupted write
/// replayed). Choosing wrongly is a security bug: a lingering key must never open anything new.
/// So this is decided here, in `Volume.key(for:_:)`, and nowhere else in the store.
enum KeyPurpose: Sendable {
    /// Resolving and listing names in a directory: its policy's key, lingering or not. The
    /// directory's header is verified when its own key is there; without it (a directory with a
    /// policy of its own in a locked parent) the names still authenticate themselves.
    case names
    /// Making new names in a directory, or new objects under its policy: the key must be present.
    case newNames
    /// Reading or writing an object's contents: the open file's key while the object is open (it
    /// keeps working after the key is removed), else as `newContents`.
    case contents
    /// Opening an object's contents or xattrs anew: its policy's key, present; the header
    /// verified and an interrupted write replayed first, so nothing half-written is served.
    case newContents
    /// Rewriting the header: the key that authenticates it (`macPolicy`), lingering or not.
    case header
}

/// A key, and the node's header as it stood when the key was granted (verified where the purpose
/// requires it).
struct KeyGrant {
    let key: MasterKey
    let header: ObjectHeader
}

extension Volume {
    /// The one key access of the store (see `KeyPurpose`). Takes the node's lock once and the key
    /// table's lock once (twice only when a header must be verified under another key).
    func key(for node: Node, _ purpose: KeyPurpose) throws -> KeyGrant {
        switch purpose {
        case .names, .newNames: guard node.isDirectory else { throw StoreError.notDirectory }
        case .contents, .newContents, .header: break
        }
        // In a tree being rekeyed, new names and every rewritten header go under the new key from
        // the first one on (Volume+Rekey.swift).
        switch purpose {
        case .newNames, .header: try convertForRekey(node)
        case .names, .contents, .newContents: break
        }
        return try node.state.withLock { state in
            if case .contents = purpose, let file = state.file { return KeyGrant(key: file.key, header: state.header) }
            if case .header = purpose {
                try verifyLocked(node, &state, candidate: nil)
                guard let key = keys.key(for: state.header.macPolicy, allowLingering: true) else { throw StoreError.noKey }
                return KeyGrant(key: key, header: state.header)
            }
            let lingering = if case .names = purpose { true } else { false }
            guard let key = keys.key(for: state.header.policy, allowLingering: lingering) else { throw StoreError.noKey }
            switch purpose {
            case .names, .newNames:
                try? verifyLocked(node, &state, candidate: key)
            case .contents, .newContents, .header:
                try verifyLocked(node, &state, candidate: key)
                // An interrupted flush transaction is never served half-written: it is replayed from
                // its journal first, or, if that cannot be done, the object is refused (EIO).
                if state.header.flags.contains(.pendingWrite) { try recoverLocked(node, &state, key: key) }
            }
            return KeyGrant(key: key, header: state.header)
        }
    }

    /// The node's header, verified (re-read if it was first read without the key). ENOKEY when
    /// the key that authenticates it is not loaded.
    func verifiedHeader(_ node: Node) throws -> ObjectHeader {
        try node.state.withLock { state in
            try verifyLocked(node, &state, candidate: nil)
            return state.header
        }
    }

    /// Verifies a header read without its key (the node's lock held). `candidate` is a key already
    /// in hand, used without a key table lookup when it is the one that authenticates the header.
    private func verifyLocked(_ node: Node, _ state: inout NodeState, candidate: MasterKey?) throws {
        guard !state.verified else { return }
        let policy = state.header.macPolicy
        guard let key = candidate?.identifier == policy ? candidate : keys.key(for: policy, allowLingering: true)
        else { throw StoreError.noKey }
        let fd = try headerDescriptor(node, state, writable: false)
        state.header = try slots.read(fd: fd.descriptor, key: key)
        state.verified = true
    }

    /// Reads a header from `fd` once, verifying it when the key that authenticates it is loaded:
    /// `candidate` (the parent directory's key, which authenticates most children) first.
    static func readHeader(_ fd: borrowing FileDescriptor, keys: KeyTable, slots: HeaderSlots, candidate: MasterKey? = nil) throws -> (ObjectHeader, Bool) {
        try slots.read(fd: fd) { policy in
            candidate?.identifier == policy ? candidate : keys.key(for: policy, allowLingering: true)
        }
    }

    /// Replays an interrupted write as soon as the object is seen with its key present, so no
    /// attribute (the size above all) is ever reported from the pending header: the first stat,
    /// lookup or read after a crash already sees the recovered object.
    func recoverIfPossible(_ node: Node) throws {
        guard node.state.withLock({ $0.header.flags.contains(.pendingWrite) }) else { return }
        do {
            _ = try key(for: node, .newContents)
        } catch StoreError.noKey {
            // Without the key it cannot be replayed; it will be before any byte is served.
        }
    }

    /// Replays the pending transaction of `state` (the node's lock held).
    func recoverLocked(_ node: Node, _ state: inout NodeState, key: MasterKey) throws {
        let fd = try objectDescriptor(node, state, .readWrite)
        state.header = try slots.completeInterruptedWrite(fd: fd.descriptor, journalFD: journalFD.descriptor, pending: state.header, key: key)
        state.slotSafety.madeDurable(state.header.sequence)
    }
}
