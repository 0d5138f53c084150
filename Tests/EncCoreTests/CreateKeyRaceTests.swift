import Foundation
import Synchronization
import Testing
@testable import EncCore
@testable import EncKeys

/// A create that fails leaves no name: open(O_CREAT|O_EXCL) reporting ENOKEY while its file stays
/// would make every later create of the name fail with EEXIST (fstests/621's fresh name stalled
/// so). The key is removed and added again while creates run, as `key remove` does on a mount.
@Suite struct CreateKeyRaceTests {
    static let key = try! MasterKey(raw: (1...64).map { UInt8($0 &* 3) })
    let caller = Caller(uid: 0, gid: 0)
    let base = FileManager.default.temporaryDirectory.path + "/encfsd-create-race-\(UUID().uuidString)"

    @Test func aCreateFailingForAKeyRemovedMeanwhileLeavesNoName() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        let store = base + "/store"
        try StoreCreation.create(at: store, key: Self.key, extentSize: 4096, owner: caller)
        let keys = KeyTable()
        _ = try keys.add(Self.key, claim: .init(uid: 0, serial: 0))
        let volume = try Volume(storePath: store, keys: keys)
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
}
