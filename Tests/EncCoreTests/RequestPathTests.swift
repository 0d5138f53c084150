import Foundation
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat

/// One pass per request: the work a lookup, an open, a write and a create do, counted (header regions read
/// from the backing store, key table lookups) on a volume whose caches are cold.
@Suite struct RequestPathTests {
    static let key = try! MasterKey(raw: (1...64).map { UInt8($0) })
    let caller = Caller(uid: 0, gid: 0)
    let base = FileManager.default.temporaryDirectory.path + "/encfsd-request-path-\(UUID().uuidString)"

    func volume(_ store: String) throws -> Volume {
        let keys = KeyTable()
        _ = try keys.add(Self.key, claim: .init(uid: 0, serial: 0))
        return try Volume(storePath: store, keys: keys)
    }

    /// Counts what `body` costs on `volume`.
    func cost(_ volume: Volume, _ body: () throws -> Void) rethrows -> (headerReads: Int, keyLookups: Int) {
        let reads = volume.slots.regionReads.value.load(ordering: .relaxed)
        let lookups = volume.keys.lookups.load(ordering: .relaxed)
        try body()
        return (volume.slots.regionReads.value.load(ordering: .relaxed) - reads, volume.keys.lookups.load(ordering: .relaxed) - lookups)
    }

    @Test func lookupReadsTheHeaderOnceAndTheKeyTableOnce() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        let store = base + "/store"
        try StoreCreation.create(at: store, key: Self.key, extentSize: 4096, owner: caller)
        do {
            let made = try volume(store)
            let (dir, _) = try made.mkdir(parent: Volume.rootID, name: Array("d".utf8), mode: 0o755, caller: caller)
            let (_, _, handle) = try made.create(parent: dir, name: Array("f".utf8), mode: 0o644, caller: caller)
            try Array("contents".utf8).withUnsafeBytes { try made.write(handle: handle, offset: 0, data: $0) }
            try made.release(handle: handle)
            made.closeCleanly()
        }
        let cold = try volume(store)
        var dir: UInt64 = 0, file: UInt64 = 0
        // The directory's name key once; the child's header read once and verified with it.
        let lookupDir = try cost(cold) { dir = try cold.lookup(parent: Volume.rootID, name: Array("d".utf8)).0 }
        #expect(lookupDir == (1, 1))
        let lookupFile = try cost(cold) { file = try cold.lookup(parent: dir, name: Array("f".utf8)).0 }
        #expect(lookupFile == (1, 1))
        var handle: UInt64 = 0
        let open = try cost(cold) { handle = try cold.open(file, truncate: false) }
        #expect(open == (0, 1))
        // A write of an open file uses the open file's key: no lookup, no header read.
        let write = try cost(cold) {
            try Array("more".utf8).withUnsafeBytes { _ = try cold.write(handle: handle, offset: 8, data: $0) }
        }
        #expect(write == (0, 0))
        try cold.release(handle: handle)
        // A create in a directory already looked up reads no header; it asks the key table twice:
        // the directory's name key (which also seals the new header and opens the new file), and
        // the directory's key again for its default ACL (`inheritedPermissions`).
        var created: UInt64 = 0
        let create = try cost(cold) { created = try cold.create(parent: dir, name: Array("g".utf8), mode: 0o644, caller: caller).2 }
        #expect(create == (0, 2))
        try cold.release(handle: created)
    }

    /// A store with directory "d" holding file "f"; the backing path of f.
    func storeWithFile() throws -> (store: String, backingFile: String) {
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        let store = base + "/store"
        try StoreCreation.create(at: store, key: Self.key, extentSize: 4096, owner: caller)
        let made = try volume(store)
        let (dir, _) = try made.mkdir(parent: Volume.rootID, name: Array("d".utf8), mode: 0o755, caller: caller)
        let (_, _, handle) = try made.create(parent: dir, name: Array("f".utf8), mode: 0o644, caller: caller)
        try Array("contents".utf8).withUnsafeBytes { try made.write(handle: handle, offset: 0, data: $0) }
        try made.release(handle: handle)
        made.closeCleanly()
        let fm = FileManager.default
        let backingDir = try #require(try fm.contentsOfDirectory(atPath: store).first { name in
            var isDir: ObjCBool = false
            return !name.hasPrefix(".") && fm.fileExists(atPath: store + "/" + name, isDirectory: &isDir) && isDir.boolValue
        })
        let file = try #require(try fm.contentsOfDirectory(atPath: store + "/" + backingDir).first { !$0.hasPrefix(".") })
        return (store, store + "/" + backingDir + "/" + file)
    }

    /// Waits out `ForgottenHeaders.racyInterval`: a file changed more recently is not kept.
    func settle() { usleep(UInt32(ForgottenHeaders.racyInterval / 1000) + 20_000) }

    /// Looks "d/f" up, then forgets it as the kernel does when it evicts the inode.
    func lookUpAndForget(_ volume: Volume) throws -> (dir: UInt64, attributes: Attributes) {
        let dir = try volume.lookup(parent: Volume.rootID, name: Array("d".utf8)).0
        let (file, attributes) = try volume.lookup(parent: dir, name: Array("f".utf8))
        settle()
        volume.forget(file, count: 1)
        return (dir, attributes)
    }

    @Test func aForgottenFileIsLookedUpAgainWithoutReadingItsHeader() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let (store, _) = try storeWithFile()
        let volume = try volume(store)
        let (dir, first) = try lookUpAndForget(volume)
        var again: Attributes?
        #expect(try cost(volume) { again = try volume.lookup(parent: dir, name: Array("f".utf8)).1 }.headerReads == 0)
        #expect(again?.mode == first.mode && again?.size == first.size)
        // What the daemon changed before the drop is what comes back.
        var changes = AttributeChanges()
        changes.mode = 0o600
        let file = try volume.lookup(parent: dir, name: Array("f".utf8)).0
        _ = try volume.setattr(file, changes)
        settle()
        volume.forget(file, count: 2)
        #expect(try cost(volume) { again = try volume.lookup(parent: dir, name: Array("f".utf8)).1 }.headerReads == 0)
        #expect(again.map { $0.mode & 0o7777 } == 0o600)
    }

    @Test func aForgottenHeaderIsReadAgainOnceTheBackingFileChanged() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let (store, backing) = try storeWithFile()
        let volume = try volume(store)
        let dir = try lookUpAndForget(volume).dir
        // Its times set from the backing side: the ctime moves.
        #expect(utimes(backing, nil) == 0)
        #expect(try cost(volume) { _ = try volume.lookup(parent: dir, name: Array("f".utf8)) }.headerReads == 1)
    }

    @Test func aForgottenHeaderIsReadAgainForAReplacedBackingFile() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let (store, backing) = try storeWithFile()
        let volume = try volume(store)
        let dir = try lookUpAndForget(volume).dir
        // The same bytes, as another inode renamed over the entry.
        try FileManager.default.copyItem(atPath: backing, toPath: backing + ".copy")
        #expect(rename(backing + ".copy", backing) == 0)
        #expect(try cost(volume) { _ = try volume.lookup(parent: dir, name: Array("f".utf8)) }.headerReads == 1)
    }

    @Test func aForgottenHeaderIsReadAgainAfterAKeyChange() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let (store, _) = try storeWithFile()
        let volume = try volume(store)
        let dir = try lookUpAndForget(volume).dir
        _ = try volume.keys.add(try MasterKey(raw: [UInt8](repeating: 7, count: 64)), claim: .init(uid: 0, serial: 1))
        #expect(try cost(volume) { _ = try volume.lookup(parent: dir, name: Array("f".utf8)) }.headerReads == 1)
    }

    @Test func aFileChangedJustBeforeItsDropIsNotKept() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let (store, _) = try storeWithFile()
        let volume = try volume(store)
        let dir = try volume.lookup(parent: Volume.rootID, name: Array("d".utf8)).0
        let file = try volume.lookup(parent: dir, name: Array("f".utf8)).0
        var changes = AttributeChanges()
        changes.mode = 0o600
        _ = try volume.setattr(file, changes)
        volume.forget(file, count: 1)
        #expect(try cost(volume) { _ = try volume.lookup(parent: dir, name: Array("f".utf8)) }.headerReads == 1)
    }

    /// A drop whose stat came late, after another node of the inode was made, changed and dropped,
    /// must not replace the newer entry with its older header.
    @Test func aDropOvertakenByANewerNodeKeepsNothing() {
        var forgotten = ForgottenHeaders(capacity: 4)
        func entry(mode: UInt32) -> ForgottenHeaders.Entry {
            let header = ObjectHeader(type: .regular, mode: mode, uid: 0, gid: 0, extentSize: 4096,
                                      objectID: [UInt8](repeating: 1, count: 16), policy: Self.key.identifier)
            return ForgottenHeaders.Entry(identity: [1], fingerprint: .init(stat()), header: header, verified: true,
                                          slotSafety: SlotSafety(), backingXattrs: nil, keyChanges: 0)
        }
        let late = forgotten.reserve(7)
        forgotten.remove(7)             // a node of inode 7 was made...
        let newer = forgotten.reserve(7) // ...and dropped
        forgotten.put(7, entry(mode: 0o600), reservation: newer)
        forgotten.put(7, entry(mode: 0o644), reservation: late)
        #expect(forgotten.take(7)?.header.mode == 0o600)
        // The oldest goes first once the capacity is reached.
        for inode in UInt64(10)..<15 { forgotten.put(inode, entry(mode: 0o644), reservation: forgotten.reserve(inode)) }
        #expect(forgotten.count == 4 && !forgotten.contains(10) && forgotten.contains(14))
    }
}
