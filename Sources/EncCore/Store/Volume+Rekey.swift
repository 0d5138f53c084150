import Locking
import EncCrypto
import EncKeys
import EncFormat
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Rekey (issue 11, FORMAT.md 4.3a and 2.2a): moving a tree from master key A to key B while it
/// stays mounted and in use.
///
/// Every object of the tree goes through the same steps, each one crash-safe on its own:
/// 1. its header is rewritten under B: `policy` (and `macPolicy` where it was A) becomes B,
///    `previousPolicy` A, and for a file or symlink every extent index becomes a legacy range.
///    From then on everything written to it is sealed under B; what is not yet rewritten opens
///    under A, told apart by the header alone (no extra read per extent);
/// 2. legacy extents are resealed under B in bounded batches, each one a journaled flush
///    transaction (an overwrite in place), which shrinks the legacy ranges;
/// 3. xattrs are resealed under B (set under the new backing name, then the old one removed);
/// 4. for a directory, after its children, each entry name still under A is moved to B as a
///    rename of the same name: the new binding is added (synced) before the backing rename;
/// 5. `previousPolicy` is cleared: the object no longer needs A.
/// A directory with a policy of its own inside the tree (a nested policy root) only has its
/// header re-authenticated under B; its contents keep their key.
extension Volume {
    /// Extents resealed per batch: one flush transaction, bounded by the dirty-data limit.
    static func rekeyBatchExtents(_ geometry: ExtentGeometry) -> Int {
        max(1, min(256, ExtentFile.dirtyLimitBytes / geometry.extentSize))
    }

    /// The share of the daemon's time the background rekey may take while the mount is in use:
    /// while foreground requests come, one batch runs at a time (the lanes take turns, on one
    /// thread) and each is followed by a rest as long as it took, so the rekey takes at most half
    /// of one core. Resting per lane, with both lanes running, left it a whole core of two: a
    /// foreground streaming write on a loaded machine ran 3.39x slower. With no foreground
    /// request the lanes and their batch threads run side by side without resting.
    static let rekeyRestFactor = 1.0

    /// Files of one directory re-encrypted at once: batches are single-threaded (one commit), and
    /// an idle mount should get the machine's cores.
    static let rekeyParallelFiles = 2

    /// Threads that decrypt and reseal one batch: a tree of one large file gets the cores too.
    static let rekeyBatchThreads = 2

    /// A present key, or a removed one open files still hold: enough to read what it sealed.
    func lingeringOrPresent(_ identifier: KeyIdentifier) -> MasterKey? { keys.key(for: identifier, allowLingering: true) }

    // MARK: starting

    /// Starts moving the tree rooted at directory `id` (the root, or a directory with a policy of
    /// its own) to the key `newPolicy`. Both keys must be present. A version 1 store is upgraded
    /// to version 2 here, never silently.
    ///
    /// - Throws: ENOTDIR; EINVAL (not a policy root, or already under that key); EACCES (not the
    ///   owner); EBUSY (a rekey of the tree, or of its key, is under way); ENOKEY.
    public func startRekey(_ id: UInt64, to newPolicy: KeyIdentifier, caller: Caller, retirePassphrase: Bool = false) throws {
        let dir = try node(id)
        guard dir.isDirectory else { throw StoreError.notDirectory }
        let header = try verifiedHeader(dir)
        guard caller.uid == 0 || caller.uid == header.uid else { throw StoreError.accessDenied }
        guard id == Self.rootID || header.policy != header.macPolicy, header.policy != newPolicy,
              !retirePassphrase || id == Self.rootID else {
            throw StoreError.invalidArgument
        }
        guard header.previousPolicy == nil, rekeys.successor(of: header.policy) == nil,
              rekeys.tree(involving: newPolicy).map({ $0.progress.finished }) ?? true else { throw StoreError.busy }
        guard keys.key(for: header.policy) != nil, keys.key(for: newPolicy) != nil else { throw StoreError.noKey }
        let record = StoreConfig.RekeyRecord(root: header.objectID, from: header.policy, to: newPolicy,
                                             isRoot: id == Self.rootID, retirePassphrase: retirePassphrase)
        guard let tree = RekeyRegistry.Tree(record) else { throw StoreError.invalidArgument }
        // The record is durable before anything is sealed under the new key, so a crash at any
        // later point resumes; the root's new policy is recorded with it.
        // No operation may have resolved a name in the tree before it was registered and act on
        // it after: each one from now on converts its directory first (`key(for:.newNames)`).
        try nameResolution.withExclusive {
            // Checked again alone: two starts of the same tree must not both register it.
            guard dir.state.withLock({ $0.header.previousPolicy == nil }), rekeys.successor(of: header.policy) == nil,
                  rekeys.tree(involving: newPolicy).map({ $0.progress.finished }) ?? true else { throw StoreError.busy }
            try rekeys.changeConfig(storeFD: storeFD.descriptor) { config, trees, finished in
                config.version = max(config.version, 2)
                config.rekeys = (config.rekeys ?? []) + [record]
                if record.isRoot { config.rootPolicy = newPolicy.hex }
                trees.append(tree)
                finished.removeAll { $0.rootObjectID == tree.rootObjectID }
            }
            try convertForRekey(dir)
        }
        Diagnostics.report("rekey of \(plaintextPath(of: id) ?? "a tree") from \(header.policy) to \(newPolicy) started", severity: .notice)
    }

    /// Runs rekey passes on the calling thread until no tree is left (fsck-like tools and tests;
    /// the daemon uses the background worker of `resumeRekeys`).
    func rekeyUntilDone() {
        while let tree = rekeys.active.first {
            if !rekeyPass(tree, lanes: 1) && rekeys.active.first?.rootObjectID == tree.rootObjectID { return }
        }
    }

    /// Starts the background worker if a tree is being rekeyed (at mount: a rekey interrupted by
    /// a crash or an unmount resumes where its headers say it stopped).
    public func resumeRekeys() {
        guard !rekeys.active.isEmpty, !rekeys.stopRequested.load(ordering: .acquiring), rekeys.claimWorker() else { return }
        Thread.detachNewThread { [self] in
            repeat {
                var progressed = false
                for tree in rekeys.active where !rekeys.stopRequested.load(ordering: .acquiring) {
                    progressed = rekeyPass(tree, lanes: Self.rekeyParallelFiles) || progressed
                }
                // Objects held open under the old key, or whose key is missing, are retried.
                if !rekeys.active.isEmpty { Thread.sleep(forTimeInterval: progressed ? 0.05 : 1) }
            } while !rekeys.releaseWorker()
        }
    }

    // MARK: the background pass

    /// One walk over the tree: counts what is left, moves it, and finishes the rekey when nothing
    /// is left. Returns whether anything was moved.
    /// - Parameter lanes: files of a directory moved at once (1: all on the calling thread).
    private func rekeyPass(_ tree: RekeyRegistry.Tree, lanes: Int) -> Bool {
        do {
            guard let root = try findDirectory(objectID: tree.rootObjectID) else {
                Diagnostics.report("rekey: the tree \(Hex.encode(tree.rootObjectID)) is gone; its record is dropped")
                try finish(tree)
                return true
            }
            defer { if root.id != Self.rootID { release(root) } }
            var census = Census()
            try count(root, tree, &census, isTreeRoot: true)
            rekeys.update(tree.rootObjectID) { p in
                p.objectsTotal = census.objects
                p.objectsDone = census.objects - census.remaining
                p.bytesTotal = census.bytes
                p.bytesDone = census.bytes - census.remainingBytes
                p.objectsLocked = census.locked
            }
            if census.remaining == 0 && !rekeys.stopRequested.load(ordering: .acquiring) {
                try finish(tree)
                return true
            }
            var moved = false
            _ = try rekeyDirectory(root, tree, isTreeRoot: true, lanes: lanes, moved: &moved)
            return moved
        } catch {
            Diagnostics.report("rekey pass: \(error)")
            return false
        }
    }

    /// What a pass found: objects and bytes in the tree, and how many are not yet under the new key.
    struct Census {
        var objects: UInt64 = 0
        var bytes: UInt64 = 0
        var remaining: UInt64 = 0
        var remainingBytes: UInt64 = 0
        var locked: UInt64 = 0
    }

    /// Whether an object of the tree no longer needs the old key for anything.
    static func isRekeyed(_ header: ObjectHeader, from: KeyIdentifier) -> Bool {
        header.previousPolicy != from && header.policy != from && header.macPolicy != from
    }

    private func count(_ dir: Node, _ tree: RekeyRegistry.Tree, _ census: inout Census, isTreeRoot: Bool) throws {
        let header = dir.state.withLock { $0.header }
        census.objects += 1
        if !Self.isRekeyed(header, from: tree.from) { census.remaining += 1 }
        if !isTreeRoot && header.policy != tree.from && header.policy != tree.to { return } // nested policy root
        var seen = Set<UInt64>()
        for entry in try entries(of: dir) {
            guard let child = try? child(of: dir, backingName: entry.name) else {
                census.objects += 1
                census.remaining += 1
                continue
            }
            defer { release(child) }
            if child.isDirectory {
                try count(child, tree, &census, isTreeRoot: false)
                continue
            }
            guard seen.insert(child.backingInode).inserted else { continue }
            let h = child.state.withLock { $0.header }
            let bytes = h.type == .regular || h.type == .symlink ? h.size : 0
            census.objects += 1
            census.bytes += bytes
            if !Self.isRekeyed(h, from: tree.from) {
                census.remaining += 1
                census.remainingBytes += h.previousPolicy == tree.from ? legacyBytes(h) : bytes
                if lingeringOrPresent(tree.from) == nil { census.locked += 1 }
            }
        }
    }

    /// Plaintext bytes of the extents still sealed under the previous key.
    func legacyBytes(_ h: ObjectHeader) -> UInt64 {
        h.legacyRanges.ranges.reduce(0) { sum, range in
            sum + range.reduce(0) { $0 + (h.holes.contains($1) ? 0 : UInt64(h.geometry.plaintextLength($1, size: h.size))) }
        }
    }

    private func entries(of dir: Node) throws -> [Sys.RawEntry] {
        let fd = try directoryFD(dir)
        let listing = try fd.descriptor.listingDescriptor()
        return try listing.listDirectory().filter { NameCodec.isEntryName($0.name) }
    }

    /// Moves one directory and everything under it; true when none of it needs the old key any more.
    private func rekeyDirectory(_ dir: Node, _ tree: RekeyRegistry.Tree, isTreeRoot: Bool, lanes: Int, moved: inout Bool) throws -> Bool {
        let header = try verifiedHeader(dir)
        if !isTreeRoot && header.policy != tree.from && header.policy != tree.to {
            // A nested policy root: only its header, authenticated under the parent's key, moves.
            if header.macPolicy == tree.from {
                try convertForRekey(dir)
                moved = true
            }
            return dir.state.withLock { Self.isRekeyed($0.header, from: tree.from) }
        }
        try convertForRekey(dir)
        var complete = true
        let listed = try entries(of: dir)
        // Directories one after another (each walks its own tree), then the files in parallel.
        for entry in listed where entry.isDirectory {
            complete = rekeyEntry(entry.name, in: dir, tree, lanes: lanes, moved: &moved) && complete
        }
        let files = listed.filter { !$0.isDirectory }.map(\.name)
        if lanes <= 1 {
            for name in files { complete = rekeyEntry(name, in: dir, tree, lanes: 1, moved: &moved) && complete }
        } else {
            let outcome = Lock((complete: complete, moved: moved))
            // Each lane takes the next file when it is done with one: split by position in the
            // listing (encrypted names, so in random order), one lane could get both large files
            // of a directory and the rekey ran on one core (a third of the rounds measured).
            let next = Atomic(0)
            DispatchQueue.concurrentPerform(iterations: lanes) { _ in
                var laneMoved = false
                var laneComplete = true
                while case let i = next.add(1, ordering: .relaxed).oldValue, i < files.count {
                    laneComplete = rekeyEntry(files[i], in: dir, tree, lanes: lanes, moved: &laneMoved) && laneComplete
                }
                outcome.withLock { $0.complete = $0.complete && laneComplete; $0.moved = $0.moved || laneMoved }
            }
            (complete, moved) = outcome.withLock { ($0.complete, $0.moved) }
        }
        complete = try moveNames(in: dir, tree, moved: &moved) && complete
        guard complete else { return false }
        try moveXattrs(dir, tree)
        // The moved names are durable before the header stops saying where else to look: found by
        // the crash-state enumeration, a lost rename then left a name no lookup tried.
        try fsyncDirectory(dir.id)
        try finishObject(dir, tree)
        return true
    }

    /// Moves one entry of `dir` and then its name; true when neither needs the old key any more.
    private func rekeyEntry(_ name: [UInt8], in dir: Node, _ tree: RekeyRegistry.Tree, lanes: Int, moved: inout Bool) -> Bool {
        guard !rekeys.stopRequested.load(ordering: .acquiring) else { return false }
        guard let child = try? child(of: dir, backingName: name) else { return false }
        defer { release(child) }
        do {
            let done = child.isDirectory ? try rekeyDirectory(child, tree, isTreeRoot: false, lanes: lanes, moved: &moved)
                : try rekeyObject(child, tree, moved: &moved)
            // Its name moves as soon as the object is done, so that an object that needs only the
            // new key is reachable with only the new key.
            return done ? try moveName(name, in: dir, tree, moved: &moved) : false
        } catch {
            Diagnostics.report("rekey: \(error)")
            return false
        }
    }

    /// Moves a file, symlink, FIFO, socket or device node; true when it no longer needs the old key.
    private func rekeyObject(_ node: Node, _ tree: RekeyRegistry.Tree, moved: inout Bool) throws -> Bool {
        guard !node.state.withLock({ Self.isRekeyed($0.header, from: tree.from) }) else { return true }
        guard lingeringOrPresent(tree.from) != nil, keys.key(for: tree.to) != nil else { return false }
        _ = try? verifiedHeader(node)
        try recoverIfPossible(node)
        try convertForRekey(node)
        // A file opened under the old key before the rekey started keeps it until closed.
        guard node.state.withLock({ $0.header.policy != tree.from }) else { return false }
        moved = true
        if node.type == .regular || node.type == .symlink {
            let key = try key(for: node, .newContents).key
            var requestsSeen = rekeys.foreground.load(ordering: .relaxed)
            while true {
                guard !rekeys.stopRequested.load(ordering: .acquiring) else { return false }
                let requests = rekeys.foreground.load(ordering: .relaxed)
                let bytes = requests == requestsSeen ? try rekeyBatch(node, key: key, threads: Self.rekeyBatchThreads)
                    : try rekeys.paced(Self.rekeyRestFactor) { try rekeyBatch(node, key: key, threads: 1) }
                requestsSeen = requests
                if bytes < 0 { break }
                rekeys.update(tree.rootObjectID) { $0.bytesRewritten += UInt64(bytes); $0.bytesDone += UInt64(bytes) }
                FaultPoints.reach(.rekeyBatchCommitted)
            }
        }
        try moveXattrs(node, tree)
        try finishObject(node, tree)
        rekeys.update(tree.rootObjectID) { $0.objectsDone += 1 }
        return true
    }

    /// One batch of step 2: plaintext bytes resealed, or -1 when no legacy extent is left.
    ///
    /// Whole committed extents are read, opened and resealed without the node lock, then taken
    /// for the commit under it only if no header was written meanwhile (a commit, a truncate, a
    /// punch): a foreground write to the file waits for the commit, never for the batch's
    /// cryptography. The rest (a partial last extent, extents a write holds dirty) is queued
    /// under the lock as before, which also commits what that write holds.
    /// - Parameter threads: threads that share the batch's decryption and sealing.
    private func rekeyBatch(_ node: Node, key: MasterKey, threads: Int) throws -> Int {
        let (file, sequence, indices) = try node.state.withLock { state in
            let file = try contents(node, state, key: key, writable: true)
            return (file, state.header.sequence, file.wholeLegacyExtents(limit: Self.rekeyBatchExtents(file.geometry)))
        }
        if !indices.isEmpty {
            let resealed: [Journal.Record]
            do {
                resealed = try file.resealLegacy(indices, threads: threads)
            } catch {
                // A commit rewrote the extents while they were read: the batch starts again.
                if node.state.withLock({ $0.header.sequence }) != sequence { return 0 }
                throw error
            }
            let taken = try node.state.withLock { state -> Int in
                guard state.header.sequence == sequence else { return 0 }
                let current = try contents(node, state, key: key, writable: true)
                let taken = current.installResealed(resealed, sealedWith: key)
                if taken > 0 { try commit(current, &state) }
                return taken
            }
            if taken > 0 { return taken }
        }
        return try node.state.withLock { state in
            let file = try contents(node, state, key: key, writable: true)
            let queued = try file.queueLegacy(limit: Self.rekeyBatchExtents(file.geometry))
            if file.hasUncommittedChanges { try commit(file, &state) }
            return file.legacyExtentCount == 0 && queued == 0 ? -1 : queued
        }
    }

    /// Clears `previousPolicy` once nothing of the object is under it any more.
    private func finishObject(_ node: Node, _ tree: RekeyRegistry.Tree) throws {
        let header = node.state.withLock { $0.header }
        guard header.previousPolicy == tree.from, header.macPolicy != tree.from else { return }
        guard let key = lingeringOrPresent(header.macPolicy) else { throw StoreError.noKey }
        // An open file's own legacy view must be empty too (it is what its next commit writes).
        guard header.legacyRanges.isEmpty, node.state.withLock({ $0.file?.legacyExtentCount ?? 0 }) == 0 else { return }
        try mutateHeader(node, key: key, sync: true) { h in
            h.previousPolicy = nil
            h.legacyRanges = HoleMap()
        }
    }

    /// Rewrites the header of an object still under a rekey's old key under the new one (step 1).
    /// Does nothing for objects not under an old key, or while either key is missing, or for a
    /// file open under the old key (its open file keeps sealing with it until closed).
    func convertForRekey(_ node: Node) throws {
        let header = node.state.withLock { $0.header }
        let from = rekeys.successor(of: header.policy) != nil ? header.policy : header.macPolicy
        guard let to = rekeys.successor(of: from), keys.key(for: to) != nil, lingeringOrPresent(from) != nil else { return }
        guard node.state.withLock({ $0.file == nil || $0.file!.key.identifier == to }) else { return }
        _ = try verifiedHeader(node)
        try recoverIfPossible(node)
        // The header is sealed under its macPolicy as it will be: the new key where it was the
        // old one, else (a tree's own root, inside a parent of another policy) the parent's.
        let macPolicy = header.macPolicy == from ? to : header.macPolicy
        guard let newKey = lingeringOrPresent(macPolicy) else { throw StoreError.noKey }
        defer { FaultPoints.reach(.rekeyHeaderConverted) }
        try mutateHeader(node, key: newKey, sync: true) { h in
            guard h.policy == from || h.macPolicy == from else { return }
            h.version = max(h.version, 2)
            if h.policy == from {
                h.policy = to
                h.previousPolicy = from
                let count = h.type == .directory ? 0 : h.geometry.extentCount(size: h.size)
                // Every stored extent; holes are not stored, and a legacy range never covers one.
                var legacy = HoleMap(ranges: count > 0 && ObjectHeader.carriesContents(h.type) ? [0..<count] : [])
                for hole in h.holes.ranges { legacy.remove(hole) }
                h.legacyRanges = legacy
            }
            if h.macPolicy == from { h.macPolicy = to }
            guard h.fits() else { throw StoreError.tooManyLinks }
        }
    }

    // MARK: names

    /// The encrypted form of `name` in `dir` under which it exists: under the directory's key, or,
    /// while a rekey has not moved it yet, under the previous key; the new key's form if neither
    /// exists. Costs one fstatat more per lookup in a directory being rekeyed, two for a miss.
    ///
    /// - Throws: ENOKEY when the name is not under the new key and the old key is gone (it may
    ///   still exist under the old key, which cannot be computed).
    func resolveName(_ name: [UInt8], in dir: Node, key: MasterKey, header: ObjectHeader) throws -> EncryptedName {
        let primary = try NameCodec.encrypt(name, directoryID: header.objectID, key: key)
        guard let previous = header.previousPolicy, header.type == .directory else { return primary }
        let fd = try directoryFD(dir)
        func exists(_ n: EncryptedName) -> Bool { (try? fd.descriptor.fstatAt(n.backingName)) != nil }
        if exists(primary) { return primary }
        guard let oldKey = lingeringOrPresent(previous) else { throw StoreError.noKey }
        let legacy = try NameCodec.encrypt(name, directoryID: header.objectID, key: oldKey)
        // Checked in this order, a name the rekey moves meanwhile is found under one of the two.
        return exists(legacy) ? legacy : primary
    }

    /// Step 4 for what is left in one directory (entries made or renamed in while it was being
    /// walked). Returns whether no name is left under the old key.
    private func moveNames(in dir: Node, _ tree: RekeyRegistry.Tree, moved: inout Bool) throws -> Bool {
        guard dir.state.withLock({ $0.header.previousPolicy }) == tree.from else { return true }
        var complete = true
        for entry in try entries(of: dir) {
            complete = try moveName(entry.name, in: dir, tree, moved: &moved) && complete
        }
        return complete
    }

    /// Step 4 for one entry: renamed to the new key's form of the same name if it is still under
    /// the old key. The new binding is durable before the backing rename, so a crash leaves the
    /// object under one of its two names, bound (as any rename).
    private func moveName(_ backingName: [UInt8], in dir: Node, _ tree: RekeyRegistry.Tree, moved: inout Bool) throws -> Bool {
        // Alone: an operation that resolved this name under the old key acts on it before it
        // moves, and one that resolves it after finds it under the new key.
        try nameResolution.withExclusive { try moveNameAlone(backingName, in: dir, tree, moved: &moved) }
    }

    private func moveNameAlone(_ backingName: [UInt8], in dir: Node, _ tree: RekeyRegistry.Tree, moved: inout Bool) throws -> Bool {
        let header = dir.state.withLock { $0.header }
        guard header.previousPolicy == tree.from else { return true }
        guard let oldKey = lingeringOrPresent(tree.from), let newKey = keys.key(for: tree.to) else { return false }
        // The object found under the name now, not the one a long rekey of it started from: a
        // rename may have put another object there meanwhile.
        guard let child = try? child(of: dir, backingName: backingName) else { return false }
        defer { release(child) }
        let digest = Binding.digest(parentID: header.objectID, backingName: backingName)
        let long = child.state.withLock { $0.header.bindings.first { $0.digest == digest }?.longName } ?? []
        guard let ciphertext = NameCodec.ciphertext(ofShortBackingName: backingName) ?? (long.isEmpty ? nil : long) else {
            return false
        }
        guard let plain = try? NameCodec.decrypt(ciphertext: ciphertext, directoryID: header.objectID, key: oldKey) else {
            return true // already under the new key
        }
        let newName = try NameCodec.encrypt(plain, directoryID: header.objectID, key: newKey)
        let newBinding = Self.binding(parentID: header.objectID, name: newName)
        let dirFD = try changingDirectoryFD(dir)
        let from = Location(parent: dir, name: backingName)
        do {
            try entering(child, by: newBinding, at: Location(parent: dir, name: newName.backingName)) {
                // Under the namespace lock: without RENAME_NOREPLACE (bindfs, sshfs, GlusterFS) the
                // rename is a check and a plain rename, which no other namespace change may split.
                try changingNamespace {
                    // Still the same object under the name (it is the one just bound to the new name).
                    guard try Self.statEntry(dirFD.descriptor, backingName).st_ino == child.backingInode else { throw StoreError.busy }
                    try dirFD.descriptor.renameNoReplace(backingName, dirFD.descriptor, newName.backingName, native: capabilities.has(.renameNoReplace))
                }
                moved = true
                FaultPoints.reach(.rekeyNameMoved)
                child.state.withLock { $0.removeLocation(from); $0.addLocation(Location(parent: dir, name: newName.backingName)) }
            }
        } catch {
            Diagnostics.report("rekey: cannot move a name: \(error)")
            return false
        }
        bindingWentStale(digest, of: child, at: from)
        return true
    }

    // MARK: xattrs

    /// Step 3: every xattr that opens under the old key is sealed again under the new one.
    private func moveXattrs(_ node: Node, _ tree: RekeyRegistry.Tree) throws {
        let header = node.state.withLock { $0.header }
        guard header.previousPolicy == tree.from, let oldKey = lingeringOrPresent(tree.from), let newKey = keys.key(for: tree.to) else { return }
        try moveSideXattrs(node, from: oldKey, to: newKey)
        guard capabilities.has(.userXattrs) else { return }
        let fd = try xattrFD(node)
        var moved = false
        for backing in try fd.descriptor.flistxattr() where backing.hasPrefix(XattrCodec.backingPrefix) {
            // Each attribute is read, moved and recorded under the node's lock, which every
            // foreground change of a backing attribute also holds (`changeBacking`): a value the
            // foreground wrote under the new key since is newer and stays (XATTR_CREATE), and one
            // it removed since is not brought back (read again here, under the lock).
            try node.state.withLock { state in
                guard let sealed = try? fd.descriptor.fgetxattr(backing),
                      let (name, value) = try? XattrCodec.open(sealed, objectID: header.objectID, backingName: backing, key: oldKey)
                else { return }
                let newBacking = XattrCodec.backingName(name, objectID: header.objectID, key: newKey)
                let resealed = try XattrCodec.seal(name: name, value: value, objectID: header.objectID, backingName: newBacking, key: newKey)
                defer { state.backingXattrChanges &+= 1 }
                do {
                    try fd.descriptor.fsetxattr(newBacking, resealed, flags: Sys.xattrCreate)
                } catch StoreError.system(EEXIST) {}
                try fd.descriptor.fremovexattr(backing)
                state.backingXattrs?.insert(newBacking)
                state.backingXattrs?.remove(backing)
                moved = true
            }
        }
        // Durable before `previousPolicy` is cleared, which ends the search under the old key.
        if moved { try fd.descriptor.fsync() }
    }

    // MARK: finishing

    /// Drops the tree's record (and for a passphrase change the old passphrase's parameters).
    private func finish(_ tree: RekeyRegistry.Tree) throws {
        try rekeys.changeConfig(storeFD: storeFD.descriptor) { config, trees, finished in
            config.rekeys = config.rekeys?.filter { $0.root != tree.record.root }
            if config.rekeys?.isEmpty == true { config.rekeys = nil }
            if tree.record.retirePassphrase == true {
                config.passphrases = config.passphrases?.filter { $0.identifier != tree.from.hex }
            }
            if var done = trees.first(where: { $0.rootObjectID == tree.rootObjectID }) {
                done.progress.finished = true
                done.progress.objectsDone = done.progress.objectsTotal
                done.progress.bytesDone = done.progress.bytesTotal
                finished.append(done)
            }
            trees.removeAll { $0.rootObjectID == tree.rootObjectID }
        }
        Diagnostics.report("rekey from \(tree.from) to \(tree.to) finished", severity: .notice)
    }

    /// The directory with object ID `objectID`, found by walking the directories from the root (a
    /// tree's record names its root by identity, which a rename does not change). The root node
    /// itself is not counted; any other is returned with a reference the caller releases.
    private func findDirectory(objectID: [UInt8]) throws -> Node? {
        let root = try node(Self.rootID)
        if root.state.withLock({ $0.header.objectID }) == objectID { return root }
        var queue = [root]
        var index = 0
        defer { for node in queue where node.id != Self.rootID { release(node) } }
        while index < queue.count {
            let dir = queue[index]
            index += 1
            for entry in try entries(of: dir) where entry.isDirectory {
                guard let child = try? child(of: dir, backingName: entry.name) else { continue }
                if child.state.withLock({ $0.header.objectID }) == objectID { return child }
                queue.append(child)
            }
        }
        return nil
    }

    // MARK: status

    /// The rekey state of the tree `id` belongs to, for `rekey status` and `policy get`.
    public func rekeyStatus(of id: UInt64) throws -> RekeyRegistry.Tree? {
        let header = try node(id).state.withLock { $0.header }
        return rekeys.tree(rootedAt: header.objectID)
            ?? rekeys.tree(involving: header.previousPolicy ?? header.policy)
    }
}
