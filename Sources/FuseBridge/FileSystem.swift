#if canImport(Glibc)
import Glibc
#endif

/// What the FUSE bridge asks of a filesystem. Plain Swift types only: nothing here names a
/// libfuse type, so the implementation (in the daemon) never touches libfuse.
public protocol FileSystem: Sendable {
    func lookup(parent: UInt64, name: [UInt8]) throws -> Entry
    func forget(_ node: UInt64, count: UInt64)
    func getattr(_ node: UInt64) throws -> FileAttributes
    func setattr(_ node: UInt64, _ changes: SetAttributes) throws -> FileAttributes
    func readlink(_ node: UInt64) throws -> [UInt8]
    func mknod(parent: UInt64, name: [UInt8], mode: UInt32, rdev: UInt64, context: RequestContext) throws -> Entry
    func mkdir(parent: UInt64, name: [UInt8], mode: UInt32, context: RequestContext) throws -> Entry
    func unlink(parent: UInt64, name: [UInt8]) throws
    func rmdir(parent: UInt64, name: [UInt8]) throws
    func symlink(target: [UInt8], parent: UInt64, name: [UInt8], context: RequestContext) throws -> Entry
    func rename(parent: UInt64, name: [UInt8], newParent: UInt64, newName: [UInt8], flags: UInt32, context: RequestContext) throws
    func link(_ node: UInt64, newParent: UInt64, newName: [UInt8]) throws -> Entry
    /// - Parameter dropSetID: an O_TRUNC open by a caller without CAP_FSETID: the truncate drops
    ///   the set-ID bits (see `SetAttributes.dropSetID`).
    func open(_ node: UInt64, flags: Int32, dropSetID: Bool) throws -> OpenReply
    func create(parent: UInt64, name: [UInt8], mode: UInt32, flags: Int32, context: RequestContext) throws -> (Entry, OpenReply)
    /// Reads into `buffer` (the request's size); returns the bytes read.
    func read(_ node: UInt64, handle: UInt64, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    /// - Parameter dropSetID: the writer lacks CAP_FSETID: the write drops the set-ID bits.
    /// - Parameter bypassesPageCache: an O_DIRECT write, not a page writeback.
    /// - Returns: the bytes written, and for a write that bypasses the page cache whether a read
    ///   or cached write answered since the last such write may have left older pages cached.
    func write(_ node: UInt64, handle: UInt64, offset: UInt64, data: UnsafeRawBufferPointer, dropSetID: Bool,
               bypassesPageCache: Bool) throws -> (written: Int, pagesMayBeOlder: Bool)
    func flush(_ node: UInt64, handle: UInt64) throws
    func release(_ node: UInt64, handle: UInt64) throws
    func fsync(_ node: UInt64, handle: UInt64, dataOnly: Bool) throws
    func fallocate(_ node: UInt64, handle: UInt64, mode: Int32, offset: UInt64, length: UInt64) throws
    /// lseek(2) SEEK_DATA (`data`) or SEEK_HOLE: the offset of the next data or hole at or after
    /// `offset`; ENXIO at or past the end of the file.
    func seek(_ node: UInt64, handle: UInt64, from offset: UInt64, data: Bool) throws -> UInt64
    func opendir(_ node: UInt64) throws -> UInt64
    /// At most `limit` entries from `offset`: a reply holds one page of them, and converting the
    /// rest of a large directory on every page would make listing it quadratic.
    func readdir(_ node: UInt64, handle: UInt64, offset: Int, limit: Int) throws -> ArraySlice<DirectoryItem>
    /// Looks up an entry `readdir` listed, for readdirplus: like `lookup`, it adds one kernel
    /// reference to the node it returns.
    func lookup(parent: UInt64, listed item: DirectoryItem) throws -> Entry
    func releasedir(_ node: UInt64, handle: UInt64)
    func fsyncdir(_ node: UInt64, handle: UInt64, dataOnly: Bool) throws
    func statfs(_ node: UInt64) throws -> VolumeStatistics
    func setxattr(_ node: UInt64, name: [UInt8], value: [UInt8], flags: Int32) throws
    /// nil when the node has no attribute of that name (answered ENODATA).
    func getxattr(_ node: UInt64, name: [UInt8]) throws -> [UInt8]?
    func listxattr(_ node: UInt64, context: RequestContext) throws -> [[UInt8]]
    func removexattr(_ node: UInt64, name: [UInt8]) throws
    /// A restricted ioctl: `input` holds `_IOC_SIZE(command)` bytes for write ioctls, and the
    /// reply must be at most `outputSize` bytes.
    func ioctl(_ node: UInt64, command: UInt32, input: [UInt8], outputSize: Int, context: RequestContext) throws -> IoctlReply
    /// The errno a request that threw `error` is answered with (default below).
    func errnoValue(of error: any Error) -> Int32
}

/// Errors the bridge can answer with: each knows its errno. The daemon maps its own errors by
/// conforming them; anything else is answered with EIO.
public protocol ErrnoConvertible: Error {
    var errnoValue: Int32 { get }
}

extension FileSystem {
    /// The errno a failed request is answered with. A file system that knows its error types
    /// answers with concrete casts first: the cast to `any ErrnoConvertible` looks the
    /// conformance up at run time, on every ENOENT of a negative lookup.
    public func errnoValue(of error: any Error) -> Int32 {
        (error as? any ErrnoConvertible)?.errnoValue ?? EIO
    }
}

public struct RequestContext: Sendable {
    public var uid: UInt32
    public var gid: UInt32
    public var pid: Int32
    public var umask: UInt32
}

public struct FileAttributes: Sendable {
    public var inode: UInt64
    public var mode: UInt32
    public var linkCount: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var rdev: UInt64
    public var size: UInt64
    public var blocks: UInt64
    public var accessTime: (seconds: Int64, nanoseconds: Int64)
    public var modificationTime: (seconds: Int64, nanoseconds: Int64)
    public var changeTime: (seconds: Int64, nanoseconds: Int64)
    public var blockSize: UInt32 = 4096
    /// When the object was created, for statx's STX_BTIME; nil when the store does not know.
    public var birthTime: (seconds: Int64, nanoseconds: Int64)?

    public init(inode: UInt64, mode: UInt32, linkCount: UInt32, uid: UInt32, gid: UInt32, rdev: UInt64, size: UInt64,
                blocks: UInt64, accessTime: (Int64, Int64), modificationTime: (Int64, Int64), changeTime: (Int64, Int64)) {
        self.inode = inode
        self.mode = mode
        self.linkCount = linkCount
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.size = size
        self.blocks = blocks
        self.accessTime = accessTime
        self.modificationTime = modificationTime
        self.changeTime = changeTime
    }
}

public struct Entry: Sendable {
    public var node: UInt64
    public var attributes: FileAttributes
    public init(node: UInt64, attributes: FileAttributes) {
        self.node = node
        self.attributes = attributes
    }
}

public struct OpenReply: Sendable {
    public var handle: UInt64
    /// Keep the kernel's page cache across opens: safe because all changes pass through us.
    public var keepCache: Bool
    public init(handle: UInt64, keepCache: Bool) {
        self.handle = handle
        self.keepCache = keepCache
    }
}

public struct SetAttributes: Sendable {
    public enum Time: Sendable { case now, set(seconds: Int64, nanoseconds: Int64) }
    public var mode: UInt32?
    public var uid: UInt32?
    public var gid: UInt32?
    public var size: UInt64?
    public var accessTime: Time?
    public var modificationTime: Time?
    public var handle: UInt64?
    /// The kernel asks the change to drop the set-ID bits (FATTR_KILL_SUIDGID: a truncate by a
    /// caller without CAP_FSETID, or any chown of a non-directory; or a SETATTR that sets nothing,
    /// see `PrivilegeNegotiation.examine`). A write, truncate or chown
    /// removes `security.capability` whatever this says, as on ext4.
    public var dropSetID = false
}

public struct DirectoryItem: Sendable {
    public var name: [UInt8]
    public var inode: UInt64
    public var typeBits: UInt32
    /// What the filesystem needs to look this entry up again (`lookup(parent:listed:)`); opaque
    /// to the bridge. nil for "." and "..", which readdirplus never looks up.
    public var lookupKey: [UInt8]?
    public init(name: [UInt8], inode: UInt64, typeBits: UInt32, lookupKey: [UInt8]? = nil) {
        self.name = name
        self.inode = inode
        self.typeBits = typeBits
        self.lookupKey = lookupKey
    }
}

public struct VolumeStatistics: Sendable {
    public var blockSize: UInt64
    public var blocks: UInt64
    public var blocksFree: UInt64
    public var blocksAvailable: UInt64
    public var files: UInt64
    public var filesFree: UInt64
    public var nameMax: UInt64
    public init(blockSize: UInt64, blocks: UInt64, blocksFree: UInt64, blocksAvailable: UInt64, files: UInt64,
                filesFree: UInt64, nameMax: UInt64) {
        self.blockSize = blockSize
        self.blocks = blocks
        self.blocksFree = blocksFree
        self.blocksAvailable = blocksAvailable
        self.files = files
        self.filesFree = filesFree
        self.nameMax = nameMax
    }
}

public struct IoctlReply: Sendable {
    public var result: Int32
    public var output: [UInt8]
    public init(result: Int32 = 0, output: [UInt8] = []) {
        self.result = result
        self.output = output
    }
}

/// How the mount is configured.
public struct MountOptions: Sendable {
    public var mountpoint: String
    public var fsName: String
    public var allowOther: Bool
    /// Extra `-o` options passed through to libfuse (validated by it).
    public var extra: [String]
    public var attributeTimeout: Double
    public var entryTimeout: Double
    public var threads: Int
    /// Let the kernel cache writes (FUSE_CAP_WRITEBACK_CACHE). Off by default: measured on this
    /// store it costs more than it saves (docs/PERFORMANCE.md, 2026-11-22 "writeback cache").
    public var writebackCache: Bool
    /// The mount's read-ahead in KiB (`KernelReadAhead`); 0 leaves the kernel's 128 KiB.
    public var readAheadKiB: Int

    public static let defaultReadAheadKiB = 4096

    public init(mountpoint: String, fsName: String, allowOther: Bool = false, extra: [String] = [],
                attributeTimeout: Double = 1, entryTimeout: Double = 1, threads: Int = 16, writebackCache: Bool = false,
                readAheadKiB: Int = MountOptions.defaultReadAheadKiB) {
        self.mountpoint = mountpoint
        self.fsName = fsName
        self.allowOther = allowOther
        self.extra = extra
        self.attributeTimeout = attributeTimeout
        self.entryTimeout = entryTimeout
        self.threads = threads
        self.writebackCache = writebackCache
        self.readAheadKiB = readAheadKiB
    }
}
