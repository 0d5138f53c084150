@testable import EncCore
@testable import EncKeys

/// The two keys the in-process rekey tests move a tree between.
enum RekeyTestKeys {
    static let old = try! MasterKey(raw: (1...64).map { UInt8($0) })
    static let new = try! MasterKey(raw: [UInt8](repeating: 0x42, count: 64))

    /// A scratch store under the old key, mounted as a volume with both keys present.
    static func withVolume(_ prefix: String, owner: Caller, _ body: (Volume) throws -> Void) throws {
        try withScratchStore(prefix, key: old, owner: owner) { store, keys in
            _ = try keys.add(new, claim: .init(uid: 0, serial: 0))
            let volume = try Volume(storePath: store, keys: keys)
            defer { volume.closeCleanly() }
            try body(volume)
        }
    }
}
