import Locking
import EncCrypto
import EncKeys
import EncFormat

/// Mutable state of one object, guarded by its node's lock.
struct NodeState {
    /// The committed header, the only copy: every header write goes through it.
    var header: ObjectHeader
    /// Whether `header` was verified under its key (false when read in the locked view).
    var verified: Bool
    /// Which versions of the header are durable or replaceable (see `SlotSafety`).
    var slotSafety = SlotSafety()
    var lookups: UInt64 = 0
    var opens = 0
    /// A read, or a write into the page cache, was answered since a write that bypassed the page
    /// cache last took this (`Volume.write(bypassesPageCache:)`): the kernel may cache bytes of
    /// the object older than such a write.
    var cacheableSinceDirectWrite = false
    /// Present while the object is open for I/O; holds the master key alive (soft removal) and
    /// the object's only long-lived backing descriptor.
    var file: ExtentFile?
    /// Where the backing object is entered (one per known hard link). A node holds no descriptor
    /// of its own, so the daemon's descriptors scale with open files, not with the inodes the
    /// kernel caches; the object is reopened from here when needed.
    var locations: [Location] = []
    /// Directory entries the kernel may have cached for this object, so they can be invalidated
    /// when a key comes or goes. Stale pairs are harmless: invalidating them is a no-op.
    var dentries: Set<Dentry> = []
    /// The object's backing xattr names (`user.encfsd.*`) once listed or known from its
    /// creation; nil until then. Lets a probe for an attribute the object lacks answer ENODATA
    /// without a backing call.
    var backingXattrs: Set<String>?
    /// Changes of the backing xattr names made through this node. A listing taken without the
    /// lock is cached only if none came between it and the caching: it could be from before one.
    var backingXattrChanges: UInt64 = 0
    /// The side object the header names, once read or written (`Volume+XattrSide`).
    var sideXattrs: SideXattrs?
    /// The last name went while the object was open: its side object goes at the last close.
    var sideObjectUnlinked = false
    /// An atime an access made due (`Volume.noteAccess`), not yet in the header: written with the
    /// handle's last close or folded into the next header write.
    var accessedAt: UInt64?
    /// Atime writes begun (`Volume.writeAccessTime`): a stat taken while one ran is taken again.
    var accessTimeWrites: UInt64 = 0
    /// Operations changing which backing names lead to this object now (`Volume.changingNames`:
    /// a rename, link, rekey move, or an unlink of one of its names), and how many have ended:
    /// the stale-binding timer leaves the object's bindings alone while one runs, and for the
    /// round one ended in (its change may have missed the round's syncfs).
    var namesChanging = 0
    var namesChanged: UInt64 = 0

    /// Most names remembered per object: enough to survive the unlink of some hard links; a node
    /// with more names finds the others again at their next lookup.
    static let maximumLocations = 8

    mutating func addLocation(_ location: Location) {
        guard !locations.contains(location) else { return }
        if locations.count == Self.maximumLocations { locations.removeFirst() }
        locations.append(location)
    }

    mutating func removeLocation(_ location: Location) {
        locations.removeAll { $0 == location }
    }
}

/// A backing entry by which an object can be reopened: a directory node and the backing name in
/// it. Whatever is found there is used only if it is still the same inode.
struct Location: Equatable {
    let parent: Node
    let name: [UInt8]

    static func == (a: Location, b: Location) -> Bool { a.parent === b.parent && a.name == b.name }
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
    /// The backing object's kernel file handle (inode and generation; nil where the backing
    /// filesystem has none): a reopen, a cached lookup or a stat by name uses what it finds only
    /// if it is this object, never an inode number freed and reused since.
    let identity: [UInt8]?
    /// Directories: the identity of the `.d` header file, checked before the header is written.
    let headerIdentity: [UInt8]?
    /// The root only: the store's directory, held for the mount's lifetime (every other
    /// descriptor is found from it).
    let pinnedDirectory: SharedDescriptor?
    let state: Lock<NodeState>

    init(id: UInt64, backingInode: UInt64, identity: [UInt8]?, headerIdentity: [UInt8]?, header: ObjectHeader,
         verified: Bool, location: Location?, pinnedDirectory: SharedDescriptor? = nil) {
        self.id = id
        self.backingInode = backingInode
        self.identity = identity
        self.headerIdentity = headerIdentity
        type = header.type
        self.pinnedDirectory = pinnedDirectory
        var initial = NodeState(header: header, verified: verified)
        if let location { initial.locations = [location] }
        state = Lock(initial)
    }

    var isDirectory: Bool { type == .directory }

    /// Whether the object found by inode number `inode` with `identity` is this node's object.
    func isObject(inode: UInt64, identity found: [UInt8]?) -> Bool {
        inode == backingInode && (identity == nil || found == identity)
    }
}

/// The name of a directory's header file inside its backing directory.
let directoryHeaderName: [UInt8] = Array(".d".utf8)
