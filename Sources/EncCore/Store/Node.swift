import Synchronization

/// Mutable state of one object, guarded by its node's lock.
struct NodeState {
    /// The committed header, the only copy: every header write goes through it.
    var header: ObjectHeader
    /// Whether `header` was verified under its key (false when read in the locked view).
    var verified: Bool
    /// The header sequence known to be durable (synced since written), if any: a metadata update
    /// of a durable header may use the other slot without syncing first (see `HeaderIO.write`).
    var durableSequence: UInt64?
    /// The header sequence whose other slot holds a durable version the object can fall back to
    /// (same extents, only older): a metadata update may then replace it in its own slot without
    /// syncing first. Set after an append-only commit and after metadata writes; not after a
    /// journaled or shrinking commit, nor for a header merely read from disk.
    var replaceableSequence: UInt64?
    var lookups: UInt64 = 0
    var opens = 0
    /// Present while the object is open for I/O; holds the master key alive (soft removal).
    var file: ExtentFile?
    /// Directory entries the kernel may have cached for this object, so they can be invalidated
    /// when a key comes or goes. Stale pairs are harmless: invalidating them is a no-op.
    var dentries: Set<Dentry> = []
}

struct Dentry: Hashable {
    var parent: UInt64
    var name: [UInt8]
}

/// One backing object known to the kernel. Hard links share a node (keyed by backing inode), so
/// every name of a file sees the same size and dirty data.
final class Node: Sendable {
    let id: UInt64
    let backingInode: UInt64
    let type: ObjectType
    /// Directories: an O_PATH directory descriptor; other objects: the backing file, read-write.
    let fd: FileDescriptor
    /// Where the header lives: a directory's ".d" file, otherwise `fd`.
    let headerFD: FileDescriptor
    let state: Mutex<NodeState>

    init(id: UInt64, backingInode: UInt64, fd: FileDescriptor, headerFD: FileDescriptor, header: ObjectHeader, verified: Bool) {
        self.id = id
        self.backingInode = backingInode
        type = header.type
        self.fd = fd
        self.headerFD = headerFD
        state = Mutex(NodeState(header: header, verified: verified))
    }

    var isDirectory: Bool { type == .directory }
}

/// The name of a directory's header file inside its backing directory.
let directoryHeaderName: [UInt8] = Array(".d".utf8)
