import Foundation
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat

/// A write that bypasses the page cache reports whether a read or a cached write was answered since
/// the last such write: the only case in which the kernel may cache pages older than it.
@Suite struct DirectWriteMarkTests {
    static let key = try! MasterKey(raw: (1...64).map { UInt8($0) })
    let caller = Caller(uid: 0, gid: 0)
    let base = FileManager.default.temporaryDirectory.path + "/encfsd-direct-mark-\(UUID().uuidString)"

    @Test func theMarkIsTakenByTheNextDirectWriteOnly() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        let store = base + "/store"
        try StoreCreation.create(at: store, key: Self.key, extentSize: 4096, owner: caller)
        let keys = KeyTable()
        _ = try keys.add(Self.key, claim: .init(uid: 0, serial: 0))
        let volume = try Volume(storePath: store, keys: keys)
        defer { volume.closeCleanly() }
        let (_, _, handle) = try volume.create(parent: Volume.rootID, name: Array("f".utf8), mode: 0o644, caller: caller)
        func write(direct: Bool) throws -> Bool {
            try Array(repeating: UInt8(7), count: 4096).withUnsafeBytes {
                try volume.write(handle: handle, offset: 0, data: $0, bypassesPageCache: direct)
            }
        }
        // A cached write marks; the direct write after it takes the mark, the next finds none.
        #expect(try write(direct: false) == false)
        #expect(try write(direct: true) == true)
        #expect(try write(direct: true) == false)
        // So does a read, whatever range the direct write then covers.
        _ = try volume.read(handle: handle, offset: 0, count: 100)
        #expect(try write(direct: true) == true)
        #expect(try write(direct: true) == false)
        try volume.release(handle: handle)
    }
}
