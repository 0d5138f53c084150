import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// An object's side object as last read or written: its generation, what it holds, and the key
/// that sealed it (a rekey reseals one still under the old key).
struct SideXattrs {
    let generation: UInt64
    let attributes: [[UInt8]: [UInt8]]
    let sealedBy: KeyIdentifier
}

/// Xattrs kept in the object's side object (`XattrSideStore`, FORMAT.md 16): all of them on a
/// backing without user xattrs, the ones the backing file refuses on one with them.
///
/// An object whose header names no side object (`xattrGeneration` 0, every object until it needs
/// one) costs nothing here: the answer is the header field, read under the node's lock.
extension Volume {
    /// Side objects need the v3 header's `xattrGeneration`.
    var holdsSideObjects: Bool { slots.newObjectVersion >= 3 }

    /// Said once per mount: why xattrs are refused on a backing without them in an older store.
    func refuseSideObjectsOnce() {
        guard sideObjectRefusalReported.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else { return }
        Diagnostics.report("the backing (\(capabilities.filesystemType)) has no user xattrs, and a store of format version \(config.version) "
            + "cannot keep them in side objects: xattrs are refused (EOPNOTSUPP); run `encfsd upgrade` to make it version 3")
    }

    /// The store's `.xattrs` directory, opened once and kept (made at the first side object).
    func sideDirectory(create: Bool) throws -> SharedDescriptor? {
        try xattrSideDirectory.withLock { cached in
            if let cached { return cached }
            cached = try XattrSideStore.directory(storeFD: storeFD.descriptor, create: create)
            return cached
        }
    }

    /// `.xattrs` for a change, only while it is still beneath the store root: the kept descriptor
    /// follows the directory wherever someone who can write the backing moves it, and a side
    /// object must never be made or removed outside the store (as `checkBeneath` guards the
    /// journal). One moved out is dropped, so the next change opens whatever is at the name.
    func changingSideDirectory(create: Bool) throws -> SharedDescriptor? {
        guard let directory = try sideDirectory(create: create) else { return nil }
        do {
            try directory.descriptor.checkBeneath(root: rootPlace)
        } catch {
            xattrSideDirectory.withLock { if $0 === directory { $0 = nil } }
            throw error
        }
        return directory
    }

    /// The attributes in the object's side object (none when its header names none), opened with
    /// `keys` or the key a rekey is moving the object from.
    func sideXattrs(_ node: Node, keys given: [MasterKey]) throws -> [[UInt8]: [UInt8]] {
        try node.state.withLock { state in try loadSideXattrs(&state, keys: given)?.attributes ?? [:] }
    }

    /// Reads the side object the header names unless the cache holds that generation. A side
    /// object that is missing, not a plain file of one link, or does not open under the object's
    /// ID and this generation is an integrity failure of this object's xattrs (EIO).
    func loadSideXattrs(_ state: inout NodeState, keys given: [MasterKey]) throws -> SideXattrs? {
        let generation = state.header.xattrGeneration
        guard generation != 0 else { return nil }
        if let cached = state.sideXattrs, cached.generation == generation { return cached }
        let objectID = state.header.objectID
        let candidates = given + (state.header.previousPolicy.flatMap { keys.key(for: $0, allowLingering: true) }.map { [$0] } ?? [])
        guard let directory = try sideDirectory(create: false) else {
            throw StoreError.integrity("xattr side object of \(Hex.encode(objectID)) is missing (no .xattrs)")
        }
        #if ENCFSD_TEST_HOOKS
        sideObjectReads.add(1, ordering: .relaxed)
        #endif
        let image = try XattrSideStore.read(directoryFD: directory.descriptor, objectID: objectID, generation: generation)
        for key in candidates {
            guard let attributes = try? XattrSideObject.open(image, objectID: objectID, generation: generation, key: key) else { continue }
            let loaded = SideXattrs(generation: generation, attributes: attributes, sealedBy: key.identifier)
            state.sideXattrs = loaded
            return loaded
        }
        throw StoreError.integrity("xattr side object of \(Hex.encode(objectID)) failed authentication")
    }

    /// Applies `change` to the side object's attributes and commits the result as the next
    /// generation, durably before returning (see `commitSideXattrs`).
    func changeSideXattrs(_ node: Node, key: MasterKey, previousKey: MasterKey?,
                          _ change: (inout [[UInt8]: [UInt8]]) throws -> Void) throws {
        let headerKey = try self.key(for: node, .header).key
        try node.state.withLock { state in
            var attributes = try loadSideXattrs(&state, keys: Self.candidates(key, previousKey))?.attributes ?? [:]
            try change(&attributes)
            // encfsd's own limit per object, refused at the call as ext4 refuses a full xattr block.
            guard XattrSideObject.plaintextBytes(attributes) <= XattrSideObject.maximumPlaintext else { throw StoreError.system(ENOSPC) }
            try commitSideXattrs(node, &state, attributes, key: key, headerKey: headerKey)
        }
    }

    /// The commit: generation N+1 written under its own name and made durable (file and entry),
    /// then the header naming N+1 written and synced, and only then N unlinked. A crash before
    /// the header is durable leaves N named and readable (N+1 is garbage); after it, N+1, and N
    /// is garbage. Once non-zero a generation only grows, even when the set becomes empty: an
    /// old file kept by whoever can write the store never matches a later header.
    func commitSideXattrs(_ node: Node, _ state: inout NodeState, _ attributes: [[UInt8]: [UInt8]], key: MasterKey,
                          headerKey: MasterKey) throws {
        let objectID = state.header.objectID
        let old = state.header.xattrGeneration
        let next = old + 1
        let image = try XattrSideObject.seal(attributes, objectID: objectID, generation: next, key: key)
        guard let directory = try changingSideDirectory(create: true) else { throw StoreError.system(ENOENT) }
        try XattrSideStore.write(directoryFD: directory.descriptor, objectID: objectID, generation: next, image: image)
        FaultPoints.reach(.xattrSideObjectWritten)
        try mutateHeaderLocked(node, &state, key: headerKey, sync: true) { $0.xattrGeneration = next }
        state.sideXattrs = SideXattrs(generation: next, attributes: attributes, sealedBy: key.identifier)
        FaultPoints.reach(.xattrSideHeaderCommitted)
        if old != 0 { XattrSideStore.remove(directoryFD: directory.descriptor, objectID: objectID, generation: old) }
    }

    /// A new object's first attributes, where the backing has no xattrs: generation 1, durable
    /// before the header that names it is written (the caller sets `xattrGeneration` to 1).
    func createSideXattrs(_ xattrs: [(name: [UInt8], value: [UInt8])], objectID: [UInt8], key: MasterKey) throws -> SideXattrs {
        var attributes: [[UInt8]: [UInt8]] = [:]
        for (name, value) in xattrs { attributes[name] = value }
        let image = try XattrSideObject.seal(attributes, objectID: objectID, generation: 1, key: key)
        guard let directory = try changingSideDirectory(create: true) else { throw StoreError.system(ENOENT) }
        try XattrSideStore.write(directoryFD: directory.descriptor, objectID: objectID, generation: 1, image: image)
        return SideXattrs(generation: 1, attributes: attributes, sealedBy: key.identifier)
    }

    /// A rekey's xattr step for the side object: one still sealed under the old key is committed
    /// again, as the next generation, under the new one.
    func moveSideXattrs(_ node: Node, from oldKey: MasterKey, to newKey: MasterKey) throws {
        guard node.state.withLock({ $0.header.xattrGeneration }) != 0 else { return }
        let headerKey = try key(for: node, .header).key
        try node.state.withLock { state in
            guard let side = try loadSideXattrs(&state, keys: [newKey, oldKey]), side.sealedBy != newKey.identifier else { return }
            try commitSideXattrs(node, &state, side.attributes, key: newKey, headerKey: headerKey)
        }
    }

    /// After the last name of an object went (unlink, or a rename over it): its side object goes
    /// too, once the directory change is durable, or a power loss could bring the object back
    /// without it. An object still open keeps its side object until its last close.
    func dropSideObject(ofUnlinked inode: UInt64, header known: ObjectHeader?, directoryFD: borrowing FileDescriptor) {
        guard holdsSideObjects else { return }
        let node = table.withLock { $0.byInode[inode] }
        let (header, open) = node.map { n in n.state.withLock { ($0.header, $0.opens > 0) } } ?? (known, false)
        guard let header, header.xattrGeneration != 0 else { return }
        if open, let node {
            node.state.withLock { $0.sideObjectUnlinked = true }
            return
        }
        if let listing = try? directoryFD.listingDescriptor() { try? listing.fsync() }
        removeSideObject(of: header)
    }

    func removeSideObject(of header: ObjectHeader) {
        removeSideObject(objectID: header.objectID, generation: header.xattrGeneration)
    }

    func removeSideObject(objectID: [UInt8], generation: UInt64) {
        guard generation != 0, let directory = (try? changingSideDirectory(create: false)) ?? nil else { return }
        XattrSideStore.remove(directoryFD: directory.descriptor, objectID: objectID, generation: generation)
    }
}
