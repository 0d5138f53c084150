import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat

/// fallocate's range modes and SEEK_DATA/SEEK_HOLE on ExtentFile, against a byte-array model,
/// and what tampering with a punched file in the store gives.
@Suite struct RangeOperationTests {
    static let extent = 4096

    /// Applies `operation` to the model as ext4 would.
    func apply(_ operation: RangeOperation, offset: Int, length: Int, to model: inout [UInt8]) {
        func zero() {
            let end = min(model.count, offset + length)
            if offset < end { model.replaceSubrange(offset..<end, with: [UInt8](repeating: 0, count: end - offset)) }
        }
        func grow(_ keepSize: Bool) {
            if !keepSize && offset + length > model.count { model += [UInt8](repeating: 0, count: offset + length - model.count) }
        }
        switch operation {
        case .allocate(let keepSize): grow(keepSize)
        case .punchHole: zero()
        case .zeroRange(let keepSize): grow(keepSize); zero()
        case .collapse: model.removeSubrange(offset..<(offset + length))
        case .insert: model.insert(contentsOf: [UInt8](repeating: 0, count: length), at: offset)
        }
    }

    func run(_ operation: RangeOperation, on file: ExtentFile, offset: Int, length: Int) throws {
        let (o, l) = (UInt64(offset), UInt64(length))
        switch operation {
        case .allocate(let keepSize): try file.allocate(offset: o, length: l, keepSize: keepSize)
        case .punchHole: try file.punchHole(offset: o, length: l)
        case .zeroRange(let keepSize): try file.zeroRange(offset: o, length: l, keepSize: keepSize)
        case .collapse: try file.collapseRange(offset: o, length: l)
        case .insert: try file.insertRange(offset: o, length: l)
        }
    }

    @Test(arguments: [1, 2, 3, 4])
    func randomOperationsMatchTheModel(seed: UInt64) throws {
        let object = try ScratchObject()
        var rng = SplitMix(seed: seed)
        var model = randomBytes(20 * Self.extent + 123, seed: seed)
        try object.write(model, at: 0)
        var file = try object.reopen()
        let operations: [RangeOperation] = [.allocate(keepSize: false), .allocate(keepSize: true), .punchHole,
                                            .zeroRange(keepSize: false), .zeroRange(keepSize: true), .collapse, .insert]
        for step in 0..<300 {
            let operation = operations[rng.below(operations.count)]
            let shifting = operation == .collapse || operation == .insert
            var offset = rng.below(model.count + 3 * Self.extent)
            var length = 1 + rng.below(6 * Self.extent)
            if shifting {
                offset -= offset % Self.extent
                length = (1 + rng.below(4)) * Self.extent
            }
            let valid = switch operation {
            case .collapse: offset + length < model.count
            case .insert: offset < model.count
            default: true
            }
            if valid {
                try run(operation, on: file, offset: offset, length: length)
                apply(operation, offset: offset, length: length, to: &model)
            } else {
                #expect(throws: StoreError.invalidArgument) { try run(operation, on: file, offset: offset, length: length) }
            }
            if rng.below(4) == 0 {
                let patch = randomBytes(1 + rng.below(3 * Self.extent), seed: UInt64(step))
                let at = rng.below(model.count + Self.extent)
                try patch.withUnsafeBytes { try file.write(offset: UInt64(at), data: $0) }
                if at > model.count { model += [UInt8](repeating: 0, count: at - model.count) }
                if at + patch.count > model.count { model += [UInt8](repeating: 0, count: at + patch.count - model.count) }
                model.replaceSubrange(at..<(at + patch.count), with: patch)
            }
            #expect(try file.read(offset: 0, count: model.count + 1) == model, "step \(step): \(operation) at \(offset) length \(length)")
            if rng.below(3) == 0 {
                try file.commit(header: &object.header)
                file = try object.reopen()
                #expect(try file.read(offset: 0, count: model.count + 1) == model, "after commit, step \(step)")
            }
        }
    }

    @Test func unalignedShiftsAreRefusedAsExt4Does() throws {
        let object = try ScratchObject()
        try object.write(randomBytes(8 * Self.extent, seed: 1), at: 0)
        let file = try object.reopen()
        for (offset, length) in [(100, Self.extent), (Self.extent, 100), (0, 8 * Self.extent), (8 * Self.extent, Self.extent)] {
            #expect(throws: StoreError.invalidArgument) { try file.collapseRange(offset: UInt64(offset), length: UInt64(length)) }
        }
        #expect(throws: StoreError.invalidArgument) { try file.insertRange(offset: 8 * UInt64(Self.extent), length: UInt64(Self.extent)) }
        #expect(throws: StoreError.invalidArgument) { try file.insertRange(offset: 1, length: UInt64(Self.extent)) }
        #expect(throws: StoreError.fileTooLarge) { try file.insertRange(offset: 0, length: ObjectHeader.maximumSize) }
    }

    @Test func punchedExtentsAreHolesInTheCommittedHeader() throws {
        let object = try ScratchObject()
        let data = randomBytes(10 * Self.extent, seed: 2)
        try object.write(data, at: 0)
        let file = try object.reopen()
        let dropped = try file.punchHole(offset: UInt64(Self.extent + 10), length: UInt64(4 * Self.extent))
        #expect(dropped == 2..<5)
        try file.commit(header: &object.header)
        #expect(try HeaderSlots.scratch.read(fd: object.fd.descriptor, key: object.key).holes.ranges == [2..<5])
        var expected = data
        expected.replaceSubrange((Self.extent + 10)..<(5 * Self.extent + 10), with: [UInt8](repeating: 0, count: 4 * Self.extent))
        #expect(try object.read(0, data.count) == expected)
    }

    @Test func seekFindsDataAndHolesByExtent() throws {
        let object = try ScratchObject()
        try object.write(randomBytes(10 * Self.extent, seed: 3), at: 0)
        let file = try object.reopen()
        try file.punchHole(offset: UInt64(2 * Self.extent), length: UInt64(3 * Self.extent))
        let e = UInt64(Self.extent)
        #expect(try file.seek(from: 0, data: true) == 0)
        #expect(try file.seek(from: 0, data: false) == 2 * e)
        #expect(try file.seek(from: 2 * e + 7, data: true) == 5 * e)
        #expect(try file.seek(from: 3 * e, data: false) == 3 * e)
        #expect(try file.seek(from: 6 * e, data: false) == 10 * e) // the end of the file is a hole
        #expect(throws: StoreError.system(ENXIO)) { try file.seek(from: 10 * e, data: true) }
        try file.resize(to: 20 * e)
        #expect(throws: StoreError.system(ENXIO)) { try file.seek(from: 10 * e, data: true) }
        #expect(try file.seek(from: 9 * e, data: false) == 10 * e)
    }

    /// A store attacker who zeroes a data extent next to a punched range, or cuts the backing file
    /// back into the data, gets EIO for that extent: the hole map says which extents are holes, and
    /// it is authenticated.
    @Test func zeroingOrTruncatingAPunchedFileInTheStoreIsDetected() throws {
        let object = try ScratchObject()
        let data = randomBytes(6 * Self.extent, seed: 4)
        try object.write(data, at: 0)
        let file = try object.reopen()
        try file.punchHole(offset: UInt64(2 * Self.extent), length: UInt64(2 * Self.extent))
        try file.commit(header: &object.header)
        let stride = Self.extent + ExtentGeometry.overheadBytes
        var bytes = object.backingBytes
        let fifth = ExtentGeometry.headerBytes + 4 * stride
        bytes.replaceSubrange(fifth..<(fifth + stride), with: [UInt8](repeating: 0, count: stride))
        object.backingBytes = bytes
        expectIntegrityError { try object.read(UInt64(4 * Self.extent), 1) }
        #expect(try object.read(UInt64(2 * Self.extent), 2 * Self.extent) == [UInt8](repeating: 0, count: 2 * Self.extent))
        #expect(try object.read(0, Self.extent) == Array(data[0..<Self.extent]))

        object.backingBytes = Array(bytes[0..<(ExtentGeometry.headerBytes + 3 * stride)])
        expectIntegrityError { try object.read(UInt64(5 * Self.extent), 1) }
        #expect(try object.read(0, Self.extent) == Array(data[0..<Self.extent]))

        // Neither change touched the authenticated header, which still names exactly the punch.
        #expect(try HeaderSlots.scratch.read(fd: object.fd.descriptor, key: object.key).holes.ranges == [2..<4])
    }

    @Test func overflowingHoleMapStoresAnUncommittedPunchThroughTheJournal() throws {
        let object = try ScratchObject()
        let data = randomBytes(400 * 2 * Self.extent, seed: 5)
        try object.write(data, at: 0)
        let file = try object.reopen()
        // Every other extent punched: far more separate holes than one header slot holds.
        for i in 0..<400 { try file.punchHole(offset: UInt64(2 * i * Self.extent), length: UInt64(Self.extent)) }
        try file.commit(header: &object.header)
        #expect(object.header.fits())
        #expect(object.header.holes.ranges.count < 400)
        let back = try object.read(0, data.count)
        for i in 0..<400 {
            let at = 2 * i * Self.extent
            #expect(back[at..<(at + Self.extent)].allSatisfy { $0 == 0 })
            #expect(Array(back[(at + Self.extent)..<(at + 2 * Self.extent)]) == Array(data[(at + Self.extent)..<(at + 2 * Self.extent)]))
        }
    }
}

/// A small deterministic generator for reproducible operation sequences.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(max(1, n))) }
}
