import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Headers of files the kernel has forgotten (FORGET took their last lookup), so that looking
/// one up again costs a stat and a file handle instead of an open, a 4 KiB read, a key derivation
/// and two MACs. A tree listed again after its inodes were evicted (`ls -lR` after drop_caches,
/// memory pressure) is looked up entry by entry: that read was most of each entry's cost.
///
/// Trust: an entry is the header the daemon's own node held when it was dropped, which is no
/// more than a node the kernel still references is trusted (that one is never read again). It is
/// served only for the same object, by its kernel file handle (which carries the inode's
/// generation, so a number freed and reused never matches), whose stat is what the drop saw after
/// the daemon's last change to it: ctime, mtime, size, links, mode, owner. A write to the backing
/// file after that moves its ctime; one within the same clock tick as the drop's stat is not seen,
/// and what is served then is still the daemon's own newest state, never an older one. FUSE
/// backings (whose handles carry the server's node IDs, not the object) get no entries; a key
/// added, removed or wiped since the drop makes an entry stale.
///
/// Lives in the node table, under its lock: an entry exists only while no node of its inode is
/// in the table. A drop reserves the inode while it still holds the table lock (`reserve`), and
/// `Volume.insert` of any node of that inode takes both the reservation and the entry out, so a
/// drop whose stat comes late (another node of the inode made, changed and dropped meanwhile)
/// finds its reservation gone and keeps nothing: no older header ever replaces a newer one.
/// The stat is taken under the dropped node's own lock, after the last write through it, and a
/// file changed within `racyInterval` of that stat is not kept: a write through a node a timer
/// still holds (stale bindings) or from the backing side then shows as a later ctime even where
/// ctimes are coarse (one clock tick, 4 ms at HZ=250, on kernels before multigrain timestamps).
struct ForgottenHeaders {
    struct Fingerprint: Equatable {
        let size: Int64
        let links: UInt64
        let mode: UInt32
        let owner: UInt32
        let group: UInt32
        let modified: Int64
        let modifiedNanoseconds: Int64
        let changed: Int64
        let changedNanoseconds: Int64

        init(_ st: stat) {
            size = Int64(st.st_size)
            links = UInt64(st.st_nlink)
            mode = UInt32(st.st_mode)
            owner = UInt32(st.st_uid)
            group = UInt32(st.st_gid)
            modified = Int64(st.st_mtim.tv_sec)
            modifiedNanoseconds = Int64(st.st_mtim.tv_nsec)
            changed = Int64(st.st_ctim.tv_sec)
            changedNanoseconds = Int64(st.st_ctim.tv_nsec)
        }
    }

    struct Entry {
        let identity: [UInt8]
        let fingerprint: Fingerprint
        let header: ObjectHeader
        let verified: Bool
        /// What the node knew of its slots: nothing has written them since, so a metadata write
        /// after the lookup (the atime a first read makes due) owes no more syncs than it would have.
        let slotSafety: SlotSafety
        let backingXattrs: Set<String>?
        /// `KeyTable.changes` when the node was dropped.
        let keyChanges: UInt64
    }

    /// Most entries kept. At about 1 KiB each (a header fits its 2 KiB slot), 16 MiB.
    let capacity: Int
    /// Backing xattr names kept with an entry at most; a file with more (whose names whoever
    /// writes the backing chooses, up to 64 KiB of them) is kept without them.
    static let largestXattrSet = 8
    /// A change to the file this recent is not trusted to show in its ctime.
    static let racyInterval: Int64 = 50_000_000 // ns
    private var reservations: [UInt64: UInt64] = [:]
    private var nextReservation: UInt64 = 0
    /// Each entry with its place in `order`.
    private var entries: [UInt64: (entry: Entry, slot: Int)] = [:]
    /// Inodes in the order they were put in, overwritten round the ring: the oldest goes first.
    private var order: [UInt64] = []
    private var next = 0

    init(capacity: Int) { self.capacity = max(1, capacity) }

    var count: Int { entries.count }

    func contains(_ inode: UInt64) -> Bool { entries[inode] != nil }

    /// Claims the right to `put` an entry for `inode` later; any node made for it meanwhile
    /// (`remove`) cancels the claim.
    mutating func reserve(_ inode: UInt64) -> UInt64 {
        nextReservation += 1
        reservations[inode] = nextReservation
        return nextReservation
    }

    /// Keeps `entry` if `reservation` still holds.
    mutating func put(_ inode: UInt64, _ entry: Entry, reservation: UInt64) {
        guard reservations[inode] == reservation else { return }
        reservations[inode] = nil
        if order.count < capacity {
            order.append(inode)
        } else {
            let evicted = order[next]
            if entries[evicted]?.slot == next { entries[evicted] = nil }
            order[next] = inode
        }
        entries[inode] = (entry, next)
        next = (next + 1) % capacity
    }

    /// Takes the entry out: it is used at most once, by the node made from it.
    mutating func take(_ inode: UInt64) -> Entry? { entries.removeValue(forKey: inode)?.entry }

    /// A node of `inode` is in the table: no entry for it, and no claim to make one.
    mutating func remove(_ inode: UInt64) {
        entries[inode] = nil
        reservations[inode] = nil
    }

    /// A drop that keeps nothing after all lets go of its claim.
    mutating func cancel(_ inode: UInt64, reservation: UInt64) {
        if reservations[inode] == reservation { reservations[inode] = nil }
    }
}
