import Foundation
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// P2 (power loss), shown by enumeration (ALICE / CrashMonkey, done in-process): a workload runs
/// on a `Volume` while every backing operation is recorded. For each point in the log, the
/// states a power loss could leave are rebuilt on a model: every operation a later sync made
/// durable, plus allowed subsets and prefixes of the rest, with the last write torn at sector
/// granularity. Recovery runs on each state, and every file must read in full as a committed
/// state no older than its last fsync, with a mode and owner it was given no older than that sync,
/// under exactly one of its names once its entry was durable (all through a rename, under the
/// old name or the new one until the rename is durable). A lookup that fails other than "not
/// found" is a failure, never a missing file. Prints the number of states (README cites it).
@Suite(.serialized) struct CrashStateTests {
    static let key = try! MasterKey(raw: (1...64).map { UInt8($0) })

    /// Mode (permission bits), uid, gid and inode flags: what a chmod, chown or SETFLAGS changes.
    struct Owner: Equatable, CustomStringConvertible {
        var mode: UInt32, uid: UInt32, gid: UInt32, flags: UInt32 = 0
        var description: String { "mode \(String(mode, radix: 8)) uid \(uid) gid \(gid) flags \(String(flags, radix: 16))" }
    }

    /// One logical file of the workload and what the log says about it.
    final class Tracked {
        let label: String
        /// Where the file is named, in order: the path, the log index its creation or rename
        /// started at, and the log index after which that entry is durable (nil: not yet).
        var paths: [(path: [String], from: Int, durableAt: Int?)] = []
        /// Contents after each commit: the log range of the commit and whether it ended durable.
        var commits: [(start: Int, end: Int, value: [UInt8], durable: Bool)] = []
        var content: [UInt8] = []
        /// What it held when recording started (empty for files created while recording).
        var initial: [UInt8] = []
        /// Mode and owner after each metadata change, and at each durable commit, as `commits`.
        var owners: [(start: Int, end: Int, value: Owner, durable: Bool)] = []
        var owner = Owner(mode: 0o644, uid: 0, gid: 0)
        var initialOwner = Owner(mode: 0o644, uid: 0, gid: 0)
        var unlinkedAt: Int?
        var unlinkDurableAt: Int?
        /// The header's object ID: what a name holds when an exchange put another file there.
        var objectID: [UInt8] = []
        /// Its xattrs after each setxattr or removexattr (each durable when it returns), checked
        /// only for files the workload gives xattrs.
        var xattrSets: [(start: Int, end: Int, value: [String: [UInt8]], durable: Bool)] = []
        var xattrs: [String: [UInt8]] = [:]
        var initialXattrs: [String: [UInt8]] = [:]
        var checksXattrs = false
        init(_ label: String) { self.label = label }

        /// The names the file may be found under after the first `point` operations, and
        /// whether it must be found under exactly one of them (its entry durable, no unlink
        /// begun). The name before a rename stays allowed until the rename is durable; the
        /// file must exist all through a rename once its first entry was durable.
        func names(at point: Int) -> (names: [[String]], mustExist: Bool) {
            let started = paths.filter { $0.from < point || $0.from == paths[0].from }
            var names = [started.last!.path]
            if started.count > 1, (started.last!.durableAt ?? Int.max) > point { names.append(started[started.count - 2].path) }
            let entryDurable = (paths[0].durableAt ?? Int.max) <= point
            return (names, entryDurable && (unlinkedAt.map { $0 >= point } ?? true))
        }

        /// Of a sequence of states each made by a step in a log range: those a crash after
        /// `point` may leave, from the last one whose sync returned on, or `initial` before any.
        static func allowed<T>(_ states: [(start: Int, end: Int, value: T, durable: Bool)], initial: T, at point: Int) -> [T] {
            let lastDurable = states.lastIndex { $0.durable && $0.end <= point }
            return states[(lastDurable ?? 0)...].filter { $0.start < point }.map(\.value) + (lastDurable == nil ? [initial] : [])
        }
    }

    struct Harness {
        let volume: Volume
        let log = OperationLog.shared
        var tracked: [String: Tracked] = [:]
        var handles: [String: UInt64] = [:]
        var nodes: [String: UInt64] = [:]
        let caller = Caller(uid: 0, gid: 0)

        func node(_ path: [String]) throws -> UInt64 {
            try path.reduce(Volume.rootID) { try volume.lookup(parent: $0, name: Array($1.utf8)).0 }
        }

        mutating func create(_ label: String, in dir: UInt64 = Volume.rootID, name: String, path: [String]) throws {
            let t = Tracked(label)
            t.paths = [(path, log.count, nil)]
            let (id, _, handle) = try volume.create(parent: dir, name: Array(name.utf8), mode: 0o644, caller: caller)
            t.objectID = try volume.node(id).state.withLock { $0.header.objectID }
            tracked[label] = t
            handles[label] = handle
            nodes[label] = id
        }

        mutating func write(_ label: String, at offset: Int, _ bytes: [UInt8]) throws {
            let t = tracked[label]!
            try bytes.withUnsafeBytes { try volume.write(handle: handles[label]!, offset: UInt64(offset), data: $0) }
            if t.content.count < offset + bytes.count { t.content += [UInt8](repeating: 0, count: offset + bytes.count - t.content.count) }
            t.content.replaceSubrange(offset..<(offset + bytes.count), with: bytes)
        }

        /// A write to a file with FS_SYNC_FL: committed and durable before it returns.
        mutating func synchronousWrite(_ label: String, at offset: Int, _ bytes: [UInt8]) throws {
            let start = log.count
            try write(label, at: offset, bytes)
            let t = tracked[label]!
            t.commits.append((start, log.count, t.content, true))
        }

        mutating func truncate(_ label: String, to size: Int) throws {
            let t = tracked[label]!
            let start = log.count
            var changes = AttributeChanges()
            changes.size = UInt64(size)
            _ = try volume.setattr(nodes[label]!, changes)
            if t.content.count > size { t.content.removeLast(t.content.count - size) } else { t.content += [UInt8](repeating: 0, count: size - t.content.count) }
            t.commits.append((start, log.count, t.content, false))
        }

        func setMode(_ label: String, _ mode: UInt32) throws {
            var changes = AttributeChanges()
            changes.mode = mode
            try setOwnership(label, changes) { $0.mode = mode }
        }

        func setOwner(_ label: String, uid: UInt32, gid: UInt32) throws {
            var changes = AttributeChanges()
            changes.uid = uid
            changes.gid = gid
            try setOwnership(label, changes) { $0.uid = uid; $0.gid = gid }
        }

        func setFlags(_ label: String, _ flags: UInt32) throws {
            let t = tracked[label]!
            let start = log.count
            try volume.setInodeFlags(nodes[label]!, flags, caller: FlagsCaller(uid: 0, mayChangeImmutable: true, ownsEverything: true))
            t.owner.flags = flags
            t.owners.append((start, log.count, t.owner, false))
        }

        private func setOwnership(_ label: String, _ changes: AttributeChanges, _ change: (inout Owner) -> Void) throws {
            let t = tracked[label]!
            let start = log.count
            _ = try volume.setattr(nodes[label]!, changes)
            change(&t.owner)
            t.owners.append((start, log.count, t.owner, false))
        }

        /// Marks the latest entry of `label` durable from here on (after a sync of its directory).
        func entryDurable(_ label: String) { tracked[label]!.paths[tracked[label]!.paths.count - 1].durableAt = log.count }

        mutating func rename(_ label: String, from dir: UInt64, _ name: String, to newDir: UInt64, _ newName: String, path: [String]) throws {
            let start = log.count
            try volume.rename(parent: dir, name: Array(name.utf8), newParent: newDir, newName: Array(newName.utf8), mode: .replace)
            tracked[label]!.paths.append((path, start, nil))
        }

        mutating func flush(_ label: String, durable: Bool) throws {
            let t = tracked[label]!
            let start = log.count
            if durable { try volume.fsync(handle: handles[label]!, dataOnly: true) } else { try volume.flush(handle: handles[label]!) }
            t.commits.append((start, log.count, t.content, durable))
            if durable { t.owners.append((start, log.count, t.owner, true)) }
        }

        /// Swaps two files' names (RENAME_EXCHANGE); each may be found under either until the
        /// directory is synced.
        mutating func exchange(_ first: String, _ second: String, in dir: UInt64, _ firstName: String, _ secondName: String) throws {
            let start = log.count
            let (firstPath, secondPath) = (tracked[first]!.paths.last!.path, tracked[second]!.paths.last!.path)
            try volume.rename(parent: dir, name: Array(firstName.utf8), newParent: dir, newName: Array(secondName.utf8), mode: .exchange)
            tracked[first]!.paths.append((secondPath, start, nil))
            tracked[second]!.paths.append((firstPath, start, nil))
        }

        mutating func renameNoReplace(_ label: String, in dir: UInt64, _ name: String, _ newName: String, path: [String]) throws {
            let start = log.count
            try volume.rename(parent: dir, name: Array(name.utf8), newParent: dir, newName: Array(newName.utf8), mode: .noReplace)
            tracked[label]!.paths.append((path, start, nil))
        }

        func syncDirectory(_ dir: UInt64 = Volume.rootID) throws { try volume.fsyncDirectory(dir) }

        func setxattr(_ label: String, _ name: String, _ value: [UInt8]?) throws {
            let t = tracked[label]!
            let start = log.count
            if let value {
                try volume.setxattr(nodes[label]!, name: Array(name.utf8), value: value, mode: .any)
            } else {
                try volume.removexattr(nodes[label]!, name: Array(name.utf8))
            }
            t.xattrs[name] = value
            t.checksXattrs = true
            t.xattrSets.append((start, log.count, t.xattrs, true))
        }

        /// A fallocate range operation, committed as it returns (not necessarily durable).
        mutating func fallocate(_ label: String, _ operation: RangeOperation, at offset: Int, length: Int) throws {
            let t = tracked[label]!
            let start = log.count
            try volume.fallocate(handle: handles[label]!, operation, offset: UInt64(offset), length: UInt64(length))
            func zero(_ end: Int) {
                let to = min(end, t.content.count)
                if offset < to { t.content.replaceSubrange(offset..<to, with: [UInt8](repeating: 0, count: to - offset)) }
            }
            switch operation {
            case .punchHole: zero(offset + length)
            case .zeroRange(let keepSize):
                if !keepSize && offset + length > t.content.count { t.content += [UInt8](repeating: 0, count: offset + length - t.content.count) }
                zero(offset + length)
            case .collapse: t.content.removeSubrange(offset..<(offset + length))
            case .insert: t.content.insert(contentsOf: [UInt8](repeating: 0, count: length), at: offset)
            case .allocate(let keepSize):
                if !keepSize && offset + length > t.content.count { t.content += [UInt8](repeating: 0, count: offset + length - t.content.count) }
            }
            t.commits.append((start, log.count, t.content, false))
        }
    }

    /// A new store with `key` (and `alsoKey`) loaded, in a scratch directory removed with it:
    /// on tmpfs when the machine has one, since thousands of states are written out and read back.
    final class ScratchStore {
        let base: String
        var store: String { base + "/store" }
        let keys = KeyTable()

        init(_ label: String, alsoKey: MasterKey? = nil) throws {
            let scratch = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : FileManager.default.temporaryDirectory.path
            base = scratch + "/encfsd-\(label)-\(UUID().uuidString)"
            try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
            try StoreCreation.create(at: base + "/store", key: CrashStateTests.key, extentSize: 4096, owner: Caller(uid: 0, gid: 0))
            for key in [CrashStateTests.key] + (alsoKey.map { [$0] } ?? []) { try keys.add(key, claim: .init(uid: 0, serial: 0)) }
        }

        deinit { try? FileManager.default.removeItem(atPath: base) }
    }

    /// What a backing without O_TMPFILE, linkat of an open file, RENAME_NOREPLACE and
    /// RENAME_EXCHANGE (bindfs, sshfs, GlusterFS) leaves: every fallback sequence runs.
    static let fallbacks = BackingCapabilities(present: [.fdatasync, .userXattrs, .lock, .stableInodes],
                                               filesystemType: "fuse", lockScope: .unknown)

    @Test(arguments: [BackingCapabilities.local, fallbacks])
    func everyCrashStateRecoversToACommittedState(_ capabilities: BackingCapabilities) throws {
        let scratch = try ScratchStore("crash")
        defer { withExtendedLifetime(scratch) {} }
        let (base, store) = (scratch.base, scratch.store)
        var h = Harness(volume: try Volume(storePath: store, keys: scratch.keys, capabilities: capabilities))
        var rng = SystemRandomNumberGenerator()
        func random(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) } }

        // Before recording: a small file, a multi-extent file and a directory, all durable.
        try h.create("A", name: "a", path: ["a"])
        try h.write("A", at: 0, random(100))
        try h.flush("A", durable: true)
        try h.create("B", name: "b", path: ["b"])
        try h.write("B", at: 0, random(3 * 4096 + 700))
        try h.flush("B", durable: true)
        let (dirID, _) = try h.volume.mkdir(parent: Volume.rootID, name: Array("d".utf8), mode: 0o755, caller: h.caller)
        try h.syncDirectory()
        for t in h.tracked.values { t.paths[0].durableAt = 0; t.initial = t.content; t.initialOwner = t.owner; t.commits = []; t.owners = [] }
        let initial = try BackingModel.snapshot(of: store)

        OperationLog.shared.start()
        try h.write("A", at: 20, random(10)); try h.flush("A", durable: false)          // small overwrite: journaled
        try h.flush("A", durable: true)                                                 // fsync after flush
        try h.write("B", at: 3 * 4096 + 700, random(5000)); try h.flush("B", durable: false) // append, reseals the partial extent
        try h.write("B", at: 3000, random(6000)); try h.flush("B", durable: true)        // multi-extent overwrite, fsync
        try h.truncate("A", to: 30000)                                                  // grow past many extents
        try h.truncate("B", to: 5000); try h.flush("B", durable: true)                  // shrink into an extent
        try h.create("C", name: "c", path: ["c"])                                       // a new small file
        try h.write("C", at: 0, random(50)); try h.flush("C", durable: true)
        // Metadata-only header updates with no sync between them (chmod, chmod, chown: what tar
        // does per file): the first may use the other slot of a durable header, the later ones
        // replace the unsynced newest slot in place. None may cost C its fsynced contents.
        try h.setMode("C", 0o600); try h.setMode("C", 0o640); try h.setOwner("C", uid: 1, gid: 1)
        try h.setFlags("C", 0x40 | 0x80)                                               // SETFLAGS (nodump, noatime): one more metadata slot
        try h.write("C", at: 10, random(5)); try h.flush("C", durable: false)          // journaled, after unsynced metadata
        try h.setMode("C", 0o644); try h.flush("C", durable: true)
        try h.setFlags("C", 0x8); try h.synchronousWrite("C", at: 20, random(7))      // FS_SYNC_FL: the write is durable at once
        try h.setFlags("C", 0)                                                          // and the later writes buffered again
        try h.write("C", at: 4096, random(3 * 4096)); try h.flush("C", durable: false) // whole extents past the end: written before the header
        try h.truncate("C", to: 6000); try h.flush("C", durable: true)                 // then cut back into one of them
        try h.syncDirectory()
        h.entryDurable("C")
        try h.rename("A", from: Volume.rootID, "a", to: dirID, "a2", path: ["d", "a2"])
        h.volume.dropStaleBindings()                                                    // the timer's step: syncfs, then the old binding goes
        try h.syncDirectory(); try h.syncDirectory(dirID)
        h.entryDurable("A")
        try h.write("A", at: 29999, [0x5a]); try h.flush("A", durable: true)            // overwrite after the rename
        try h.write("A", at: 0, random(8 * 4096)); try h.flush("A", durable: true)      // data to punch and shift
        try h.fallocate("A", .punchHole, at: 4096 + 100, length: 3 * 4096)              // partial edges resealed, two extents dropped
        try h.fallocate("A", .collapse, at: 4096, length: 2 * 4096)                     // tail moved down: journaled, resealed
        try h.flush("A", durable: true)
        try h.fallocate("A", .insert, at: 2 * 4096, length: 4096)                       // tail moved up, a hole left
        try h.fallocate("A", .zeroRange(keepSize: false), at: 5 * 4096 + 10, length: 30000) // zeroes and grows
        try h.flush("A", durable: true)
        try h.create("S", name: "sparse", path: ["sparse"])                             // holes, then a hole filled
        try h.write("S", at: 20000, random(100)); try h.flush("S", durable: true)
        try h.syncDirectory()
        h.entryDurable("S")
        try h.write("S", at: 4096, random(4096)); try h.flush("S", durable: false)
        try h.write("A", at: 2000, random(9000)); try h.flush("A", durable: false)     // three extents, journaled
        try h.exchange("C", "S", in: Volume.rootID, "c", "sparse")                      // natively one renameat2, else three renames
        try h.syncDirectory()
        h.entryDurable("C"); h.entryDurable("S")
        try h.renameNoReplace("C", in: Volume.rootID, "sparse", "c2", path: ["c2"])      // natively one renameat2, else checked then renamed
        try h.syncDirectory()
        h.entryDurable("C")
        try h.volume.release(handle: h.handles["B"]!)
        h.tracked["B"]!.unlinkedAt = OperationLog.shared.count
        try h.volume.unlink(parent: Volume.rootID, name: Array("b".utf8))
        try h.syncDirectory()
        h.tracked["B"]!.unlinkDurableAt = OperationLog.shared.count
        let operations = OperationLog.shared.stop()
        for label in ["A", "C", "S"] { try h.volume.release(handle: h.handles[label]!) }

        let checked = try check(operations: operations, initial: initial, tracked: Array(h.tracked.values), base: base)
        // README cites this line.
        print("crash states checked: \(checked.states) distinct states at \(checked.points) crash points (\(operations.count) backing operations, \(capabilities == .local ? "native" : "fallback") backing paths)")
        #expect(checked.states >= 1000)
    }

    /// A rekey of the root (header conversions, journaled batches of extents, names moved, the
    /// record in encfsd.conf written and dropped): at every crash point every file reads in full
    /// under one of its names with both keys present.
    @Test func everyCrashStateOfARekeyKeepsEveryFile() throws {
        let newKey = try MasterKey(raw: [UInt8](repeating: 0x42, count: 64))
        let scratch = try ScratchStore("crash-rekey", alsoKey: newKey)
        defer { withExtendedLifetime(scratch) {} }
        let (base, store) = (scratch.base, scratch.store)
        var h = Harness(volume: try Volume(storePath: store, keys: scratch.keys))
        var rng = SystemRandomNumberGenerator()
        func random(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) } }
        try h.create("A", name: "a", path: ["a"])
        try h.write("A", at: 0, random(100))
        try h.flush("A", durable: true)
        try h.create("B", name: "b", path: ["b"])
        try h.write("B", at: 0, random(3 * 4096 + 700))
        try h.flush("B", durable: true)
        let (dirID, _) = try h.volume.mkdir(parent: Volume.rootID, name: Array("d".utf8), mode: 0o755, caller: h.caller)
        try h.create("C", in: dirID, name: "c", path: ["d", "c"])
        try h.write("C", at: 0, random(2 * 4096))
        try h.flush("C", durable: true)
        // A side object for the rekey to reseal: a sealed 64 KiB value fits no backing xattr.
        try h.setxattr("C", "user.big", random(65536))
        try h.syncDirectory(); try h.syncDirectory(dirID)
        for label in ["A", "B", "C"] { try h.volume.release(handle: h.handles[label]!) }
        for t in h.tracked.values {
            t.paths[0].durableAt = 0; t.initial = t.content; t.initialOwner = t.owner; t.commits = []; t.owners = []
            t.initialXattrs = t.xattrs; t.xattrSets = []
        }
        let initial = try BackingModel.snapshot(of: store)

        OperationLog.shared.start()
        try h.volume.startRekey(Volume.rootID, to: newKey.identifier, caller: h.caller)
        h.volume.rekeyUntilDone()
        let operations = OperationLog.shared.stop()
        #expect(h.volume.rekeys.active.isEmpty)
        // The side object moved with the rekey: sealed under the new key now, one file left.
        let c = try h.node(["d", "c"])
        let (objectID, generation) = try h.volume.node(c).state.withLock { ($0.header.objectID, $0.header.xattrGeneration) }
        let sideFiles = try FileManager.default.contentsOfDirectory(atPath: store + "/.xattrs")
        #expect(sideFiles == [String(decoding: XattrSideObject.fileName(objectID: objectID, generation: generation), as: UTF8.self)])
        let image = try Array(Data(contentsOf: URL(fileURLWithPath: store + "/.xattrs/" + sideFiles[0])))
        #expect(try XattrSideObject.open(image, objectID: objectID, generation: generation, key: newKey).count == 1)

        let checked = try check(operations: operations, initial: initial, tracked: Array(h.tracked.values), base: base,
                                keys: [Self.key, newKey])
        print("rekey crash states checked: \(checked.states) distinct states at \(checked.points) crash points (\(operations.count) backing operations)")
        #expect(checked.states >= 100)
    }

    /// A backing without user xattrs (sshfs), natively and with every other fallback: each
    /// setxattr and removexattr commits a new side object generation (written, synced, named by
    /// a synced header, the old one unlinked). At every crash point the file's xattrs read as
    /// the set before or after one change, never EIO; and a file unlinked with its side object
    /// stays gone.
    @Test(arguments: [BackingCapabilities(present: BackingCapabilities.local.present.subtracting([.userXattrs]), filesystemType: "ext4", lockScope: .thisMachine),
                      BackingCapabilities(present: [.fdatasync, .lock, .stableInodes], filesystemType: "fuse.sshfs", lockScope: .thisHostOnly)])
    func everyCrashStateOfASideObjectHoldsTheOldOrTheNewSet(_ capabilities: BackingCapabilities) throws {
        let scratch = try ScratchStore("crash-xattrs")
        defer { withExtendedLifetime(scratch) {} }
        let (base, store) = (scratch.base, scratch.store)
        var h = Harness(volume: try Volume(storePath: store, keys: scratch.keys, capabilities: capabilities))
        try h.create("X", name: "x", path: ["x"])
        try h.write("X", at: 0, randomBytes(3000, seed: 1))
        try h.flush("X", durable: true)
        try h.create("Z", name: "z", path: ["z"])
        try h.setxattr("Z", "user.doomed", [9])
        try h.syncDirectory()
        for t in h.tracked.values { t.paths[0].durableAt = 0; t.initial = t.content; t.initialOwner = t.owner; t.commits = []; t.owners = [] }
        let zSet = h.tracked["Z"]!.xattrs
        h.tracked["Z"]!.xattrSets = []
        h.tracked["Z"]!.checksXattrs = false
        let initial = try BackingModel.snapshot(of: store)

        OperationLog.shared.start()
        try h.setxattr("X", "user.first", randomBytes(200, seed: 2))     // generation 1, the first .xattrs entry
        try h.setxattr("X", "user.second", randomBytes(5000, seed: 3))   // 2: the old one unlinked after the header
        try h.setxattr("X", "user.first", randomBytes(300, seed: 4))     // 3: replaced
        try h.setxattr("X", "security.label", Array("label\0".utf8))    // 4
        try h.setxattr("X", "user.second", nil)                          // 5: removed
        try h.write("X", at: 100, randomBytes(50, seed: 5)); try h.flush("X", durable: true) // contents keep the generation
        try h.volume.release(handle: h.handles["Z"]!)
        h.tracked["Z"]!.unlinkedAt = OperationLog.shared.count
        try h.volume.unlink(parent: Volume.rootID, name: Array("z".utf8))  // its side object goes once the unlink is durable
        try h.syncDirectory()
        h.tracked["Z"]!.unlinkDurableAt = OperationLog.shared.count
        let operations = OperationLog.shared.stop()
        try h.volume.release(handle: h.handles["X"]!)
        #expect(zSet == ["user.doomed": [9]])

        let checked = try check(operations: operations, initial: initial, tracked: Array(h.tracked.values), base: base)
        print("xattr side object crash states checked: \(checked.states) distinct states at \(checked.points) crash points (\(operations.count) backing operations, \(capabilities.has(.unnamedFiles) ? "native" : "fallback") backing paths)")
        #expect(checked.states >= 100)
    }

    /// Which earlier operations a sync has made durable by log index `point`.
    func durable(_ operations: [BackingOperation], before point: Int) -> [Bool] {
        var synced: [UInt64: Int] = [:] // inode -> index of its last sync before `point`
        var syncedAll = -1 // index of the last syncfs before `point`
        for i in 0..<point {
            if case .sync(let inode) = operations[i] { synced[inode] = i }
            if case .syncAll = operations[i] { syncedAll = i }
        }
        return (0..<point).map { i in
            func syncedAfter(_ inode: UInt64) -> Bool { (synced[inode] ?? -1) > i || syncedAll > i }
            switch operations[i] {
            case .write(let inode, _, _), .truncate(let inode, _), .newInode(let inode): return syncedAfter(inode)
            case .sync, .syncAll: return true
            case .create(let dir, _, _), .mkdir(let dir, _, _), .link(let dir, _, _), .unlink(let dir, _): return syncedAfter(dir)
            case .rename(_, _, let to, _, _): return syncedAfter(to)
            }
        }
    }

    func check(operations: [BackingOperation], initial: BackingModel, tracked: [Tracked], base: String,
               keys: [MasterKey] = [CrashStateTests.key]) throws -> (states: Int, points: Int) {
        var seen = Set<BackingModel>()
        var points = 0
        for point in 0...operations.count {
            points += 1
            let isDurable = durable(operations, before: point)
            let volatile = (0..<point).filter { !isDurable[$0] }
            // The subsets of volatile operations to try: none, all, all but one, each one alone,
            // every prefix; and with the last applied write torn at a few sector boundaries.
            var subsets: [Set<Int>] = [[], Set(volatile)]
            for v in volatile {
                subsets.append(Set(volatile).subtracting([v]))
                subsets.append([v])
            }
            for n in 1..<max(1, volatile.count) { subsets.append(Set(volatile.prefix(n))) }
            for (a, b) in zip(volatile, volatile.dropFirst()) { subsets.append([a, b]) }
            for subset in subsets {
                let applied = (0..<point).filter { isDurable[$0] || subset.contains($0) }
                var tears: [Int?] = [nil]
                if let last = applied.last, case .write(_, _, let bytes) = operations[last], bytes.count > 512 {
                    // Torn at sector boundaries: up to eight, spread over the write.
                    let sectors = (bytes.count - 1) / 512
                    let step = max(1, sectors / 8)
                    tears += Swift.stride(from: 1, through: sectors, by: step).map { $0 * 512 }
                }
                for tear in tears {
                    var model = initial
                    for i in applied { model.apply(operations[i], tornAt: i == applied.last ? tear : nil) }
                    guard seen.insert(model).inserted else { continue }
                    try verify(model, at: point, tracked: tracked, base: base, keys: keys,
                               label: "point \(point), \(applied.count) ops, tear \(tear.map(String.init) ?? "none")")
                }
            }
        }
        return (seen.count, points)
    }

    /// Checks one crash state.
    func verify(_ model: BackingModel, at point: Int, tracked: [Tracked], base: String, keys given: [MasterKey], label: String) throws {
        let dir = base + "/state"
        try? FileManager.default.removeItem(atPath: dir)
        try model.materialize(at: dir)
        let keys = KeyTable()
        for key in given { try keys.add(key, claim: .init(uid: 0, serial: 0)) }
        let volume = try Volume(storePath: dir, keys: keys)
        for t in tracked {
            let (names, mustExist) = t.names(at: point)
            var found: [[String]] = []
            for path in names {
                let id: UInt64
                do {
                    id = try path.reduce(Volume.rootID) { try volume.lookup(parent: $0, name: Array($1.utf8)).0 }
                } catch StoreError.notFound {
                    continue
                } catch {
                    // A damaged header or name is no "not found": the file is there and unreadable.
                    Issue.record("\(t.label) at \(path): lookup failed with \(error) (\(label))")
                    continue
                }
                // The other file of an exchange, before or after it: not this one.
                if try volume.node(id).state.withLock({ $0.header.objectID }) != t.objectID { continue }
                found.append(path)
                let attributes = try volume.getattr(id)
                let owner = Owner(mode: attributes.mode & 0o7777, uid: attributes.uid, gid: attributes.gid,
                                  flags: try volume.inodeFlags(of: id).rawValue)
                let allowedOwners = Tracked.allowed(t.owners, initial: t.initialOwner, at: point)
                #expect(allowedOwners.contains(owner), "\(t.label) at \(path) has \(owner), allowed \(allowedOwners) (\(label))")
                let handle = try volume.open(id, truncate: false)
                let data = try volume.read(handle: handle, offset: 0, count: 1 << 20)
                try volume.release(handle: handle)
                // Allowed: any commit that had started, from the last one whose fsync returned on;
                // and what it held when recording began, until a durable commit.
                let allowed = Tracked.allowed(t.commits, initial: t.initial, at: point)
                #expect(allowed.contains(data), "\(t.label) at \(path) holds \(data.count) bytes, allowed \(allowed.map(\.count)) (\(label))")
                if t.checksXattrs {
                    // Never EIO, never a mix: exactly the set before or after one change.
                    var xattrs: [String: [UInt8]] = [:]
                    for name in try volume.listxattr(id, includeTrusted: true) {
                        let value = try volume.getxattr(id, name: name)
                        #expect(value != nil, "\(t.label) at \(path) lists an attribute it does not hold")
                        xattrs[String(decoding: name, as: UTF8.self)] = value
                    }
                    let allowedSets = Tracked.allowed(t.xattrSets, initial: t.initialXattrs, at: point)
                    #expect(allowedSets.contains(xattrs), "\(t.label) at \(path) has xattrs \(xattrs.keys.sorted()), allowed \(allowedSets.map { $0.keys.sorted() }) (\(label))")
                }
            }
            if let gone = t.unlinkDurableAt, gone <= point {
                #expect(found.isEmpty, "\(t.label) came back after a durable unlink (\(label))")
            } else if mustExist {
                #expect(found.count == 1, "\(t.label) found under \(found) of \(names), exactly one wanted (\(label))")
            } else {
                #expect(found.count <= 1, "\(t.label) under two names (\(label))")
            }
        }
    }
}
