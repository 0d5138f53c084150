import Foundation
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Runs `body` with a fresh store (4 KiB extents, created by `owner` under `key`) in a scratch
/// directory removed afterwards, and a key table holding `key`.
func withScratchStore<R>(_ prefix: String, key: MasterKey, owner: Caller,
                         _ body: (_ store: String, _ keys: KeyTable) throws -> R) throws -> R {
    let base = FileManager.default.temporaryDirectory.path + "/\(prefix)-\(UUID().uuidString)"
    defer { try? FileManager.default.removeItem(atPath: base) }
    try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
    let store = base + "/store"
    try StoreCreation.create(at: store, key: key, extentSize: 4096, owner: owner)
    let keys = KeyTable()
    _ = try keys.add(key, claim: .init(uid: 0, serial: 0))
    return try body(store, keys)
}

/// A scratch backing file holding one object, for driving ExtentFile directly.
final class ScratchObject {
    let directory: String
    let path: String
    let fd: SharedDescriptor
    let journalFD: SharedDescriptor
    let key: MasterKey
    var header: ObjectHeader

    init(extentSize: Int = 4096, key: MasterKey? = nil, keyGroups: Bool = false) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("enccore-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        path = directory + "/object"
        fd = SharedDescriptor(try openPath(path, O_RDWR | O_CREAT, mode: 0o600))
        try FileManager.default.createDirectory(atPath: directory + "/.journal", withIntermediateDirectories: true)
        journalFD = SharedDescriptor(try openPath(directory + "/.journal", O_RDONLY | O_DIRECTORY))
        self.key = try key ?? MasterKey(raw: (1...64).map { UInt8($0) })
        header = ObjectHeader(type: .regular, mode: 0o644, uid: 0, gid: 0, extentSize: UInt32(extentSize),
                              objectID: OpenSSL.random(count: 16), policy: self.key.identifier)
        if keyGroups { header.flags.insert(.keyGroups) }
        try HeaderSlots.scratch.create(fd: fd.descriptor, header: &header, key: self.key)
    }

    deinit { try? FileManager.default.removeItem(atPath: directory) }

    /// A fresh view of the committed file, as a re-open would see it.
    func reopen() throws -> ExtentFile {
        header = try HeaderSlots.scratch.read(fd: fd.descriptor, key: key)
        return ExtentFile(backing: fd, journal: journalFD, key: key, header: header, slots: .scratch)
    }

    func write(_ bytes: [UInt8], at offset: UInt64) throws {
        let file = try reopen()
        try bytes.withUnsafeBytes { try file.write(offset: offset, data: $0) }
        try file.commit(header: &header)
    }

    func read(_ offset: UInt64, _ count: Int) throws -> [UInt8] {
        try reopen().read(offset: offset, count: count)
    }

    var backingBytes: [UInt8] {
        get { Array(FileManager.default.contents(atPath: path)!) }
        // Through the same inode: FileManager.createFile would swap in a new file behind our fd.
        set {
            try! fd.descriptor.ftruncate(Int64(newValue.count))
            try! newValue.withUnsafeBytes { try fd.descriptor.pwrite($0, offset: 0) }
        }
    }
}

func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var state = seed &* 0x9E3779B97F4A7C15 | 1
    return (0..<count).map { _ in
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
    }
}

func isIntegrityError(_ error: any Error) -> Bool {
    if case StoreError.integrity = error { return true }
    if case FormatError.integrity = error { return true }
    return false
}

/// Opens a test's own scratch path (the store opens nothing by path but its root).
func openPath(_ path: String, _ flags: Int32, mode: mode_t = 0) throws -> FileDescriptor {
    let fd = Glibc.open(path, flags | O_CLOEXEC, mode)
    if fd < 0 { throw StoreError.system(errno) }
    return FileDescriptor(taking: fd)
}

/// A file in memory holding `bytes` that refuses every change (memfd sealed against writes,
/// growing and shrinking: EPERM), for a backing whose writes fail.
func sealedCopy(of bytes: [UInt8]) throws -> FileDescriptor {
    // Glibc's module leaves memfd_create out (a _GNU_SOURCE declaration): found at run time.
    typealias MemfdCreate = @convention(c) (UnsafePointer<CChar>, UInt32) -> Int32
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "memfd_create") else { throw StoreError.system(ENOSYS) }
    let number = unsafeBitCast(symbol, to: MemfdCreate.self)("sealed", 0x0001 | 0x0002) // MFD_CLOEXEC | MFD_ALLOW_SEALING
    if number < 0 { throw StoreError.system(errno) }
    let fd = FileDescriptor(taking: number)
    try bytes.withUnsafeBytes { try fd.pwrite($0, offset: 0) }
    let seals: Int32 = 0x0002 | 0x0004 | 0x0008 // F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
    // fcntl(F_ADD_SEALS) has no method: only tests seal files.
    let rc = fd.withUnsafeNumber { fcntl($0, 1033, seals) } // F_ADD_SEALS
    if rc < 0 { throw StoreError.system(errno) }
    return fd
}

/// The `stat` of a test's own scratch path, a symlink not followed.
func statPath(_ path: String) throws -> stat {
    var st = stat()
    if lstat(path, &st) != 0 { throw StoreError.system(errno) }
    return st
}

/// Expects `body` to fail with `StoreError.integrity` (what the mount answers with EIO): not merely
/// with any error, which a missing file or a bad argument would give as well.
func expectIntegrityError<R>(_ comment: Comment? = nil, sourceLocation: SourceLocation = #_sourceLocation,
                             _ body: () throws -> R) {
    let error = #expect(throws: (any Error).self, comment, sourceLocation: sourceLocation) { _ = try body() }
    if let error {
        #expect(isIntegrityError(error), "expected StoreError.integrity, got \(error)", sourceLocation: sourceLocation)
    }
}

extension HeaderSlots {
    /// Slots of a scratch object: epoch 1 of a v2 store with no unclean shutdown on record.
    static let scratch = HeaderSlots(epoch: 1, evidence: .cleanHistory, storeVersion: ObjectHeader.newestVersion)
}
