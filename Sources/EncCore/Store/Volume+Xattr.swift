import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Extended attributes of every namespace the kernel hands a filesystem (user, trusted,
/// security, and the two POSIX ACL names of system), stored as backing xattrs encoded by
/// `XattrCodec`. The namespace is part of the sealed name, so all of them live under the same
/// `user.encfsd.` backing names: the backing needs no privilege and learns no namespace.
///
/// Who may read or change which namespace is the kernel's decision before a request arrives
/// (trusted.* needs CAP_SYS_ADMIN, security.* writes need CAP_SYS_ADMIN or CAP_SETFCAP, ACLs the
/// owner); only the listing, which the kernel passes through unfiltered, is filtered here.
extension Volume {
    static let maximumXattrName = 255
    static let maximumXattrValue = 65536
    static let userPrefix = Array("user.".utf8)
    static let trustedPrefix = Array("trusted.".utf8)
    private static let storedPrefixes = [userPrefix, trustedPrefix, Array("security.".utf8)]

    static func isStoredXattrName(_ name: [UInt8]) -> Bool {
        name == PosixACL.accessName || name == PosixACL.defaultName
            || storedPrefixes.contains { name.count > $0.count && name.starts(with: $0) }
    }

    /// The object, its key, its ID, and the key of attributes a rekey has not moved yet (if any).
    private func xattrNode(_ id: UInt64, name: [UInt8]) throws -> (Node, MasterKey, [UInt8], MasterKey?) {
        guard Self.isStoredXattrName(name) else { throw StoreError.notSupported }
        // A backing without user xattrs keeps them all in side objects, which need a v3 store.
        guard capabilities.has(.userXattrs) || holdsSideObjects else {
            refuseSideObjectsOnce()
            throw StoreError.notSupported
        }
        guard name.count <= Self.maximumXattrName else { throw StoreError.nameTooLong }
        let node = try node(id)
        let grant = try key(for: node, .newContents)
        return (node, grant.key, grant.header.objectID, previousKey(of: grant))
    }

    /// The key attributes a rekey has not moved yet are under (nil outside a rekey): every read
    /// of an attribute tries it after the object's key, and every change drops its copy, or the
    /// move would later bring the old value back.
    func previousKey(of grant: KeyGrant) -> MasterKey? {
        grant.header.previousPolicy.flatMap { keys.key(for: $0, allowLingering: true) }
    }

    /// Backing xattrs live on the directory itself for directories (O_PATH descriptors cannot
    /// carry xattr calls, so the directory is re-opened read-only), on the file otherwise.
    func xattrFD(_ node: Node) throws -> SharedDescriptor {
        if node.isDirectory {
            let dir = try directoryFD(node)
            return SharedDescriptor(try dir.descriptor.listingDescriptor())
        }
        let state = node.state.withLock { $0 }
        return try objectDescriptor(node, state, .readOnly)
    }

    /// The backing name and sealed value of one attribute; E2BIG when the sealed form (17 + name
    /// bytes more than the value) is past what a backing xattr value may be, so a value of up to
    /// `maximumXattrValue` itself goes to the side object instead.
    static func sealedXattr(_ name: [UInt8], _ value: [UInt8], objectID: [UInt8], key: MasterKey) throws -> (String, [UInt8]) {
        let backing = XattrCodec.backingName(name, objectID: objectID, key: key)
        let sealed = try XattrCodec.seal(name: name, value: value, objectID: objectID, backingName: backing, key: key)
        guard sealed.count <= maximumXattrValue else { throw StoreError.system(E2BIG) }
        return (backing, sealed)
    }

    /// Whether the object may hold the backing attribute `backing`, answered from the node's
    /// cached list of backing names (one flistxattr per node, kept current by every change made
    /// here) so the kernel's probes (security.capability before every write, the ACL before the
    /// first permission check) cost no backing call on objects without attributes.
    private func mayHold(_ node: Node, _ backing: String) throws -> Bool {
        // A backing without user xattrs holds none: default ACLs, capabilities and the kernel's
        // probes are all simply absent there (xattr calls themselves give EOPNOTSUPP).
        guard capabilities.has(.userXattrs) else { return false }
        let (cached, changes) = node.state.withLock { ($0.backingXattrs, $0.backingXattrChanges) }
        if let cached { return cached.contains(backing) }
        let fd = try xattrFD(node)
        let names = try fd.descriptor.flistxattr().filter { $0.hasPrefix(XattrCodec.backingPrefix) }
        let known = Set(names)
        cacheBackingXattrs(node, known, listedAfter: changes)
        return known.contains(backing)
    }

    /// Runs a change of the backing attribute `backing` and records its result in the cache,
    /// under the node's lock so a concurrent first listing cannot record a state from before it.
    private func changeBacking(_ node: Node, _ backing: String, present: Bool, _ body: (borrowing FileDescriptor) throws -> Void) throws {
        let fd = try xattrFD(node)
        try node.state.withLock { state in
            defer { state.backingXattrChanges &+= 1 }
            try body(fd.descriptor)
            if present { state.backingXattrs?.insert(backing) } else { state.backingXattrs?.remove(backing) }
        }
    }

    /// Caches a listing of the backing xattr names taken when the node had seen `changes`
    /// changes, unless a change has come since (the listing may be from before it).
    func cacheBackingXattrs(_ node: Node, _ listed: Set<String>, listedAfter changes: UInt64) {
        node.state.withLock {
            if $0.backingXattrs == nil && $0.backingXattrChanges == changes { $0.backingXattrs = listed }
        }
    }

    public enum XattrMode: Sendable { case any, create, replace }

    public func setxattr(_ id: UInt64, name: [UInt8], value: [UInt8], mode: XattrMode) throws {
        try refuse(try node(id), ifAny: [.immutable, .appendOnly])
        if let node = try? node(id) { try convertForRekey(node) }
        let (node, key, objectID, previousKey) = try xattrNode(id, name: name)
        if name == PosixACL.accessName {
            try setAccessACL(node, value, key: key, objectID: objectID, mode: mode, previousKey: previousKey)
            return
        }
        try storeXattr(node, name, value, key: key, objectID: objectID, mode: mode, previousKey: previousKey)
    }

    /// Where the attribute goes: where it already is when that is the side object; otherwise the
    /// backing file, unless the backing has no xattrs or refuses this one (ENOSPC: its xattr space
    /// is full; E2BIG: the sealed value is past its value limit), and then the side object. A copy
    /// left on the backing goes only after the side object holds the new value, which shadows it.
    private func storeXattr(_ node: Node, _ name: [UInt8], _ value: [UInt8], key: MasterKey, objectID: [UInt8],
                            mode: XattrMode, previousKey: MasterKey? = nil) throws {
        guard value.count <= Self.maximumXattrValue else { throw StoreError.system(E2BIG) }
        let side = try sideXattrs(node, keys: Self.candidates(key, previousKey))
        let backing = XattrCodec.backingName(name, objectID: objectID, key: key)
        // During a rekey the attribute may still exist under the old key's backing name: it
        // counts for XATTR_CREATE and XATTR_REPLACE, and goes once the new one is written.
        let legacy = previousKey.map { XattrCodec.backingName(name, objectID: objectID, key: $0) }
        let legacyExists = try legacy.map { try mayHold(node, $0) } ?? false
        let inSide = side[name] != nil
        // The kernel holds the inode's lock across setxattr and removexattr, so the checks and
        // the change are one step for this object.
        let exists = try inSide || legacyExists || mayHold(node, backing)
        if mode == .create && exists { throw StoreError.system(EEXIST) }
        if mode == .replace && !exists { throw StoreError.system(ENODATA) }
        if !inSide && capabilities.has(.userXattrs) {
            do {
                let (_, sealed) = try Self.sealedXattr(name, value, objectID: objectID, key: key)
                try changeBacking(node, backing, present: true) { try $0.fsetxattr(backing, sealed, flags: 0) }
                try dropLegacy(node, legacy, if: legacyExists)
                return
            } catch StoreError.system(let code) where (code == ENOSPC || code == E2BIG) && holdsSideObjects {
                // The backing's own limit, not encfsd's: the rest goes to the side object.
            }
        } else if !holdsSideObjects {
            throw StoreError.notSupported
        }
        try changeSideXattrs(node, key: key, previousKey: previousKey) { $0[name] = value }
        if capabilities.has(.userXattrs) {
            try dropBacking(node, backing)
            try dropLegacy(node, legacy, if: legacyExists)
        }
    }

    private func dropLegacy(_ node: Node, _ legacy: String?, if exists: Bool) throws {
        guard exists, let legacy else { return }
        try dropBacking(node, legacy)
    }

    private func dropBacking(_ node: Node, _ backing: String) throws {
        guard try mayHold(node, backing) else { return }
        try changeBacking(node, backing, present: false) { fd in
            do { try fd.fremovexattr(backing) } catch StoreError.system(ENODATA) {}
        }
    }

    /// The kernel leaves keeping mode and access ACL in step to the filesystem: the ACL's owner,
    /// mask (or group) and other entries become the mode's permission bits, and an ACL the mode
    /// says in full is not stored at all (as ext4 does), so listings show only real ACLs.
    private func setAccessACL(_ node: Node, _ value: [UInt8], key: MasterKey, objectID: [UInt8], mode: XattrMode,
                              previousKey: MasterKey?) throws {
        guard let acl = PosixACL(xattr: value) else { throw StoreError.invalidArgument }
        if acl.isEquivalentToMode {
            if mode == .replace, try storedXattr(node, PosixACL.accessName, key: key, previousKey: previousKey, objectID: objectID) == nil {
                throw StoreError.system(ENODATA)
            }
            try dropXattr(node, PosixACL.accessName, key: key, previousKey: previousKey, objectID: objectID)
        } else {
            try storeXattr(node, PosixACL.accessName, value, key: key, objectID: objectID, mode: mode, previousKey: previousKey)
        }
        try mutateHeader(node, key: try self.key(for: node, .header).key, sync: false) { header in
            header.mode = header.mode & ~0o777 | acl.permissionBits
        }
    }

    /// The attribute's value under the object's key or, not moved by a rekey yet, the previous
    /// one; nil if it has none.
    private func storedXattr(_ node: Node, _ name: [UInt8], key: MasterKey, previousKey: MasterKey?,
                             objectID: [UInt8]) throws -> [UInt8]? {
        for k in Self.candidates(key, previousKey) {
            if let value = try readXattr(node, name, key: k, objectID: objectID) { return value }
        }
        return nil
    }

    /// The keys an attribute may be under: the object's, then during a rekey the previous one.
    static func candidates(_ key: MasterKey, _ previousKey: MasterKey?) -> [MasterKey] {
        [key] + (previousKey.map { [$0] } ?? [])
    }

    /// One look at the node: whether its header names a side object, and whether the backing
    /// object is known to hold no attribute. Either lets a probe answer without deriving a
    /// backing name (an HMAC under a per-object key, the largest cost of a probe).
    private func xattrHolders(_ node: Node) -> (sideGeneration: UInt64, backingHoldsNone: Bool) {
        node.state.withLock { ($0.header.xattrGeneration, $0.backingXattrs?.isEmpty == true) }
    }

    /// The backing copy first: the side object's copy shadows it, so removing that first would let
    /// a crash in between bring back the older backing value.
    private func dropXattr(_ node: Node, _ name: [UInt8], key: MasterKey, previousKey: MasterKey?, objectID: [UInt8]) throws {
        let keys = Self.candidates(key, previousKey)
        for k in keys where capabilities.has(.userXattrs) {
            try dropBacking(node, XattrCodec.backingName(name, objectID: objectID, key: k))
        }
        if try sideXattrs(node, keys: keys)[name] != nil {
            try changeSideXattrs(node, key: key, previousKey: previousKey) { $0[name] = nil }
        }
    }

    /// The attribute's value; nil when the object has none of that name (ENODATA), which is not
    /// thrown: the kernel's ACL and capability probes and `ls -l`'s security.* probe ask this of
    /// nearly every entry and write, and nearly always hear "absent".
    public func getxattr(_ id: UInt64, name: [UInt8]) throws -> [UInt8]? {
        if try knownToHoldNone(id, name) { return nil }
        let found: (Node, MasterKey, [UInt8], MasterKey?)
        do {
            found = try xattrNode(id, name: name)
        } catch StoreError.noKey where !name.starts(with: Self.userPrefix) {
            // Locked view: the kernel asks for the ACL before a permission check and ls for
            // security.* on every entry; any answer but ENODATA would fail the check or the
            // listing, so without the key these read as absent (the mode alone then decides).
            return nil
        }
        let (node, key, objectID, previousKey) = found
        return try storedXattr(node, name, key: key, previousKey: previousKey, objectID: objectID)
    }

    /// Whether a non-user attribute is absent without asking for the key: the object's verified
    /// header has no side object and its backing names are known to hold none. Only a verified
    /// header may say so, since hiding an ACL can grant what it denies; user.* keeps its ENOKEY
    /// in a locked view, so it takes the keyed path.
    private func knownToHoldNone(_ id: UInt64, _ name: [UInt8]) throws -> Bool {
        guard Self.isStoredXattrName(name), !name.starts(with: Self.userPrefix),
              capabilities.has(.userXattrs) || holdsSideObjects,
              name.count <= Self.maximumXattrName else { return false }
        // A header still flagged by an interrupted write is left to the keyed path, which
        // replays it first or answers EIO.
        return try node(id).state.withLock { $0.verified && !$0.header.flags.contains(.pendingWrite) && holdsNoXattr($0) }
    }

    private func readXattr(_ node: Node, _ name: [UInt8], key: MasterKey, objectID: [UInt8]) throws -> [UInt8]? {
        let (generation, backingHoldsNone) = xattrHolders(node)
        if generation != 0, let value = try sideXattrs(node, keys: [key])[name] { return value }
        if backingHoldsNone || !capabilities.has(.userXattrs) { return nil }
        let backing = XattrCodec.backingName(name, objectID: objectID, key: key)
        guard try mayHold(node, backing) else { return nil }
        let fd = try xattrFD(node)
        let sealed: [UInt8]
        do {
            sealed = try fd.descriptor.fgetxattr(backing)
        } catch StoreError.system(ENODATA) {
            return nil
        }
        let (storedName, value) = try XattrCodec.open(sealed, objectID: objectID, backingName: backing, key: key)
        guard storedName == name else { throw StoreError.integrity("xattr bound to another name") }
        return value
    }

    /// The names, leaving out trusted.* unless `includeTrusted` (the caller has CAP_SYS_ADMIN),
    /// as ext4 lists them: the side object's, then the backing file's not already listed.
    public func listxattr(_ id: UInt64, includeTrusted: Bool) throws -> [[UInt8]] {
        let node = try node(id)
        guard capabilities.has(.userXattrs) || holdsSideObjects, let grant = try? key(for: node, .newContents) else { return [] }
        let objectID = grant.header.objectID
        // During a rekey an attribute is under either key.
        let candidates = Self.candidates(grant.key, previousKey(of: grant))
        var names = try sideXattrs(node, keys: candidates).keys.sorted { $0.lexicographicallyPrecedes($1) }
        let (holdsNone, changes) = node.state.withLock { ($0.backingXattrs?.isEmpty, $0.backingXattrChanges) }
        if capabilities.has(.userXattrs) && holdsNone != true {
            let fd = try xattrFD(node)
            var backings: Set<String> = []
            for backing in try fd.descriptor.flistxattr() where backing.hasPrefix(XattrCodec.backingPrefix) {
                backings.insert(backing)
                guard let sealed = try? fd.descriptor.fgetxattr(backing), let (name, _) = candidates.lazy.compactMap({
                    try? XattrCodec.open(sealed, objectID: objectID, backingName: backing, key: $0)
                }).first else {
                    Diagnostics.report("skipping undecryptable xattr \(backing)")
                    continue
                }
                // A rekey interrupted between writing the new copy and removing the old shows
                // both; a move to the side object interrupted before the backing copy went, both.
                if !names.contains(name) { names.append(name) }
            }
            cacheBackingXattrs(node, backings, listedAfter: changes)
        }
        return includeTrusted ? names : names.filter { !$0.starts(with: Self.trustedPrefix) }
    }

    /// Backing copies first, then the side object's (see `dropXattr`).
    public func removexattr(_ id: UInt64, name: [UInt8]) throws {
        try refuse(try node(id), ifAny: [.immutable, .appendOnly])
        if !(try removeXattr(id, name: name)) { throw StoreError.system(ENODATA) }
    }

    static let capabilityName = Array("security.capability".utf8)

    /// What a write, truncate or chown does to a file capability on ext4 (`cap_inode_killpriv`),
    /// whoever the caller: removes it. Under FUSE_HANDLE_KILLPRIV_V2 the kernel leaves that to
    /// the daemon once it has marked the inode as holding none (S_NOSEC), which a capability set
    /// later through this mount clears but one set behind the kernel's back does not. An object
    /// known to hold no attribute, the common case, costs nothing: no key, no backing call.
    func dropCapability(_ node: Node) throws {
        guard !node.state.withLock({ holdsNoXattr($0) }), capabilities.has(.userXattrs) || holdsSideObjects else { return }
        _ = try removeXattr(node.id, name: Self.capabilityName)
    }

    /// Whether the object is known to hold no attribute at all: no side object, and no backing
    /// attribute (or a backing without xattrs). Needs the node's lock.
    func holdsNoXattr(_ state: NodeState) -> Bool {
        state.header.xattrGeneration == 0 && (state.backingXattrs?.isEmpty == true || !capabilities.has(.userXattrs))
    }

    /// Removes the attribute wherever it is; whether there was one.
    private func removeXattr(_ id: UInt64, name: [UInt8]) throws -> Bool {
        let (node, key, objectID, previousKey) = try xattrNode(id, name: name)
        var removed = false
        for k in Self.candidates(key, previousKey) where capabilities.has(.userXattrs) {
            let backing = XattrCodec.backingName(name, objectID: objectID, key: k)
            guard try mayHold(node, backing) else { continue }
            try changeBacking(node, backing, present: false) { try $0.fremovexattr(backing) }
            removed = true
        }
        if try sideXattrs(node, keys: Self.candidates(key, previousKey))[name] != nil {
            try changeSideXattrs(node, key: key, previousKey: previousKey) { $0[name] = nil }
            removed = true
        }
        return removed
    }

    // MARK: ACLs and the mode

    /// After a chmod: the access ACL's class entries follow the new mode (`posix_acl_chmod`).
    func followModeInAccessACL(_ node: Node, mode: UInt32) throws {
        guard node.type != .symlink, let grant = try? self.key(for: node, .newContents) else { return }
        let (key, previousKey, objectID) = (grant.key, previousKey(of: grant), grant.header.objectID)
        guard let stored = try storedXattr(node, PosixACL.accessName, key: key, previousKey: previousKey, objectID: objectID),
              let acl = PosixACL(xattr: stored) else { return }
        // Stored under the object's key, the copy under the previous one dropped (`storeXattr`).
        try storeXattr(node, PosixACL.accessName, acl.chmod(mode).xattr, key: key, objectID: objectID, mode: .any,
                       previousKey: previousKey)
    }

    /// A new object's mode and the ACLs it inherits from its directory's default ACL; without
    /// one the caller's umask applies instead (the kernel passes it unapplied, FUSE_CAP_DONT_MASK,
    /// because POSIX ignores the umask where a default ACL exists).
    func inheritedPermissions(from dir: Node, type: ObjectType, mode: UInt32, umask: UInt32) throws
        -> (mode: UInt32, xattrs: [(name: [UInt8], value: [UInt8])]) {
        guard type != .symlink else { return (mode, []) }
        let grant = try self.key(for: dir, .newContents)
        // During the directory's rekey its default ACL may still be under the previous key.
        guard let stored = try storedXattr(dir, PosixACL.defaultName, key: grant.key, previousKey: previousKey(of: grant),
                                           objectID: grant.header.objectID),
              let inheritable = PosixACL(xattr: stored) else {
            return (mode & ~(umask & 0o777), [])
        }
        let (access, newMode) = inheritable.inherited(mode: mode)
        var xattrs: [(name: [UInt8], value: [UInt8])] = []
        if type == .directory { xattrs.append((PosixACL.defaultName, inheritable.xattr)) }
        if !access.isEquivalentToMode { xattrs.append((PosixACL.accessName, access.xattr)) }
        return (newMode, xattrs)
    }

    /// Seals and sets a new object's first attributes on its unnamed backing object (`fd` can
    /// carry xattr calls); returns the backing names, the node's initial cache.
    static func attachXattrs(_ xattrs: [(name: [UInt8], value: [UInt8])], fd: borrowing FileDescriptor, objectID: [UInt8], key: MasterKey) throws -> Set<String> {
        var names: Set<String> = []
        for (name, value) in xattrs {
            let (backing, sealed) = try sealedXattr(name, value, objectID: objectID, key: key)
            try fd.fsetxattr(backing, sealed, flags: 1)
            names.insert(backing)
        }
        return names
    }
}
