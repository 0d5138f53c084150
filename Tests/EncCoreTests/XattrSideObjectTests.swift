import Foundation
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// The xattr side object (FORMAT.md 16): the codec against an answer computed outside encfsd
/// (Python's `cryptography` from the format text), and a volume on a backing without user xattrs,
/// where every attribute lives in side objects, including against a hostile store.
@Suite struct XattrSideObjectTests {
    static let key = try! MasterKey(raw: (1...64).map { UInt8($0) })
    static let objectID: [UInt8] = Array(0xa0..<0xb0)
    static let attributes: [[UInt8]: [UInt8]] = [
        Array("user.comment".utf8): Array("hello".utf8),
        Array("security.selinux".utf8): Array("system_u:object_r:etc_t:s0\0".utf8),
        Array("user.empty".utf8): [],
    ]
    /// A backing like sshfs: no user xattrs (nor O_TMPFILE, linkat, rename flags, hard links).
    static let noXattrs = BackingCapabilities(present: [.fdatasync, .lock, .stableInodes], filesystemType: "fuse.sshfs", lockScope: .thisHostOnly)

    @Test func knownAnswer() throws {
        // FORMAT.md 16.3: HKDF context 0x84 with the nonce, AD "encfsd xattr side object" ||
        // object ID || u64 generation.
        let image = try XattrSideObject.seal(Self.attributes, objectID: Self.objectID, generation: 7, key: Self.key, nonce: Array(0x10..<0x20))
        #expect(Hex.encode(image) == "45465833101112131415161718191a1b1c1d1e1f6a0a3cbb8551b77455f3f3f7ddd606a8391ce92912179e2272f6be502c1c9b41f4afa584d7ab7dd254951398a49b71f3deb98d218f4f93ec4513cc6c175bc3c6dd34fbfc2e6b728a36820717768e380078d1a06fcaefab0a78a97679cd41171adce2c30e24f6b795fb")
        #expect(Hex.encode(XattrSideObject.encode(Self.attributes)) == "030000001073656375726974792e73656c696e75781b00000073797374656d5f753a6f626a6563745f723a6574635f743a7330000c757365722e636f6d6d656e740500000068656c6c6f0a757365722e656d70747900000000")
        #expect(try XattrSideObject.open(image, objectID: Self.objectID, generation: 7, key: Self.key) == Self.attributes)
        let name = XattrSideObject.fileName(objectID: Self.objectID, generation: 7)
        #expect(String(decoding: name, as: UTF8.self) == "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf.0000000000000007")
        #expect(XattrSideObject.parse(fileName: name)! == (Self.objectID, 7))
        for bad in ["a0a1a2a3a4a5a6a7a8a9aaabacadaeaf.0000000000000000", "A0A1A2A3A4A5A6A7A8A9AAABACADAEAF.0000000000000007",
                    "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf.7", "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf", "x"] {
            #expect(XattrSideObject.parse(fileName: Array(bad.utf8)) == nil, "\(bad)")
        }
    }

    @Test func staleSwappedFlippedOrTruncatedDoesNotOpen() throws {
        let image = try XattrSideObject.seal(Self.attributes, objectID: Self.objectID, generation: 7, key: Self.key)
        let other = try MasterKey(raw: [UInt8](repeating: 9, count: 32))
        var cases: [(String, () throws -> [[UInt8]: [UInt8]])] = [
            ("older generation", { try XattrSideObject.open(image, objectID: Self.objectID, generation: 8, key: Self.key) }),
            ("another object", { try XattrSideObject.open(image, objectID: Array(0..<16), generation: 7, key: Self.key) }),
            ("another key", { try XattrSideObject.open(image, objectID: Self.objectID, generation: 7, key: other) }),
            ("truncated", { try XattrSideObject.open(Array(image.dropLast()), objectID: Self.objectID, generation: 7, key: Self.key) }),
            ("empty", { try XattrSideObject.open([], objectID: Self.objectID, generation: 7, key: Self.key) }),
        ]
        for i in [0, 5, 20, image.count / 2, image.count - 1] {
            var flipped = image
            flipped[i] ^= 0x01
            cases.append(("byte \(i) flipped", { try XattrSideObject.open(flipped, objectID: Self.objectID, generation: 7, key: Self.key) }))
        }
        for (what, open) in cases {
            #expect(throws: FormatError.self, "\(what)") { try open() }
        }
    }

    /// A store, a volume on it with `capabilities`, and a file and a directory in it.
    final class Fixture {
        let base = FileManager.default.temporaryDirectory.path + "/encfsd-xside-\(UUID().uuidString)"
        var store: String { base + "/store" }
        let keys = KeyTable()
        let capabilities: BackingCapabilities
        var volume: Volume
        let caller = Caller(uid: 0, gid: 0)

        init(capabilities: BackingCapabilities = XattrSideObjectTests.noXattrs) throws {
            self.capabilities = capabilities
            try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
            try StoreCreation.create(at: base + "/store", key: XattrSideObjectTests.key, extentSize: 4096, owner: Caller(uid: 0, gid: 0))
            try keys.add(XattrSideObjectTests.key, claim: .init(uid: 0, serial: 0))
            volume = try Volume(storePath: base + "/store", keys: keys, capabilities: capabilities)
        }

        deinit { try? FileManager.default.removeItem(atPath: base) }

        func remount() throws {
            volume.closeCleanly()
            volume = try Volume(storePath: store, keys: keys, capabilities: capabilities)
        }

        func file(_ name: String) throws -> UInt64 {
            if let (id, _) = try? volume.lookup(parent: Volume.rootID, name: Array(name.utf8)) { return id }
            let (id, _, handle) = try volume.create(parent: Volume.rootID, name: Array(name.utf8), mode: 0o644, caller: caller)
            try volume.release(handle: handle)
            return id
        }

        func set(_ id: UInt64, _ name: String, _ value: [UInt8], _ mode: Volume.XattrMode = .any) throws {
            try volume.setxattr(id, name: Array(name.utf8), value: value, mode: mode)
        }

        func get(_ id: UInt64, _ name: String) throws -> [UInt8] {
            guard let value = try volume.getxattr(id, name: Array(name.utf8)) else { throw StoreError.system(ENODATA) }
            return value
        }

        func list(_ id: UInt64) throws -> [String] {
            try volume.listxattr(id, includeTrusted: true).map { String(decoding: $0, as: UTF8.self) }.sorted()
        }

        func objectID(_ id: UInt64) throws -> [UInt8] { try volume.node(id).state.withLock { $0.header.objectID } }
        func generation(_ id: UInt64) throws -> UInt64 { try volume.node(id).state.withLock { $0.header.xattrGeneration } }

        func sideFiles() -> [String] {
            ((try? FileManager.default.contentsOfDirectory(atPath: store + "/.xattrs")) ?? []).sorted()
        }

        func sidePath(_ id: UInt64) throws -> String {
            store + "/.xattrs/" + String(decoding: XattrSideObject.fileName(objectID: try objectID(id), generation: try generation(id)), as: UTF8.self)
        }
    }

    func errno(of body: () throws -> Any) -> Int32? {
        do { _ = try body() } catch StoreError.system(let code) { return code } catch { return -1 }
        return nil
    }

    @Test func everyAttributeLivesInTheSideObjectWhenTheBackingHasNone() throws {
        let f = try Fixture()
        let id = try f.file("f")
        #expect(try f.generation(id) == 0)
        #expect(try f.list(id) == [])
        #expect(errno { try f.get(id, "user.none") } == ENODATA)
        let names = (0..<200).map { String(format: "user.attribute-%03d", $0) }
        for (i, name) in names.enumerated() { try f.set(id, name, randomBytes(200, seed: UInt64(i))) }
        #expect(try f.generation(id) == 200)
        #expect(f.sideFiles().count == 1, "the older generations are gone")
        try f.set(id, "user.big", [UInt8](repeating: 0x5a, count: 65536))
        #expect(errno { try f.set(id, "user.bigger", [UInt8](repeating: 0, count: 65537)) } == E2BIG)
        #expect(errno { try f.set(id, "user.attribute-000", [1], .create) } == EEXIST)
        #expect(errno { try f.set(id, "user.absent", [1], .replace) } == ENODATA)
        try f.set(id, "trusted.overlay.opaque", Array("y".utf8))
        try f.remount()
        let again = try f.file("f")
        #expect(try f.list(again) == (names + ["user.big", "trusted.overlay.opaque"]).sorted())
        #expect(try f.volume.listxattr(again, includeTrusted: false).count == 201)
        for (i, name) in names.enumerated() { #expect(try f.get(again, name) == randomBytes(200, seed: UInt64(i))) }
        #expect(try f.get(again, "user.big") == [UInt8](repeating: 0x5a, count: 65536))
        try f.volume.removexattr(again, name: Array("user.attribute-007".utf8))
        #expect(errno { try f.volume.removexattr(again, name: Array("user.attribute-007".utf8)) } == ENODATA)
        #expect(errno { try f.get(again, "user.attribute-007") } == ENODATA)
        // encfsd's per-object limit: 1 MiB of names and values, refused at the call.
        let other = try f.file("g")
        for i in 0..<15 { try f.set(other, "user.v\(i)", [UInt8](repeating: UInt8(i), count: 65536)) }
        #expect(errno { try f.set(other, "user.v15", [UInt8](repeating: 1, count: 65536)) } == ENOSPC)
        #expect(try f.list(other).count == 15)
    }

    @Test func hardLinksShareItRenamesKeepItAndTheLastUnlinkRemovesIt() throws {
        let f = try Fixture(capabilities: BackingCapabilities(present: [.fdatasync, .lock, .stableInodes, .hardLinks, .unnamedFiles, .linkOpenFile,
                                                                        .renameNoReplace, .renameExchange], filesystemType: "test", lockScope: .thisMachine))
        let id = try f.file("f")
        try f.set(id, "user.a", [1])
        _ = try f.volume.link(id, newParent: Volume.rootID, newName: Array("hard".utf8))
        try f.volume.rename(parent: Volume.rootID, name: Array("f".utf8), newParent: Volume.rootID, newName: Array("moved".utf8), mode: .replace)
        try f.remount()
        let hard = try f.file("hard"), moved = try f.file("moved")
        #expect(try f.get(hard, "user.a") == [1] && f.get(moved, "user.a") == [1])
        try f.set(hard, "user.b", [2])
        #expect(try f.get(moved, "user.b") == [2])
        try f.volume.unlink(parent: Volume.rootID, name: Array("moved".utf8))
        #expect(f.sideFiles().count == 1)
        try f.volume.unlink(parent: Volume.rootID, name: Array("hard".utf8))
        #expect(f.sideFiles().isEmpty)
        // A rename over the last name of a file with a side object removes it too; so does rmdir.
        let victim = try f.file("victim"), other = try f.file("other")
        try f.set(victim, "user.x", [3])
        try f.set(other, "user.y", [4])
        try f.volume.rename(parent: Volume.rootID, name: Array("other".utf8), newParent: Volume.rootID, newName: Array("victim".utf8), mode: .replace)
        #expect(f.sideFiles().count == 1)
        let (dir, _) = try f.volume.mkdir(parent: Volume.rootID, name: Array("d".utf8), mode: 0o755, caller: f.caller)
        try f.set(dir, "user.z", [5])
        #expect(f.sideFiles().count == 2)
        try f.volume.rmdir(parent: Volume.rootID, name: Array("d".utf8))
        #expect(f.sideFiles().count == 1)
    }

    @Test func aDefaultACLIsInheritedThroughSideObjects() throws {
        let f = try Fixture()
        let (dir, _) = try f.volume.mkdir(parent: Volume.rootID, name: Array("d".utf8), mode: 0o755, caller: f.caller)
        // user::rwx, user:1000:rwx, group::r-x, mask::rwx, other::---
        var acl: [UInt8] = [2, 0, 0, 0]
        for (tag, permissions, id) in [(0x01, 7, UInt32.max), (0x02, 7, 1000), (0x04, 5, UInt32.max), (0x10, 7, UInt32.max), (0x20, 0, UInt32.max)] {
            acl += [UInt8(tag), 0, UInt8(permissions), 0] + withUnsafeBytes(of: UInt32(id).littleEndian, Array.init)
        }
        try f.volume.setxattr(dir, name: PosixACL.defaultName, value: acl, mode: .any)
        let (file, attributes, handle) = try f.volume.create(parent: dir, name: Array("f".utf8), mode: 0o666, caller: Caller(uid: 0, gid: 0, umask: 0o077))
        try f.volume.release(handle: handle)
        #expect(attributes.mode & 0o777 == 0o660, "the default ACL, not the umask, decides")
        #expect(try f.volume.listxattr(file, includeTrusted: true) == [PosixACL.accessName])
        let (sub, _) = try f.volume.mkdir(parent: dir, name: Array("sub".utf8), mode: 0o777, caller: f.caller)
        #expect(Set(try f.volume.listxattr(sub, includeTrusted: true)) == [PosixACL.accessName, PosixACL.defaultName])
        try f.remount()
        let d = try f.volume.lookup(parent: Volume.rootID, name: Array("d".utf8)).0
        let again = try f.volume.lookup(parent: d, name: Array("f".utf8)).0
        #expect(try f.volume.getxattr(again, name: PosixACL.accessName).flatMap(PosixACL.init(xattr:)) != nil)
    }

    /// Every way a store's writer can damage a side object gives EIO for that object's xattrs
    /// and nothing else: its contents, and another object's xattrs, still read.
    @Test func aHostileSideObjectReadsEIOForItsObjectOnly() throws {
        let damages: [(String, (Fixture, String, String) throws -> Void)] = [
            ("missing", { _, path, _ in try FileManager.default.removeItem(atPath: path) }),
            ("truncated", { _, path, _ in truncate(path, 30) }),
            ("a byte flipped", { _, path, _ in
                var bytes = Array(FileManager.default.contents(atPath: path)!)
                bytes[bytes.count / 2] ^= 0x40
                try Data(bytes).write(to: URL(fileURLWithPath: path))
            }),
            ("a symlink", { _, path, other in
                try FileManager.default.removeItem(atPath: path)
                try FileManager.default.createSymbolicLink(atPath: path, withDestinationPath: other)
            }),
            ("a FIFO", { _, path, _ in try FileManager.default.removeItem(atPath: path); mkfifo(path, 0o600) }),
            ("a device", { _, path, _ in try FileManager.default.removeItem(atPath: path); mknod(path, S_IFCHR | 0o600, dev_t(1 << 8 | 3)) }),
            ("hard-linked", { f, path, _ in link(path, f.base + "/elsewhere") }),
            ("swapped from another object", { _, path, other in
                try FileManager.default.removeItem(atPath: path)
                try FileManager.default.copyItem(atPath: other, toPath: path)
            }),
            ("an older generation", { f, path, _ in
                try FileManager.default.removeItem(atPath: path)
                try FileManager.default.copyItem(atPath: f.base + "/older", toPath: path)
            }),
        ]
        for (what, damage) in damages {
            let f = try Fixture()
            let victim = try f.file("victim"), bystander = try f.file("bystander")
            try f.set(victim, "user.a", [1])
            try FileManager.default.copyItem(atPath: try f.sidePath(victim), toPath: f.base + "/older")
            try f.set(victim, "user.b", [2])
            try f.set(bystander, "user.c", [3])
            let path = try f.sidePath(victim), other = try f.sidePath(bystander)
            try f.remount()
            try damage(f, path, other)
            let v = try f.file("victim"), b = try f.file("bystander")
            #expect(throws: (any Error).self, "\(what): getxattr") { try f.get(v, "user.a") }
            #expect(errno { try f.list(v) } == -1, "\(what): listxattr is EIO, not a short list")
            #expect(errno { try f.set(v, "user.new", [4]) } == -1, "\(what): setxattr is refused")
            #expect(try f.get(b, "user.c") == [3], "\(what): another object's xattrs are untouched")
            #expect(try f.volume.getattr(v).size == 0, "\(what): the object itself still serves")
        }
    }

    @Test func aStoreOfAnOlderVersionRefusesRatherThanLosingThem() throws {
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("xside-v2-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: work) }
        try FileManager.default.copyItem(at: GoldenStoreTests.goldenRoot.appendingPathComponent("v2/store"), to: work)
        let keys = KeyTable()
        try keys.add(Self.key, claim: .init(uid: 0, serial: 0))
        let volume = try Volume(storePath: work.path, keys: keys, capabilities: Self.noXattrs)
        let (id, _, handle) = try volume.create(parent: Volume.rootID, name: Array("new".utf8), mode: 0o644, caller: Caller(uid: 0, gid: 0))
        try volume.release(handle: handle)
        #expect(throws: StoreError.notSupported) { try volume.setxattr(id, name: Array("user.a".utf8), value: [1], mode: .any) }
        #expect(try volume.listxattr(id, includeTrusted: true) == [])
        #expect(!FileManager.default.fileExists(atPath: work.path + "/.xattrs"))
    }

    @Test func fsckChecksSideObjectsAndRemovesLeftoverGenerations() throws {
        let f = try Fixture()
        let id = try f.file("f"), other = try f.file("g")
        try f.set(id, "user.a", [1])
        let older = try f.sidePath(id)
        try FileManager.default.copyItem(atPath: older, toPath: f.base + "/older")
        try f.set(id, "user.b", [2])
        try f.set(other, "user.c", [3])
        try f.volume.setxattr(Volume.rootID, name: Array("user.root".utf8), value: [4], mode: .any)
        let damaged = try f.sidePath(other)
        f.volume.closeCleanly()
        func check(repair: Bool) throws -> StoreChecker.Summary { try StoreChecker(storePath: f.store, keys: f.keys, repair: repair).run() }
        #expect(try check(repair: false).problemsLeft == 0)
        // A generation a crash left behind: reported, removed by --repair, the current one kept.
        try FileManager.default.copyItem(atPath: f.base + "/older", toPath: older)
        let leftover = try check(repair: false)
        #expect(leftover.problemsLeft == 0 && leftover.findings.contains { $0.path.hasSuffix(older.split(separator: "/").last!) })
        #expect(try check(repair: true).repaired == 1)
        #expect(!FileManager.default.fileExists(atPath: older) && f.sideFiles().count == 3)
        // A damaged one is a problem of its object.
        var bytes = Array(FileManager.default.contents(atPath: damaged)!)
        bytes[30] ^= 1
        try Data(bytes).write(to: URL(fileURLWithPath: damaged))
        let found = try check(repair: false)
        #expect(found.problemsLeft == 1 && found.findings.contains { $0.path == "/g" && $0.message.contains("failed authentication") })
        try FileManager.default.removeItem(atPath: damaged)
        #expect(try check(repair: true).findings.contains { $0.path == "/g" && $0.message.contains("missing") })
    }

    @Test func aRekeyResealsTheSideObjectUnderTheNewKey() throws {
        let f = try Fixture()
        let newKey = try MasterKey(raw: [UInt8](repeating: 0x42, count: 64))
        try f.keys.add(newKey, claim: .init(uid: 0, serial: 0))
        let id = try f.file("f")
        let (dir, _) = try f.volume.mkdir(parent: Volume.rootID, name: Array("d".utf8), mode: 0o755, caller: f.caller)
        for target in [id, dir, Volume.rootID] { try f.set(target, "user.kept", Array("value".utf8)) }
        try f.volume.startRekey(Volume.rootID, to: newKey.identifier, caller: f.caller)
        f.volume.rekeyUntilDone()
        #expect(f.volume.rekeys.active.isEmpty)
        try f.remount()
        let again = try f.file("f"), d = try f.volume.lookup(parent: Volume.rootID, name: Array("d".utf8)).0
        for target in [again, d, Volume.rootID] {
            #expect(try f.get(target, "user.kept") == Array("value".utf8))
            let (objectID, generation) = try f.volume.node(target).state.withLock { ($0.header.objectID, $0.header.xattrGeneration) }
            let image = try Array(Data(contentsOf: URL(fileURLWithPath: f.sidePath(target))))
            #expect(try XattrSideObject.open(image, objectID: objectID, generation: generation, key: newKey) == [Array("user.kept".utf8): Array("value".utf8)])
        }
        // Nothing is left that the old key opens: one file per object, each the header's.
        #expect(f.sideFiles().count == 3)
    }

    /// The common path pays nothing: objects whose header names no side object never open
    /// `.xattrs`; one that does reads its side object once per node, then answers from memory.
    @Test func objectsWithoutASideObjectCostNothingAndOneIsReadOnce() throws {
        let f = try Fixture(capabilities: .local)
        let plain = try f.file("plain"), side = try f.file("side")
        try f.set(plain, "user.small", [1])
        try f.set(side, "user.big", [UInt8](repeating: 2, count: 65536)) // its sealed form fits no backing xattr
        try f.remount()
        let p = try f.file("plain")
        #expect(try f.get(p, "user.small") == [1])
        #expect(errno { try f.get(p, "security.capability") } == ENODATA)
        #expect(try f.list(p) == ["user.small"])
        #expect(f.volume.sideObjectReads.load(ordering: .relaxed) == 0)
        #expect(f.volume.xattrSideDirectory.withLock { $0 == nil }, ".xattrs not even opened")
        let s = try f.file("side")
        for _ in 0..<3 { #expect(try f.get(s, "user.big").count == 65536) }
        #expect(errno { try f.get(s, "security.capability") } == ENODATA)
        #expect(f.volume.sideObjectReads.load(ordering: .relaxed) == 1)
    }
}
