import Testing
import Foundation
import Locking
@testable import EncCore
@testable import EncKeys

/// A rekey moves each name to the new key's form while the tree stays in use. An operation that
/// has resolved a name must act on it before the rekey can move it: a rename onto the old form
/// of a name the rekey had just moved made a second entry for the same name, which the rekey
/// then failed to move forever (EEXIST) while the renamed file stayed unreachable.
@Suite struct RekeyNameRaceTests {
    let caller = Caller(uid: 0, gid: 0)

    @Test func aRenameThatResolvedTheOldFormIsDoneBeforeTheRekeyMovesIt() throws {
        try RekeyTestKeys.withVolume("encfsd-rekey-race", owner: caller) { volume in
            let (dir, _) = try volume.mkdir(parent: Volume.rootID, name: Array("d".utf8), mode: 0o755, caller: caller)
            func make(_ parent: UInt64, _ name: String, _ bytes: String) throws {
                let (_, _, handle) = try volume.create(parent: parent, name: Array(name.utf8), mode: 0o644, caller: caller)
                try Array(bytes.utf8).withUnsafeBytes { _ = try volume.write(handle: handle, offset: 0, data: $0) }
                try volume.release(handle: handle)
            }
            try make(dir, "target", "old")
            try make(Volume.rootID, "w", "new")
            try volume.startRekey(Volume.rootID, to: RekeyTestKeys.new.identifier, caller: caller)

            // Once the rename has resolved "target" (under the old key: d is not rekeyed yet),
            // the whole rekey runs on another thread; the rename waits up to 2 s for it.
            let rekeyed = DispatchSemaphore(value: 0)
            TestHooks.pauses.withLock { $0[.renameResolved] = {
                Thread.detachNewThread {
                    volume.rekeyUntilDone()
                    rekeyed.signal()
                }
                _ = rekeyed.wait(timeout: .now() + 2)
            } }
            defer { TestHooks.pauses.withLock { $0[.renameResolved] = nil } }
            try volume.rename(parent: Volume.rootID, name: Array("w".utf8), newParent: dir, newName: Array("target".utf8), mode: .replace)
            TestHooks.pauses.withLock { $0[.renameResolved] = nil }
            // The rekey either ran before the rename acted (it could not have) or runs now.
            _ = rekeyed.wait(timeout: .now() + 30)
            volume.rekeyUntilDone()
            #expect(volume.rekeys.active.isEmpty)

            let handle = try volume.openDirectory(dir)
            let names = try volume.readDirectory(handle: handle, from: 0).map { String(decoding: $0.name, as: UTF8.self) }
            volume.releaseDirectory(handle: handle)
            #expect(names.filter { $0 == "target" }.count == 1)
            #expect(!names.contains("w"))
            let (id, _) = try volume.lookup(parent: dir, name: Array("target".utf8))
            let reading = try volume.open(id, truncate: false)
            #expect(try volume.read(handle: reading, offset: 0, count: 16) == Array("new".utf8))
            try volume.release(handle: reading)
        }
    }
}
