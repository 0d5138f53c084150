import Foundation
import Testing
@testable import EncCore
import EncKeys
import EncFormat

/// What the store does when the kernel leaves killing privileges to it (FUSE_HANDLE_KILLPRIV_V2):
/// which set-ID bits go, that they go in the header write the request makes anyway (none added
/// when there is nothing to drop), and that a file capability goes with every write, truncate
/// and chown, also where the kernel no longer asks first.
@Suite struct PrivilegeDropTests {
    static let key = try! MasterKey(raw: (1...64).map { UInt8($0) })
    let caller = Caller(uid: 0, gid: 0)
    static let capability: [UInt8] = [0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00] + [UInt8](repeating: 0, count: 12)

    @Test func setIDBitsGoAsTheKernelDecides() {
        #expect(Volume.modeDroppingSetID(0o6775) == 0o775)
        #expect(Volume.modeDroppingSetID(0o4755) == 0o755)
        #expect(Volume.modeDroppingSetID(0o2755) == 0o755)
        // Set-group-ID without group execute marks mandatory locking: it stays.
        #expect(Volume.modeDroppingSetID(0o6745) == 0o2745)
        #expect(Volume.modeDroppingSetID(0o2745) == 0o2745)
        #expect(Volume.modeDroppingSetID(0o1777) == 0o1777)
    }

    /// A volume on a scratch store and a file `f` of `mode` holding a few bytes; `body` gets the
    /// volume, a function reopening the volume (to read what reached the disk) and the file.
    func withFile(mode: UInt32, _ body: (inout Volume, _ reopen: (inout Volume) throws -> Void, _ file: UInt64) throws -> Void) throws {
        try withScratchStore("encfsd-privileges", key: Self.key, owner: caller) { store, keys in
            var volume = try Volume(storePath: store, keys: keys)
            let (file, _, handle) = try volume.create(parent: Volume.rootID, name: Array("f".utf8), mode: 0o644, caller: caller)
            try Array("contents".utf8).withUnsafeBytes { try volume.write(handle: handle, offset: 0, data: $0) }
            try volume.release(handle: handle)
            var changes = AttributeChanges()
            changes.mode = mode
            _ = try volume.setattr(file, changes)
            func reopen(_ v: inout Volume) throws {
                v.closeCleanly()
                v = try Volume(storePath: store, keys: keys)
            }
            try body(&volume, reopen, file)
            volume.closeCleanly()
        }
    }

    func sequence(_ volume: Volume, _ file: UInt64) throws -> UInt64 {
        try volume.node(file).state.withLock { $0.header.sequence }
    }

    func mode(_ volume: Volume, _ name: String = "f") throws -> UInt32 {
        try volume.lookup(parent: Volume.rootID, name: Array(name.utf8)).1.mode & 0o7777
    }

    /// Writes one byte at `offset` through a fresh handle and closes it; the header writes it took.
    func write(_ volume: Volume, _ file: UInt64, at offset: UInt64, dropSetID: Bool) throws -> UInt64 {
        let before = try sequence(volume, file)
        let handle = try volume.open(file, flags: O_WRONLY)
        try [UInt8(ascii: "x")].withUnsafeBytes { try volume.write(handle: handle, offset: offset, data: $0, dropSetID: dropSetID) }
        try volume.release(handle: handle)
        return try sequence(volume, file) - before
    }

    @Test func aWriteDropsTheBitsInItsOwnCommit() throws {
        try withFile(mode: 0o6775) { volume, reopen, file in
            let plain = try write(volume, file, at: 1, dropSetID: false)
            #expect(try mode(volume) == 0o6775)
            let dropping = try write(volume, file, at: 2, dropSetID: true)
            #expect(dropping == plain)
            try reopen(&volume)
            #expect(try mode(volume) == 0o775)
        }
    }

    @Test func nothingToDropCostsNothing() throws {
        try withFile(mode: 0o755) { volume, _, file in
            let dropping = try write(volume, file, at: 1, dropSetID: true)
            let plain = try write(volume, file, at: 2, dropSetID: false)
            #expect(dropping == plain)
            let before = try sequence(volume, file)
            var truncate = AttributeChanges()
            truncate.size = 8
            truncate.dropSetID = true
            _ = try volume.setattr(file, truncate)
            let after = try sequence(volume, file)
            #expect(after == before, "a truncate to the size the file has writes no header")
            #expect(try mode(volume) == 0o755)
        }
    }

    /// The header writes (as sequence steps, which depend on the slots' state) of a chmod to
    /// `mode` on a file prepared as `withFile(mode: from)` prepares it: what dropping the bits
    /// with a header write of its own costs.
    func chmodCost(from: UInt32, to mode: UInt32) throws -> UInt64 {
        var cost: UInt64 = 0
        try withFile(mode: from) { volume, _, file in
            let before = try sequence(volume, file)
            var chmod = AttributeChanges()
            chmod.mode = mode
            _ = try volume.setattr(file, chmod)
            cost = try sequence(volume, file) - before
        }
        return cost
    }

    func truncate(_ volume: Volume, _ file: UInt64, to size: UInt64, dropSetID: Bool) throws -> UInt64 {
        let before = try sequence(volume, file)
        var truncate = AttributeChanges()
        truncate.size = size
        truncate.dropSetID = dropSetID
        _ = try volume.setattr(file, truncate)
        return try sequence(volume, file) - before
    }

    @Test func aTruncateDropsTheBitsWithOneHeaderWrite() throws {
        var plain: UInt64 = 0
        try withFile(mode: 0o4755) { volume, _, file in plain = try truncate(volume, file, to: 3, dropSetID: false) }
        try withFile(mode: 0o4755) { volume, reopen, file in
            let dropping = try truncate(volume, file, to: 3, dropSetID: true)
            #expect(dropping == plain)
            try reopen(&volume)
            #expect(try mode(volume) == 0o755)
        }
        // A truncate to the size the file has writes no header but for the bits.
        try withFile(mode: 0o4755) { volume, reopen, file in
            let dropping = try truncate(volume, file, to: 8, dropSetID: true)
            #expect(try dropping == chmodCost(from: 0o4755, to: 0o755))
            try reopen(&volume)
            #expect(try mode(volume) == 0o755)
        }
    }

    @Test func aTruncatingOpenDropsTheBits() throws {
        /// Truncates by O_TRUNC keeping the bits, then `second`: its header writes and the mode after.
        func emptiedThen(_ second: (Volume, UInt64) throws -> Void) throws -> (UInt64, UInt32) {
            var result: (UInt64, UInt32) = (0, 0)
            try withFile(mode: 0o6775) { volume, reopen, file in
                let kept = try volume.open(file, flags: O_WRONLY | O_TRUNC, dropSetID: false)
                try volume.release(handle: kept)
                #expect(try mode(volume) == 0o6775)
                let before = try sequence(volume, file)
                try second(volume, file)
                let written = try sequence(volume, file) - before
                try reopen(&volume)
                result = (written, try mode(volume))
            }
            return result
        }
        // Empty already: the bits need a header write of their own, and get exactly one, as a chmod.
        let (dropping, dropped) = try emptiedThen { volume, file in
            try volume.release(handle: try volume.open(file, flags: O_WRONLY | O_TRUNC, dropSetID: true))
        }
        let (chmodding, chmodded) = try emptiedThen { volume, file in
            var chmod = AttributeChanges()
            chmod.mode = 0o775
            _ = try volume.setattr(file, chmod)
        }
        #expect(dropped == 0o775 && chmodded == 0o775)
        #expect(dropping == chmodding)
    }

    @Test func aChownDropsTheBitsInTheChownsHeaderWrite() throws {
        func chown(dropSetID: Bool) throws -> (UInt64, UInt32) {
            var result: (UInt64, UInt32) = (0, 0)
            try withFile(mode: 0o6765) { volume, reopen, file in
                let before = try sequence(volume, file)
                var chown = AttributeChanges()
                chown.uid = 1000
                chown.dropSetID = dropSetID
                _ = try volume.setattr(file, chown)
                let written = try sequence(volume, file) - before
                try reopen(&volume)
                result = (written, try mode(volume))
            }
            return result
        }
        let (plain, kept) = try chown(dropSetID: false)
        let (dropping, dropped) = try chown(dropSetID: true)
        #expect(kept == 0o6765 && dropped == 0o2765)
        #expect(dropping == plain)
    }

    /// The kernel stops asking about `security.capability` once it has marked the inode as holding
    /// none, so a capability it does not know of must still go at the store.
    @Test func aCapabilityGoesWithWriteTruncateAndChown() throws {
        try withFile(mode: 0o755) { volume, _, file in
            let name = Array("security.capability".utf8)
            func capabilityPresent() -> Bool { (try? volume.getxattr(file, name: name)) != nil }
            var truncate = AttributeChanges()
            truncate.size = 2
            var chown = AttributeChanges()
            chown.gid = 100
            try volume.setxattr(file, name: name, value: Self.capability, mode: .any)
            #expect(capabilityPresent())
            _ = try write(volume, file, at: 0, dropSetID: false)
            #expect(!capabilityPresent(), "write")
            for change in [truncate, chown] {
                try volume.setxattr(file, name: name, value: Self.capability, mode: .any)
                _ = try volume.setattr(file, change)
                #expect(!capabilityPresent())
            }
            try volume.setxattr(file, name: name, value: Self.capability, mode: .any)
            let handle = try volume.open(file, flags: O_WRONLY | O_TRUNC)
            try volume.release(handle: handle)
            #expect(!capabilityPresent(), "O_TRUNC open")
            // Other attributes stay, and a chmod keeps the capability, as on ext4.
            try volume.setxattr(file, name: Array("user.kept".utf8), value: [1], mode: .any)
            try volume.setxattr(file, name: name, value: Self.capability, mode: .any)
            var chmod = AttributeChanges()
            chmod.mode = 0o750
            _ = try volume.setattr(file, chmod)
            #expect(capabilityPresent())
            _ = try write(volume, file, at: 0, dropSetID: false)
            let kept = try #require(try volume.getxattr(file, name: Array("user.kept".utf8)))
            #expect(!capabilityPresent() && kept == [1])
        }
    }
}
