import Foundation
import Testing
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat
#if canImport(Glibc)
import Glibc
#endif
@testable import EncCore

/// The shadow file of a journaled flush, written and replayed directly: both layouts (version 1,
/// a MAC over every byte; version 2 in format-3 stores, a MAC over the records' nonces and tags
/// with each record opened before any is applied), and what recovery refuses.
@Suite struct JournalTests {
    /// An object of three committed extents with a pending transaction over all three on disk,
    /// as a crash after the pending flag leaves it.
    struct PendingTransaction {
        let object: ScratchObject
        let pending: ObjectHeader
        let before: [UInt8]
        let after: [UInt8]
        let storeVersion: UInt16

        init(storeVersion: UInt16) throws {
            let object = try ScratchObject()
            let before = randomBytes(3 * 4096, seed: 11)
            try object.write(before, at: 0)
            let after = randomBytes(3 * 4096, seed: 12)
            let committed = object.header
            let records = (0..<3).map { index -> Journal.Record in
                let stored = [UInt8](unsafeUninitializedCapacity: 4096 + ExtentGeometry.overheadBytes) { bytes, count in
                    after.withUnsafeBytes { plain in
                        ExtentCodec.seal(key: object.key, objectID: committed.objectID, index: UInt64(index),
                                         plaintext: UnsafeRawBufferPointer(rebasing: plain[(index * 4096)..<((index + 1) * 4096)]),
                                         into: UnsafeMutableRawBufferPointer(bytes))
                    }
                    count = bytes.count
                }
                return Journal.Record(index: UInt64(index), stored: stored)
            }
            var final = committed
            final.sequence = committed.sequence + 2
            final = HeaderSlots.scratch.stamped(final)
            try Journal.write(journalFD: object.journalFD.descriptor, objectID: committed.objectID, pendingSequence: committed.sequence + 1,
                              finalSlot: HeaderCodec.seal(final, key: object.key), records: records, key: object.key,
                              storeVersion: storeVersion)
            var pending = committed
            pending.flags.insert(.pendingWrite)
            try HeaderSlots.scratch.write(fd: object.fd.descriptor, header: &pending, key: object.key, sync: true, afterData: true)
            self.object = object
            self.before = before
            self.after = after
            self.pending = pending
            self.storeVersion = storeVersion
        }

        var shadowPath: String { object.directory + "/.journal/" + Hex.encode(pending.objectID) }

        var shadow: [UInt8] {
            get { Array(FileManager.default.contents(atPath: shadowPath)!) }
            nonmutating set { FileManager.default.createFile(atPath: shadowPath, contents: Data(newValue)) }
        }

        func recover(storeVersion: UInt16? = nil) throws -> ObjectHeader {
            try Journal.recover(journalFD: object.journalFD.descriptor, objectFD: object.fd.descriptor, pending: pending, key: object.key,
                                storeVersion: storeVersion ?? self.storeVersion)
        }
    }

    /// Where the first record's parts are in a shadow of 4 KiB extents.
    static let firstRecord = Journal.fixedBytes + ExtentGeometry.headerSlotBytes
    static let firstStored = firstRecord + Journal.recordHeaderBytes

    @Test(arguments: [UInt16(2), 3])
    func replaysInEitherLayout(storeVersion: UInt16) throws {
        let t = try PendingTransaction(storeVersion: storeVersion)
        #expect(Array(t.shadow[4..<6]) == [storeVersion >= 3 ? 2 : 1, 0])
        let final = try t.recover()
        #expect(final.sequence == t.pending.sequence + 1)
        #expect(!final.flags.contains(.pendingWrite))
        #expect(try t.object.read(0, 3 * 4096) == t.after)
    }

    /// Every part a version 2 MAC does not cover is still authenticated: the ciphertext by its
    /// record's tag, checked before anything is written. Any change leaves the object as it was.
    @Test(arguments: [
        firstRecord,                                        // record index
        firstRecord + 8,                                    // record length
        firstStored,                                        // nonce
        firstStored + 16 + 100,                             // ciphertext (not under the journal MAC)
        firstStored + 16 + 4095,                            // last ciphertext byte
        firstStored + 16 + 4096 + 5,                        // tag
        2 * (Journal.recordHeaderBytes + 4096 + ExtentGeometry.overheadBytes) + firstStored + 16 + 7, // third record's ciphertext
        40 + 100,                                           // final header slot
        30,                                                 // pending sequence
    ])
    func damagedVersion2ShadowIsRefusedBeforeAnyWrite(offset: Int) throws {
        let t = try PendingTransaction(storeVersion: 3)
        let backing = t.object.backingBytes
        var shadow = t.shadow
        shadow[offset] ^= 0x01
        t.shadow = shadow
        expectIntegrityError { try t.recover() }
        let untouched = t.object.backingBytes == backing
        #expect(untouched)
    }

    /// An attacker who can write the store swaps one object's authentic shadow into another's
    /// name: the replay is refused before anything is written, whichever layout.
    @Test(arguments: [UInt16(2), 3])
    func anotherObjectsShadowIsRefusedBeforeAnyWrite(storeVersion: UInt16) throws {
        let target = try PendingTransaction(storeVersion: storeVersion)
        let other = try PendingTransaction(storeVersion: storeVersion)
        let backing = target.object.backingBytes
        target.shadow = other.shadow
        expectIntegrityError { try target.recover() }
        let untouched = target.object.backingBytes == backing
        #expect(untouched)
    }

    @Test func version2ShadowWithBytesAddedOrCutIsRefused() throws {
        let t = try PendingTransaction(storeVersion: 3)
        let shadow = t.shadow
        let backing = t.object.backingBytes
        // An extra record's worth of bytes before the MAC, and the shadow cut inside the last record.
        t.shadow = Array(shadow[..<(shadow.count - 32)]) + [UInt8](repeating: 0, count: 64) + Array(shadow.suffix(32))
        expectIntegrityError { try t.recover() }
        t.shadow = Array(shadow[..<(shadow.count - 100)]) + Array(shadow.suffix(32))
        expectIntegrityError { try t.recover() }
        let untouched = t.object.backingBytes == backing
        #expect(untouched)
    }

    /// A store of format 1 or 2 never writes a version 2 shadow, so it never replays one.
    @Test func version2ShadowIsRefusedInAnOlderStore() throws {
        let t = try PendingTransaction(storeVersion: 3)
        let backing = t.object.backingBytes
        expectIntegrityError { try t.recover(storeVersion: 2) }
        let untouched = t.object.backingBytes == backing
        #expect(untouched)
        #expect(try t.recover(storeVersion: 3).sequence == t.pending.sequence + 1)
    }

    /// The version 1 shadow is still replayed in a format 3 store (written before an upgrade).
    @Test func version1ShadowReplaysInANewerStore() throws {
        let t = try PendingTransaction(storeVersion: 2)
        _ = try t.recover(storeVersion: 3)
        #expect(try t.object.read(0, 3 * 4096) == t.after)
    }
}

/// A rekey batch resealed without the node lock (`ExtentFile.wholeLegacyExtents`,
/// `resealLegacy`, `installResealed`): what a write made meanwhile wins.
@Suite struct OutsideLockRekeyBatchTests {
    /// A committed file of `extents` extents plus `tail` bytes sealed under key A, opened as a
    /// rekey's step 1 leaves it: policy B, every extent a legacy range.
    static func halfRekeyed(extents: Int, tail: Int) throws -> (ScratchObject, ExtentFile, MasterKey, [UInt8]) {
        let a = try MasterKey(raw: (1...64).map { UInt8($0) })
        let b = try MasterKey(raw: (1...64).map { UInt8(200 - $0) })
        let object = try ScratchObject(key: a)
        let data = randomBytes(extents * 4096 + tail, seed: 5)
        try object.write(data, at: 0)
        var header = object.header
        header.policy = b.identifier
        header.macPolicy = b.identifier
        header.previousPolicy = a.identifier
        header.legacyRanges = HoleMap(ranges: [0..<header.geometry.extentCount(size: header.size)])
        let file = ExtentFile(backing: object.fd, journal: object.journalFD, key: b, legacyKey: a, header: header, slots: .scratch)
        object.header = header
        return (object, file, b, data)
    }

    @Test func wholeCommittedExtentsOnlyAndWritesWin() throws {
        let (object, file, b, data) = try Self.halfRekeyed(extents: 6, tail: 100)
        // The partial last extent (6) is left to the locked path.
        #expect(file.wholeLegacyExtents(limit: 100) == [0, 1, 2, 3, 4, 5])
        #expect(file.wholeLegacyExtents(limit: 2) == [0, 1])
        let chosen = file.wholeLegacyExtents(limit: 100)
        let resealed = try file.resealLegacy(chosen, threads: 2)
        #expect(resealed.map(\.index).sorted() == chosen)
        // Meanwhile a write dirties extent 2 and a truncate cuts extents 4 and 5 off.
        let written = randomBytes(10, seed: 9)
        try written.withUnsafeBytes { try file.write(offset: 2 * 4096 + 7, data: $0) }
        try file.resize(to: 4 * 4096)
        #expect(file.installResealed(resealed, sealedWith: b) == 3 * 4096)
        var header = object.header
        try file.commit(header: &header)
        #expect(header.legacyRanges.isEmpty)
        var expected = Array(data[0..<(4 * 4096)])
        expected.replaceSubrange((2 * 4096 + 7)..<(2 * 4096 + 17), with: written)
        let reopened = ExtentFile(backing: object.fd, journal: object.journalFD, key: b, header: header, slots: .scratch)
        // Read without the old key: nothing is left under it.
        #expect(try reopened.read(offset: 0, count: 4 * 4096) == expected)
    }

    @Test func resealUnderAnotherKeyIsNotTaken() throws {
        let (object, file, _, _) = try Self.halfRekeyed(extents: 2, tail: 0)
        try withExtendedLifetime(object) {
            let resealed = try file.resealLegacy(file.wholeLegacyExtents(limit: 10), threads: 1)
            let other = try MasterKey(raw: (1...64).map { UInt8(($0 * 7) & 0xff) })
            #expect(file.installResealed(resealed, sealedWith: other) == 0)
            #expect(!file.hasUncommittedChanges)
        }
    }

    @Test func damagedLegacyExtentIsAnIntegrityError() throws {
        let (object, file, _, _) = try Self.halfRekeyed(extents: 3, tail: 0)
        var backing = object.backingBytes
        backing[Int(object.header.geometry.backingOffset(1)) + 40] ^= 1
        object.backingBytes = backing
        expectIntegrityError { try file.resealLegacy([0, 1, 2], threads: 2) }
    }
}
