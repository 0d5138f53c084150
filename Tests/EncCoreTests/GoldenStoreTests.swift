import Foundation
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat

/// Every release must still open the stores earlier format versions wrote. Each
/// `Tests/Golden/v<N>` holds a store made through a real mount by that version's build
/// (`scripts/make-golden-store.sh`) and a manifest of what it contains.
@Suite struct GoldenStoreTests {
    static let goldenRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Golden")

    struct Manifest: Decodable {
        struct FileEntry: Decodable { let sha256: String; let size: Int }
        let files: [String: FileEntry]
        let symlinks: [String: String]
        let fifos: [String]
        let modes: [String: UInt32]
        /// A store left half way through a rekey to a second key (bytes 65 to 128), which the
        /// test adds too: every file must read with both keys present.
        let secondKey: String?
        let rekeyedTo: String?
        /// Path -> xattr name -> value (hex); some of them live in a side object.
        let xattrs: [String: [String: String]]?
        /// Path -> FS_IOC_GETFLAGS flags (FS_ENCRYPT_FL aside).
        let inodeFlags: [String: UInt32]?
        /// The store's features, which the test checks it really has.
        let features: [String]?
    }

    static var versions: [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: goldenRoot.path)) ?? []).filter { $0.hasPrefix("v") }.sorted()
    }

    @Test func everyFormatVersionHasAGoldenStore() {
        #expect(Self.versions.contains("v\(StoreConfig.currentVersion)"))
    }

    @Test(arguments: versions)
    func opensGoldenStore(version: String) throws {
        let source = Self.goldenRoot.appendingPathComponent(version)
        let manifest = try JSONDecoder().decode(Manifest.self, from: Data(contentsOf: source.appendingPathComponent("manifest.json")))
        // A copy: the volume opens headers read-write, and the checked-in store must never change.
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("golden-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: work) }
        try FileManager.default.copyItem(at: source.appendingPathComponent("store"), to: work)

        let keys = KeyTable()
        try keys.add(try MasterKey(raw: (1...64).map { UInt8($0) }), claim: .init(uid: 0, serial: 0))
        if manifest.secondKey != nil {
            try keys.add(try MasterKey(raw: (65...128).map { UInt8($0) }), claim: .init(uid: 0, serial: 0))
        }
        let volume = try Volume(storePath: work.path, keys: keys)
        if let features = manifest.features { #expect(volume.config.features == features, "\(version)") }
        if let rekeyedTo = manifest.rekeyedTo {
            // Really half way: the record is there and the root already names the new key.
            #expect(volume.rekeys.active.map(\.to.hex) == [rekeyedTo], "\(version)")
        }

        func resolve(_ path: String) throws -> UInt64 {
            try path.split(separator: "/").reduce(Volume.rootID) { parent, component in
                try volume.lookup(parent: parent, name: Array(component.utf8)).0
            }
        }

        for (path, expected) in manifest.files {
            let node = try resolve(path)
            let handle = try volume.open(node, truncate: false)
            let data = try volume.read(handle: handle, offset: 0, count: expected.size + 1)
            try volume.release(handle: handle)
            #expect(data.count == expected.size, "\(version) \(path)")
            #expect(Hex.encode(OpenSSL.sha256(data)) == expected.sha256, "\(version) \(path)")
        }
        for (path, target) in manifest.symlinks {
            #expect(try volume.readlink(resolve(path)) == Array(target.utf8))
        }
        for path in manifest.fifos {
            #expect(try volume.getattr(resolve(path)).mode & 0o170000 == ObjectType.fifo.formatBits)
        }
        for (path, mode) in manifest.modes {
            #expect(try volume.getattr(resolve(path)).mode & 0o7777 == mode, "\(version) \(path)")
        }
        for (path, attributes) in manifest.xattrs ?? [:] {
            let node = try resolve(path)
            for (name, value) in attributes {
                #expect(try Hex.encode(#require(try volume.getxattr(node, name: Array(name.utf8)))) == value, "\(version) \(path) \(name)")
            }
            let names = try Set(volume.listxattr(node, includeTrusted: false).map { String(decoding: $0, as: UTF8.self) })
            #expect(names == Set(attributes.keys), "\(version) \(path)")
        }
        for (path, flags) in manifest.inodeFlags ?? [:] {
            #expect(try volume.inodeFlags(of: resolve(path)).rawValue == flags, "\(version) \(path)")
        }
        let listed = try volume.list(volume.node(Volume.rootID)).map { String(decoding: $0.name, as: UTF8.self) }
        let expectedTop = Set(manifest.files.keys.map { String($0.split(separator: "/")[0]) })
            .union(manifest.symlinks.keys).union(manifest.fifos).union([".", ".."])
        #expect(Set(listed) == expectedTop)
    }
}
