import EncCrypto
import EncKeys
import EncFormat
public struct Timestamp: Sendable, Equatable {
    public var seconds: Int64
    public var nanoseconds: Int64
    public init(seconds: Int64, nanoseconds: Int64) {
        self.seconds = seconds
        self.nanoseconds = nanoseconds
    }
}

/// What `stat` reports for an object.
public struct Attributes: Sendable, Equatable {
    public var inode: UInt64
    /// File type and permission bits, as in `st_mode`.
    public var mode: UInt32
    public var linkCount: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var rdev: UInt64
    public var size: UInt64
    public var blocks: UInt64
    public var accessTime: Timestamp
    public var modificationTime: Timestamp
    public var changeTime: Timestamp
    /// st_blksize: a regular file's extent size, the unit its holes, punches and shifts work in
    /// (and the write size that seals whole extents); 4096 for other objects.
    public var blockSize: UInt32 = 4096
    /// The header's creation time; nil for objects whose header has none (every v1 object).
    public var birthTime: Timestamp?
}

/// The user a request comes from.
public struct Caller: Sendable {
    public var uid: UInt32
    public var gid: UInt32
    /// The creating process's umask, applied by the store (the kernel leaves it unapplied so a
    /// directory's default ACL can take its place).
    public var umask: UInt32
    public init(uid: UInt32, gid: UInt32, umask: UInt32 = 0) {
        self.uid = uid
        self.gid = gid
        self.umask = umask
    }
}

/// The changes one setattr asks for; nil means unchanged.
public struct AttributeChanges: Sendable {
    public enum TimeChange: Sendable { case now, set(Timestamp) }
    public var mode: UInt32?
    public var uid: UInt32?
    public var gid: UInt32?
    public var size: UInt64?
    public var accessTime: TimeChange?
    public var modificationTime: TimeChange?
    /// A truncate or chown that must drop the set-ID bits (the kernel's FATTR_KILL_SUIDGID), or,
    /// with no other change, a kill of its own (before a fallocate, chown(f, -1, -1)); see
    /// `Volume.modeDroppingSetID`. Not a change of its own for `isEmpty`.
    public var dropSetID = false
    public init() {}

    var isEmpty: Bool {
        mode == nil && uid == nil && gid == nil && size == nil && accessTime == nil && modificationTime == nil
    }
}

/// One directory entry as listed.
public struct DirectoryEntry: Sendable {
    public var name: [UInt8]
    public var inode: UInt64
    /// File type bits (S_IFMT) when known cheaply, else 0.
    public var typeBits: UInt32
    /// The entry's name in the backing directory (nil for "." and ".."): lets a readdirplus
    /// look the entry up without encrypting its name again.
    public var backingName: [UInt8]? = nil

    public init(name: [UInt8], inode: UInt64, typeBits: UInt32, backingName: [UInt8]? = nil) {
        self.name = name
        self.inode = inode
        self.typeBits = typeBits
        self.backingName = backingName
    }
}

public struct FileSystemStatistics: Sendable {
    public var blockSize: UInt64
    public var blocks: UInt64
    public var blocksFree: UInt64
    public var blocksAvailable: UInt64
    public var files: UInt64
    public var filesFree: UInt64
    public var nameMax: UInt64
}

public enum RenameMode: Sendable { case replace, noReplace, exchange }
