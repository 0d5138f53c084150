import Testing
@testable import EncCore
@testable import EncKeys

/// A write that bypasses the page cache reports whether a read or a cached write was answered since
/// the last such write: the only case in which the kernel may cache pages older than it.
@Suite struct DirectWriteMarkTests {
    static let key = try! MasterKey(raw: (1...64).map { UInt8($0) })
    let caller = Caller(uid: 0, gid: 0)

    @Test func theMarkIsTakenByTheNextDirectWriteOnly() throws {
        try withScratchStore("encfsd-direct-mark", key: Self.key, owner: caller) { store, keys in
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
}
