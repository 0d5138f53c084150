import EncCrypto
import EncKeys
import EncFormat
/// Encryption policies of directories, and what the kernel may have cached under each.
extension Volume {
    /// Gives an empty directory its own policy (fscrypt's FS_IOC_SET_ENCRYPTION_POLICY). The
    /// new policy's key need not be present: the header stays authenticated under the parent's.
    ///
    /// - Throws: ENOTDIR, ENOTEMPTY, EACCES (not the owner), EEXIST (it already has another
    ///   policy of its own, or is the root), ENOKEY (the parent's key is absent).
    public func setPolicy(_ id: UInt64, _ policy: KeyIdentifier, caller: Caller) throws {
        let dir = try node(id)
        guard dir.isDirectory else { throw StoreError.notDirectory }
        let header = try verifiedHeader(dir)
        guard caller.uid == 0 || caller.uid == header.uid else { throw StoreError.accessDenied }
        if header.policy == policy { return }
        guard header.policy == header.macPolicy, id != Self.rootID else { throw StoreError.exists }
        let dirFD = try directoryFD(dir)
        guard try dirFD.descriptor.listDirectory().allSatisfy({ !NameCodec.isEntryName($0.name) }) else {
            throw StoreError.notEmpty
        }
        try mutateHeader(dir, key: try key(for: dir, .header).key, sync: true) { $0.policy = policy }
    }

    /// The policy of an object, and whether a directory has it of its own (rather than
    /// inherited). Works without any key, like fscrypt's FS_IOC_GET_ENCRYPTION_POLICY_EX.
    public func policy(of id: UInt64) throws -> (KeyIdentifier, ownPolicy: Bool) {
        let header = try node(id).state.withLock { $0.header }
        return (header.policy, header.policy != header.macPolicy || id == Self.rootID)
    }

    /// The object's 16-byte nonce (its object ID), as FS_IOC_GET_ENCRYPTION_NONCE reports.
    public func nonce(of id: UInt64) throws -> [UInt8] {
        try node(id).state.withLock { $0.header.objectID }
    }

    /// Kernel cache entries that may show plaintext protected by `policy`: every node whose
    /// contents or header use it, and every name cached in a directory that uses it.
    public func cachedEntries(under policy: KeyIdentifier) -> (nodes: [UInt64], names: [(parent: UInt64, name: [UInt8])]) {
        let nodes = table.withLock { Array($0.byID.values) }
        var policies: [UInt64: KeyIdentifier] = [:]
        var affected: [UInt64] = []
        var dentries: [Dentry] = []
        for node in nodes {
            let (header, names) = node.state.withLock { ($0.header, $0.dentries) }
            policies[node.id] = header.policy
            if header.policy == policy || header.macPolicy == policy { affected.append(node.id) }
            dentries += names
        }
        let names = dentries.filter { policies[$0.parent] == policy }.map { (parent: $0.parent, name: $0.name) }
        return (affected, names)
    }
}
