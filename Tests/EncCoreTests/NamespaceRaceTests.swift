import Foundation
import Synchronization
import Testing
@testable import EncCore
@testable import EncKeys

/// Namespace operations racing what runs beside them on a mount: a key removed and added again
/// (`key remove`), and the stale-binding timer. fstests/621 found both.
@Suite struct NamespaceRaceTests {
    static let key = try! MasterKey(raw: (1...64).map { UInt8($0 &* 3) })
    let caller = Caller(uid: 0, gid: 0)
    let base = FileManager.default.temporaryDirectory.path + "/encfsd-create-race-\(UUID().uuidString)"

    /// A new store under `key`, its root unlocked.
    func freshVolume() throws -> (store: String, keys: KeyTable, volume: Volume) {
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        let store = base + "/store"
        try StoreCreation.create(at: store, key: Self.key, extentSize: 4096, owner: caller)
        let keys = KeyTable()
        _ = try keys.add(Self.key, claim: .init(uid: 0, serial: 0))
        return (store, keys, try Volume(storePath: store, keys: keys))
    }

    /// Creates and closes an empty file `name` in the root; its node.
    func makeFile(_ volume: Volume, _ name: String) throws -> UInt64 {
        let (file, _, handle) = try volume.create(parent: Volume.rootID, name: Array(name.utf8), mode: 0o644, caller: caller)
        try volume.release(handle: handle)
        return file
    }

    /// A create that fails leaves no name: open(O_CREAT|O_EXCL) reporting ENOKEY while its file
    /// stayed made every later create of the name fail with EEXIST.
    @Test func aCreateFailingForAKeyRemovedMeanwhileLeavesNoName() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let (store, keys, volume) = try freshVolume()
        let entries = { try FileManager.default.contentsOfDirectory(atPath: store).count }
        let empty = try entries()
        let name = Array("new".utf8)

        let stop = Atomic<Bool>(false)
        let toggler = Thread {
            while !stop.load(ordering: .relaxed) {
                _ = try? keys.remove(Self.key.identifier, uid: 0, allUsers: false)
                usleep(300)
                _ = try? keys.add(Self.key, claim: .init(uid: 0, serial: 0))
                usleep(300)
            }
        }
        toggler.start()
        defer { stop.store(true, ordering: .relaxed) }

        var created = 0, refused = 0
        let deadline = Date().addingTimeInterval(2)
        while Date() < deadline {
            do {
                let (_, _, handle) = try volume.create(parent: Volume.rootID, name: name, mode: 0o644, caller: caller)
                created += 1
                try volume.release(handle: handle)
                while (try? volume.unlink(parent: Volume.rootID, name: name)) == nil { usleep(100) }
            } catch {
                refused += 1
                #expect(try entries() == empty, "a create that failed (\(error)) left its entry")
                if try entries() != empty { break }
            }
        }
        stop.store(true, ordering: .relaxed)
        while !toggler.isFinished { usleep(1000) }
        #expect(created > 0 && refused > 0, "created \(created), refused \(refused)")
        _ = try? keys.add(Self.key, claim: .init(uid: 0, serial: 0))
        volume.closeCleanly()
    }

    /// A rename back onto a name the object was moved off finds the name's binding still in the
    /// header, queued as stale: the timer dropping it meanwhile left the object EIO by that name.
    @Test func aRenameBackToANameKeepsItsBindingFromTheTimer() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let (_, _, volume) = try freshVolume()
        let (src, new) = (Array("src".utf8), Array("new".utf8))
        _ = try makeFile(volume, "src")

        let stop = Atomic<Bool>(false)
        let timer = Thread {
            while !stop.load(ordering: .relaxed) { volume.dropStaleBindings() }
        }
        timer.start()
        defer { stop.store(true, ordering: .relaxed) }
        var failures: [String] = []
        for round in 0..<3000 where failures.isEmpty {
            let (from, to) = round % 2 == 0 ? (src, new) : (new, src)
            try volume.rename(parent: Volume.rootID, name: from, newParent: Volume.rootID, newName: to, mode: .noReplace)
            do { _ = try volume.lookup(parent: Volume.rootID, name: to) } catch {
                failures.append("round \(round): \(error)")
            }
        }
        stop.store(true, ordering: .relaxed)
        while !timer.isFinished { usleep(1000) }
        #expect(failures.isEmpty, "\(failures)")
        volume.closeCleanly()
    }

    /// The timer's drop of a stale binding is the store's own bookkeeping: the renamed file's
    /// ctime, atime and mtime are what the rename left, not the moment of the drop.
    @Test func droppingAStaleBindingLeavesTheTimesAlone() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let (_, _, volume) = try freshVolume()
        _ = try makeFile(volume, "a")
        try volume.rename(parent: Volume.rootID, name: Array("a".utf8), newParent: Volume.rootID, newName: Array("b".utf8), mode: .replace)
        let (file, before) = try volume.lookup(parent: Volume.rootID, name: Array("b".utf8))
        usleep(20_000)
        volume.dropStaleBindings()
        let after = try volume.getattr(file)
        #expect(after.changeTime == before.changeTime)
        #expect(after.accessTime == before.accessTime)
        #expect(after.modificationTime == before.modificationTime)
        // The header was rewritten (the old name's binding is gone), under the kept times.
        #expect(try volume.node(file).state.withLock { $0.header.bindings.count } == 1)
        volume.closeCleanly()
    }

    /// A node remembers at most 8 of its names: a name linked again and then pushed out of that
    /// list by newer links is still the object's, and its binding must stay.
    @Test func aStaleBindingOfANameLinkedAgainStaysPastTheLocationCache() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let (_, _, volume) = try freshVolume()
        let root = Volume.rootID
        let file = try makeFile(volume, "f")
        _ = try volume.link(file, newParent: root, newName: Array("a".utf8))
        try volume.unlink(parent: root, name: Array("a".utf8))
        _ = try volume.link(file, newParent: root, newName: Array("a".utf8))
        for k in 1...NodeState.maximumLocations {
            _ = try volume.link(file, newParent: root, newName: Array("b\(k)".utf8))
        }
        volume.dropStaleBindings()
        #expect(throws: Never.self) { _ = try volume.lookup(parent: root, name: Array("a".utf8)) }
        volume.closeCleanly()
    }

    /// A rename over one name of a file that keeps others takes that name's binding away: it is
    /// queued like an unlink's, so replaced names do not pile up in the header.
    @Test func aRenameOverAHardLinkQueuesItsBinding() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        let (_, _, volume) = try freshVolume()
        let root = Volume.rootID
        let file = try makeFile(volume, "f")
        _ = try volume.link(file, newParent: root, newName: Array("g".utf8))
        _ = try makeFile(volume, "x")
        try volume.rename(parent: root, name: Array("x".utf8), newParent: root, newName: Array("g".utf8), mode: .replace)
        volume.dropStaleBindings()
        #expect(try volume.node(file).state.withLock { $0.header.bindings.count } == 1)
        #expect(throws: Never.self) { _ = try volume.lookup(parent: root, name: Array("f".utf8)) }
        volume.closeCleanly()
    }
}
