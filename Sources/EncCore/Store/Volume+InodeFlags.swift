import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Who asks to change inode flags, with the capabilities that decide it (FUSE passes none; the
/// daemon reads them from the caller's process).
public struct FlagsCaller: Sendable {
    public var uid: UInt32
    /// CAP_LINUX_IMMUTABLE: may set or clear immutable and append-only.
    public var mayChangeImmutable: Bool
    /// CAP_FOWNER: may change the flags of an object it does not own.
    public var ownsEverything: Bool
    public init(uid: UInt32, mayChangeImmutable: Bool, ownsEverything: Bool) {
        self.uid = uid
        self.mayChangeImmutable = mayChangeImmutable
        self.ownsEverything = ownsEverything
    }
}

/// FS_IOC_GETFLAGS/SETFLAGS and what the flags forbid. The kernel enforces none of them for FUSE
/// (its checks test inode bits FUSE never sets), so every operation they restrict checks here,
/// with ext4's rules and its EPERM.
extension Volume {
    public typealias InodeFlags = ObjectHeader.InodeFlags

    public func inodeFlags(of id: UInt64) throws -> InodeFlags {
        try node(id).state.withLock { $0.header.inodeFlags }
    }

    /// Sets the flags to `requested` (FS_IOC_SETFLAGS's value): FS_ENCRYPT_FL, which no caller can
    /// change, is ignored; any other flag this store does not keep is EOPNOTSUPP, as ext4 answers
    /// for flags it cannot set. FS_DIRSYNC_FL means something for directories only and is dropped
    /// for other objects, as ext4 masks it.
    public func setInodeFlags(_ id: UInt64, _ requested: UInt32, caller: FlagsCaller) throws {
        let node = try node(id)
        guard keepsInodeMetadata else {
            Diagnostics.report("FS_IOC_SETFLAGS refused: inode flags need a format version 3 store (this one is version "
                               + "\(config.version)); run `encfsd upgrade \(storePath)` to upgrade it")
            throw StoreError.notSupported
        }
        var wanted = InodeFlags(rawValue: requested & ~FileAttrIoctl.encryptFlag)
        guard InodeFlags.storable.isSuperset(of: wanted) else { throw StoreError.notSupported }
        if !node.isDirectory { wanted.remove(.directorySync) }
        let (owner, old) = node.state.withLock { ($0.header.uid, $0.header.inodeFlags) }
        guard caller.uid == owner || caller.ownsEverything else { throw StoreError.notPermitted }
        let guarded: InodeFlags = [.immutable, .appendOnly]
        if !old.symmetricDifference(wanted).isDisjoint(with: guarded) && !caller.mayChangeImmutable {
            throw StoreError.notPermitted
        }
        // ext4: an immutable object's other flags change only in the call that clears immutable.
        if old.contains(.immutable) && wanted.contains(.immutable) && old != wanted { throw StoreError.notPermitted }
        try mutateHeader(node, key: try key(for: node, .header).key, sync: wanted.contains(.sync)) { $0.inodeFlags = wanted }
    }

    /// The flags a new object takes from its directory, as ext4 passes them on (EXT4_FL_INHERITED,
    /// then ext4_mask_flags): a directory takes them all, a regular file all but FS_DIRSYNC_FL,
    /// anything else only FS_NODUMP_FL and FS_NOATIME_FL. Immutable and append-only never pass on.
    static func inheritedFlags(_ directory: InodeFlags, type: ObjectType) -> InodeFlags {
        let inherited = directory.intersection([.sync, .noDump, .noAccessTime, .directorySync])
        return switch type {
        case .directory: inherited
        case .regular: inherited.subtracting(.directorySync)
        default: inherited.intersection([.noDump, .noAccessTime])
        }
    }

    /// EPERM if the object has any of `flags`.
    func refuse(_ node: Node, ifAny flags: InodeFlags) throws {
        if !node.state.withLock({ $0.header.inodeFlags }).isDisjoint(with: flags) { throw StoreError.notPermitted }
    }

    /// An object leaving a name (unlink, rmdir, rename, replaced by a rename): neither it nor its
    /// directory may be immutable or append-only. The object is the node the kernel looked up
    /// before asking (found by its backing inode); one the daemon does not know is opened. One
    /// whose header cannot be read has no flags anyone could have set: it may go, as before.
    func checkRemoval(from dir: Node, backingName: [UInt8], inode: UInt64) throws {
        try refuse(dir, ifAny: [.immutable, .appendOnly])
        guard keepsInodeMetadata else { return }
        if let known = table.withLock({ $0.byInode[inode] }) {
            try refuse(known, ifAny: [.immutable, .appendOnly])
            return
        }
        guard let victim = try? child(of: dir, backingName: backingName) else { return }
        defer { release(victim) }
        try refuse(victim, ifAny: [.immutable, .appendOnly])
    }

    /// setattr as ext4_setattr decides: nothing changes on an immutable object; an append-only one
    /// keeps its mode, owner, size and explicitly set times (touching it to now is allowed).
    func checkAttributeChange(_ node: Node, _ changes: AttributeChanges) throws {
        let flags = node.state.withLock { $0.header.inodeFlags }
        if flags.contains(.immutable) { throw StoreError.notPermitted }
        guard flags.contains(.appendOnly) else { return }
        func explicit(_ t: AttributeChanges.TimeChange?) -> Bool { if case .set? = t { true } else { false } }
        if changes.mode != nil || changes.uid != nil || changes.gid != nil || changes.size != nil
            || explicit(changes.accessTime) || explicit(changes.modificationTime) {
            throw StoreError.notPermitted
        }
    }

    /// An open as may_open decides: an immutable file opens for reading only, an append-only one
    /// for writing only with O_APPEND, and neither with O_TRUNC.
    func checkOpen(_ node: Node, flags: Int32) throws {
        let inodeFlags = node.state.withLock { $0.header.inodeFlags }
        guard !inodeFlags.isDisjoint(with: [.immutable, .appendOnly]) else { return }
        let writes = flags & O_ACCMODE != O_RDONLY
        if flags & O_TRUNC != 0 || (writes && (inodeFlags.contains(.immutable) || flags & O_APPEND == 0)) {
            throw StoreError.notPermitted
        }
    }

    /// A write as ext4 takes it: none to an immutable file, a descriptor opened before the flag
    /// was set included. An append-only file is guarded at open (`checkOpen`) only: ext4 lets a
    /// descriptor opened for writing before the flag was set write anywhere, and so does encfsd.
    func checkWrite(_ state: NodeState) throws {
        if state.header.inodeFlags.contains(.immutable) { throw StoreError.notPermitted }
    }

    /// A directory's entries changed (create, link, unlink, rename): with FS_DIRSYNC_FL or
    /// FS_SYNC_FL the change is durable before the reply, as on ext4.
    func syncIfDirectorySync(_ dir: Node) throws {
        guard !dir.state.withLock({ $0.header.inodeFlags }).isDisjoint(with: [.directorySync, .sync]) else { return }
        try fsyncDirectory(dir.id)
    }
}
