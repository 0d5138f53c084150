import Foundation
import Testing
import Synchronization
@testable import EncCore
#if canImport(Glibc)
import Glibc
#endif

/// Power loss in the middle of a header write, and reads racing writes that go straight to the
/// backing file. A torn header slot here is its first 512-byte sector new and the rest old, which
/// the crash-state enumeration cannot produce for headers shorter than a sector.
@Suite(.serialized) final class HeaderSafetyTests {
    static let key = try! MasterKey(raw: (1...64).map { UInt8($0) })
    let caller = Caller(uid: 0, gid: 0)
    /// This test's own directory, removed when the test ends (pass or fail).
    let base = FileManager.default.temporaryDirectory.path + "/encfsd-header-safety-\(UUID().uuidString)"

    deinit { try? FileManager.default.removeItem(atPath: base) }

    func makeStore() throws -> (String, Volume) {
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        let store = base + "/store"
        try StoreCreation.create(at: store, key: Self.key, extentSize: 4096, owner: caller)
        return (store, try Self.volume(store))
    }

    static func volume(_ store: String) throws -> Volume {
        let keys = KeyTable()
        _ = try keys.add(Self.key, claim: .init(uid: 0, serial: 0))
        return try Volume(storePath: store, keys: keys)
    }

    func backingPath(_ store: String) throws -> String {
        let names = try FileManager.default.contentsOfDirectory(atPath: store).filter { !$0.hasPrefix(".") && !$0.hasPrefix("encfsd.") }
        #expect(names.count == 1)
        return store + "/" + names[0]
    }

    func headerRegion(_ path: String) -> [UInt8] { Array(FileManager.default.contents(atPath: path)!.prefix(4096)) }

    /// Simulates a power loss that tore the header slot just rewritten: its first sector new, the rest old.
    func tear(_ path: String, before: [UInt8]) throws {
        let after = headerRegion(path)
        var torn = after
        var changed = 0
        for slot in 0..<2 where before[(slot * 2048)..<(slot * 2048 + 2048)] != after[(slot * 2048)..<(slot * 2048 + 2048)] {
            changed += 1
            torn.replaceSubrange((slot * 2048 + 512)..<(slot * 2048 + 2048), with: before[(slot * 2048 + 512)..<(slot * 2048 + 2048)])
        }
        #expect(changed == 1)
        let fd = open(path, O_WRONLY)
        _ = torn.withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, 0) }
        close(fd)
    }

    func seqs(_ path: String) -> [UInt64] {
        let r = headerRegion(path)
        return [0, 2048].map { o in r[(o + 8)..<(o + 16)].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
    }

    /// Data in odd extents 1...61 (0xAA), holes in even ones: 31 hole ranges, a header body over 512 bytes.
    func sparse(_ v: Volume, _ h: UInt64) throws {
        let a = [UInt8](repeating: 0xAA, count: 4096)
        for e in stride(from: 1, through: 61, by: 2) {
            try a.withUnsafeBytes { try v.write(handle: h, offset: UInt64(e * 4096), data: $0) }
        }
        try v.fsync(handle: h, dataOnly: true)
    }

    /// A journaled commit leaves the pending copy in the other slot; after the last close removes
    /// the shadow, a chmod must not replace the final header in place.
    @Test func journaledCommitCloseChmodTorn() throws {
        let (store, v) = try makeStore()
        let (id, _, h) = try v.create(parent: Volume.rootID, name: Array("f".utf8), mode: 0o644, caller: caller)
        try sparse(v, h)
        try [UInt8](repeating: 0xEE, count: 10).withUnsafeBytes { try v.write(handle: h, offset: 4096 + 100, data: $0) }
        try v.flush(handle: h)       // overwrite in place: journaled, final header synced
        try v.release(handle: h)     // last close: shadow unlinked
        let path = try backingPath(store)
        let before = headerRegion(path)
        var ch = AttributeChanges(); ch.mode = 0o600
        _ = try v.setattr(id, ch)    // metadata-only: +2 into the slot of the synced final header
        try tear(path, before: before)
        // A power loss, then a new mount.
        let v2 = try Self.volume(store)
        do {
            let (id2, _) = try v2.lookup(parent: Volume.rootID, name: Array("f".utf8))
            let h2 = try v2.open(id2, truncate: false)
            let got = try v2.read(handle: h2, offset: 0, count: 62 * 4096)
            #expect(got.count == 62 * 4096)
            #expect(got[4096 + 100] == 0xEE)
        } catch {
            Issue.record("file unreadable after a torn chmod: \(error)")
        }
    }

    /// The slot before a shrink describes extents that later appends rewrite: not a fallback.
    @Test func shrinkChmodTorn() throws {
        let (store, v) = try makeStore()
        let (id, _, h) = try v.create(parent: Volume.rootID, name: Array("f".utf8), mode: 0o644, caller: caller)
        try sparse(v, h)                                             // durable: 62 extents, 61 holds 0xAA
        var t = AttributeChanges(); t.size = 60 * 4096
        _ = try v.setattr(id, t)                                     // shrink: header synced, file cut
        let b = [UInt8](repeating: 0xBB, count: 8192)
        try b.withUnsafeBytes { try v.write(handle: h, offset: 60 * 4096, data: $0) } // whole extents past the end: written in place now
        let path = try backingPath(store)
        let before = headerRegion(path)
        var ch = AttributeChanges(); ch.mode = 0o600
        _ = try v.setattr(id, ch)
        try tear(path, before: before)
        let v2 = try Self.volume(store)
        let (id2, attrs) = try v2.lookup(parent: Volume.rootID, name: Array("f".utf8))
        let h2 = try v2.open(id2, truncate: false)
        let tail = try v2.read(handle: h2, offset: 61 * 4096, count: 4096)
        let mixed = !tail.isEmpty && tail.allSatisfy { $0 == 0xBB }
        #expect(!mixed)
    }

    /// A header read from disk is neither known durable nor replaceable (here slot 1 is empty).
    @Test func remountedSeqZeroObjectLinkTorn() throws {
        let (store, v) = try makeStore()
        let long1 = Array(String(repeating: "a", count: 200).utf8), long2 = Array(String(repeating: "b", count: 200).utf8)
        let (_, _, h) = try v.create(parent: Volume.rootID, name: long1, mode: 0o644, caller: caller)
        try v.release(handle: h)            // header seq 0 in slot 0, fdatasynced at create; slot 1 empty
        let path = try backingPath(store)
        let v2 = try Self.volume(store)     // a later mount (or the node forgotten and reloaded): durableSequence nil
        let (id2, _) = try v2.lookup(parent: Volume.rootID, name: long1)
        let before = headerRegion(path)
        _ = try v2.link(id2, newParent: Volume.rootID, newName: long2)
        try tear(path, before: before)      // power loss while the binding's header write was in flight
        let v3 = try Self.volume(store)
        do {
            _ = try v3.lookup(parent: Volume.rootID, name: long1)
        } catch {
            Issue.record("\(error)")
        }
    }

    /// Appends written in place while a read decrypts the same extents outside the node lock.
    @Test func directWriteRacesLockFreeRead() throws {
        let (_, v) = try makeStore()
        let (_, _, h) = try v.create(parent: Volume.rootID, name: Array("f".utf8), mode: 0o644, caller: caller)
        let x = [UInt8](repeating: 0x11, count: 16384), y = [UInt8](repeating: 0x22, count: 16384)
        try x.withUnsafeBytes { try v.write(handle: h, offset: 0, data: $0) }   // committed size 0: written in place
        let stop = Atomic<Bool>(false)
        let failures = Atomic<Int>(0)
        let reads = Atomic<Int>(0)
        let writer = Thread {
            var i = 0
            while !stop.load(ordering: .relaxed) {
                try! (i % 2 == 0 ? y : x).withUnsafeBytes { try v.write(handle: h, offset: 0, data: $0) }
                i += 1
            }
        }
        writer.start()
        let deadline = Date().addingTimeInterval(1.5)
        while Date() < deadline {
            do {
                let got = try v.read(handle: h, offset: 0, count: 16384)
                reads.add(1, ordering: .relaxed)
                for e in 0..<4 {
                    let ext = got[(e * 4096)..<(e * 4096 + 4096)]
                    if !(ext.allSatisfy { $0 == 0x11 } || ext.allSatisfy { $0 == 0x22 }) { failures.add(1, ordering: .relaxed) }
                }
            } catch {
                failures.add(1, ordering: .relaxed)
            }
        }
        stop.store(true, ordering: .relaxed)
        Thread.sleep(forTimeInterval: 0.1)
        #expect(failures.load(ordering: .relaxed) == 0)
    }
}
