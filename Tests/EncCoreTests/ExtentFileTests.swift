import Testing
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat
#if canImport(Glibc)
import Glibc
#endif
@testable import EncCore

@Suite struct ExtentFileTests {
    @Test(arguments: [0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 1 << 20 | 1])
    func roundTripAtSize(size: Int) throws {
        let object = try ScratchObject()
        let data = randomBytes(size, seed: UInt64(size))
        try object.write(data, at: 0)
        #expect(object.header.size == UInt64(size))
        #expect(try object.read(0, size + 10) == data)
        #expect(object.backingBytes.count == Int(object.header.geometry.backingLength(size: UInt64(size))))
    }

    @Test func overwriteInsideAndAcrossExtents() throws {
        let object = try ScratchObject()
        var model = randomBytes(20000, seed: 1)
        try object.write(model, at: 0)
        for (offset, count) in [(10, 5), (4090, 20), (8192, 4096), (0, 1), (19999, 1)] {
            let patch = randomBytes(count, seed: UInt64(offset))
            model.replaceSubrange(offset..<(offset + count), with: patch)
            try object.write(patch, at: UInt64(offset))
            #expect(try object.read(0, 20000) == model)
        }
    }

    @Test func sparseWriteLeavesAuthenticatedHoles() throws {
        let object = try ScratchObject()
        let tail = randomBytes(5000, seed: 9)
        let offset: UInt64 = 10 << 30
        try object.write(tail, at: offset)
        #expect(object.header.size == offset + 5000)
        #expect(object.header.holes.ranges.count == 1)
        #expect(try object.read(0, 8192) == [UInt8](repeating: 0, count: 8192))
        #expect(try object.read(offset, 5000) == tail)
    }

    @Test func shrinkThenGrowReadsZerosNotOldData() throws {
        let object = try ScratchObject()
        try object.write([UInt8](repeating: 0xAB, count: 10000), at: 0)
        let file = try object.reopen()
        try file.resize(to: 100)
        try file.resize(to: 10000)
        try file.commit(header: &object.header)
        let back = try object.read(0, 10000)
        #expect(back[0..<100].allSatisfy { $0 == 0xAB })
        #expect(back[100...].allSatisfy { $0 == 0 })
    }

    @Test func growByWritePastEndZeroFillsGap() throws {
        let object = try ScratchObject()
        try object.write([1, 2, 3], at: 0)
        try object.write([9], at: 10000)
        var expected = [UInt8](repeating: 0, count: 10001)
        expected[0...2] = [1, 2, 3]
        expected[10000] = 9
        #expect(try object.read(0, 20000) == expected)
    }

    @Test func failedCommitKeepsItsDataForTheNextFlush() throws {
        let object = try ScratchObject()
        try object.write(randomBytes(20000, seed: 5), at: 0)
        // A backing file the commit cannot write through: every pwrite and ftruncate fails (EPERM,
        // as on ENOSPC or EIO), reads work. A write-sealed copy in memory; a read-only descriptor
        // would fail with EBADF, which only a descriptor bug can cause and so traps.
        let sealed = try sealedCopy(of: object.backingBytes)
        let file = ExtentFile(backing: SharedDescriptor(sealed), journal: object.journalFD, key: object.key,
                              header: try HeaderSlots.scratch.read(fd: object.fd.descriptor, key: object.key), slots: .scratch)
        let patch = randomBytes(5000, seed: 6)
        try patch.withUnsafeBytes { try file.write(offset: 1000, data: $0) }
        var header = object.header
        #expect(throws: StoreError.self) { try file.commit(header: &header) }
        #expect(file.hasUncommittedChanges)
        #expect(try file.read(offset: 1000, count: 5000) == patch)
    }

    @Test func manySeparateHolesOverflowIntoStoredZeros() throws {
        let object = try ScratchObject()
        // 300 one-byte islands 8 extents apart: far more hole ranges than one header slot holds.
        let file = try object.reopen()
        for i in 0..<300 { try [UInt8(i & 0xff | 1)].withUnsafeBytes { try file.write(offset: UInt64(i * 8 * 4096), data: $0) } }
        try file.commit(header: &object.header)
        #expect(object.header.fits())
        let back = try object.read(0, 300 * 8 * 4096)
        for i in 0..<300 { #expect(back[i * 8 * 4096] == UInt8(i & 0xff | 1)) }
        #expect(back.enumerated().allSatisfy { $0.offset % (8 * 4096) == 0 || $0.element == 0 })
    }

    @Test func rewriteUsesFreshNonce() throws {
        let object = try ScratchObject()
        let data = randomBytes(4096, seed: 3)
        try object.write(data, at: 0)
        let first = Array(object.backingBytes[4096..<(4096 + 16)])
        try object.write(data, at: 0)
        let second = Array(object.backingBytes[4096..<(4096 + 16)])
        #expect(first != second)
    }
}

/// Every tampering class must read as EIO for the affected range, and nothing else.
@Suite struct TamperTests {
    static let extent = 4096
    static let stride = 4096 + 32

    func threeExtentObject() throws -> (ScratchObject, [UInt8]) {
        let object = try ScratchObject()
        let data = randomBytes(3 * Self.extent, seed: 42)
        try object.write(data, at: 0)
        return (object, data)
    }

    func expectOnlyMiddleExtentFails(_ object: ScratchObject, _ data: [UInt8]) throws {
        #expect(try object.read(0, Self.extent) == Array(data[0..<Self.extent]))
        #expect(try object.read(UInt64(2 * Self.extent), Self.extent) == Array(data[(2 * Self.extent)...]))
        expectIntegrityError { try object.read(UInt64(Self.extent), 1) }
        expectIntegrityError { try object.read(UInt64(Self.extent), Self.extent) }
    }

    @Test(arguments: [0, 16, 100, 4096 + 32 - 1]) // nonce, ciphertext, last tag byte
    func bitFlipInExtent(offsetInStored: Int) throws {
        let (object, data) = try threeExtentObject()
        var bytes = object.backingBytes
        bytes[4096 + Self.stride + offsetInStored] ^= 0x01
        object.backingBytes = bytes
        try expectOnlyMiddleExtentFails(object, data)
    }

    @Test func zeroedExtent() throws {
        let (object, data) = try threeExtentObject()
        var bytes = object.backingBytes
        let start = 4096 + Self.stride
        bytes.replaceSubrange(start..<(start + Self.stride), with: [UInt8](repeating: 0, count: Self.stride))
        object.backingBytes = bytes
        try expectOnlyMiddleExtentFails(object, data)
    }

    @Test func swappedExtentsWithinFile() throws {
        let (object, _) = try threeExtentObject()
        var bytes = object.backingBytes
        let a = 4096, b = 4096 + Self.stride
        let first = Array(bytes[a..<(a + Self.stride)])
        bytes.replaceSubrange(a..<(a + Self.stride), with: bytes[b..<(b + Self.stride)])
        bytes.replaceSubrange(b..<(b + Self.stride), with: first)
        object.backingBytes = bytes
        expectIntegrityError { try object.read(0, 1) }
        expectIntegrityError { try object.read(UInt64(Self.extent), 1) }
        #expect(try object.read(UInt64(2 * Self.extent), 1).count == 1)
    }

    @Test func extentCopiedFromAnotherFile() throws {
        let (object, data) = try threeExtentObject()
        let other = try ScratchObject(key: object.key)
        try other.write(randomBytes(3 * Self.extent, seed: 7), at: 0)
        var bytes = object.backingBytes
        let start = 4096 + Self.stride
        bytes.replaceSubrange(start..<(start + Self.stride), with: other.backingBytes[start..<(start + Self.stride)])
        object.backingBytes = bytes
        try expectOnlyMiddleExtentFails(object, data)
    }

    @Test func truncatedByOneExtent() throws {
        let (object, data) = try threeExtentObject()
        object.backingBytes = Array(object.backingBytes.dropLast(Self.stride))
        #expect(try object.read(0, 2 * Self.extent) == Array(data[0..<(2 * Self.extent)]))
        expectIntegrityError { try object.read(UInt64(2 * Self.extent), 1) }
    }

    @Test func truncatedMidExtent() throws {
        let (object, data) = try threeExtentObject()
        object.backingBytes = Array(object.backingBytes.dropLast(10))
        #expect(try object.read(0, Self.extent) == Array(data[0..<Self.extent]))
        expectIntegrityError { try object.read(UInt64(2 * Self.extent), 1) }
    }

    @Test func zeroedRegionIsNotAHole() throws {
        let object = try ScratchObject()
        try object.write([UInt8](repeating: 7, count: Self.extent), at: 0)
        var bytes = object.backingBytes
        bytes.replaceSubrange(4096..., with: [UInt8](repeating: 0, count: bytes.count - 4096))
        object.backingBytes = bytes
        expectIntegrityError { try object.read(0, 1) }
    }

    /// An object whose two slots both hold a version (size 0, then `size`), and the byte offset of
    /// the newest slot.
    func twoVersionObject(size: Int = 3) throws -> (ScratchObject, newest: Int) {
        let object = try ScratchObject()
        try object.write(randomBytes(size, seed: 11), at: 0) // sequence 1: both slots in use now
        let newest = HeaderCodec.slotIndex(sequence: object.header.sequence) * ExtentGeometry.headerSlotBytes
        return (object, newest)
    }

    /// Changes body byte `at` of the slot starting at `slot` and recomputes the slot's unkeyed
    /// checksum, as someone without the key can: only the MAC can tell the forgery.
    func forge(_ bytes: inout [UInt8], slot: Int, at: Int, _ change: (inout UInt8) -> Void) {
        change(&bytes[slot + at])
        let length = Int(bytes[slot + 6]) | Int(bytes[slot + 7]) << 8
        let macEnd = slot + length + ObjectHeader.macBytes
        bytes.replaceSubrange(macEnd..<(macEnd + ObjectHeader.checksumBytes),
                              with: OpenSSL.sha256(Array(bytes[slot..<macEnd])).prefix(ObjectHeader.checksumBytes))
    }

    /// The newest slot torn (its checksum fails): after an unclean end in its epoch the older slot
    /// stands in; with no unclean end on record the damage cannot be a torn write, so EIO.
    @Test func headerWithNewestSlotTornFallsBackToTheOlderOnlyAfterAnUncleanEnd() throws {
        let (object, newest) = try twoVersionObject()
        var bytes = object.backingBytes
        bytes[newest + 48] ^= 0x01 // no checksum recomputed: what a torn write leaves
        object.backingBytes = bytes
        #expect(HeaderCodec.open(slot: bytes[newest..<(newest + ExtentGeometry.headerSlotBytes)], key: nil) == .damaged)
        expectIntegrityError { _ = try object.reopen() }
        let afterCrash = HeaderSlots(epoch: 2, evidence: TornWriteEvidence(lastUncleanEpoch: HeaderSlots.scratch.epoch),
                                     storeVersion: ObjectHeader.newestVersion)
        let older = try afterCrash.read(fd: object.fd.descriptor, key: object.key)
        #expect(older.size == 0 && older.sequence == 0)
    }

    /// The newest slot forged with a valid checksum (here: a larger size): the MAC refuses it, and
    /// the reader either falls back to the older slot or fails, never serving the forged size.
    @Test func headerWithOneSlotForgedFallsBackOrFails() throws {
        let (object, newest) = try twoVersionObject()
        var bytes = object.backingBytes
        forge(&bytes, slot: newest, at: 48) { $0 = 0xff } // low byte of the plaintext size: 3 -> 255
        object.backingBytes = bytes
        let slot = bytes[newest..<(newest + ExtentGeometry.headerSlotBytes)]
        guard case .valid(let unkeyed) = HeaderCodec.open(slot: slot, key: nil) else {
            Issue.record("the forged slot does not pass the unkeyed checks: the test proves nothing")
            return
        }
        #expect(unkeyed.size == 255)
        #expect(HeaderCodec.open(slot: slot, key: object.key) == .forged)
        do {
            let reopened = try object.reopen()
            #expect(reopened.size == 0, "served size \(reopened.size) from a forged slot")
        } catch {
            #expect(isIntegrityError(error), "\(error)")
        }
    }

    /// A header field flipped with the checksum recomputed: caught by the MAC, not the checksum.
    /// Both slots forged: nothing to fall back to, so the header fails authentication.
    @Test func headerFieldFlipFailsAuthentication() throws {
        let (object, _) = try twoVersionObject()
        var bytes = object.backingBytes
        for slot in [0, ExtentGeometry.headerSlotBytes] { forge(&bytes, slot: slot, at: 48) { $0 ^= 0x01 } }
        object.backingBytes = bytes
        for slot in [0, ExtentGeometry.headerSlotBytes] {
            let image = bytes[slot..<(slot + ExtentGeometry.headerSlotBytes)]
            if case .valid = HeaderCodec.open(slot: image, key: nil) {} else { Issue.record("slot at \(slot) fails the checksum: the MAC is not what is tested") }
            #expect(HeaderCodec.open(slot: image, key: object.key) == .forged)
        }
        #expect {
            _ = try object.reopen()
        } throws: { error in
            guard case FormatError.integrity(let what) = error else { return false }
            return what.contains("authentication")
        }
    }

    @Test func wrongKeyCannotOpenHeader() throws {
        let object = try ScratchObject()
        try object.write([1, 2, 3], at: 0)
        let other = try MasterKey(raw: (1...64).map { UInt8($0 ^ 0xff) })
        expectIntegrityError { _ = try HeaderSlots.scratch.read(fd: object.fd.descriptor, key: other) }
    }
}
