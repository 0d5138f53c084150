import EncKeys
import EncCrypto
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// `RENAME_EXCHANGE` on a backing that lacks it (FUSE passthroughs, sshfs, GlusterFS): three
/// plain renames through a reserved temporary name, made crash-safe by an intent record in
/// `.journal` (FORMAT.md 2.6).
///
/// 1. write the record (both directories' backing paths, both names, the temporary name),
///    fsync it and `.journal`;
/// 2. rename `first` to `temporary` (in the first directory); fsync that directory;
/// 3. rename `second` to `first`; fsync both directories;
/// 4. rename `temporary` to `second`; fsync both directories;
/// 5. unlink the record.
///
/// Each rename is durable before the next is issued, so a power loss leaves one of four states,
/// and recovery (`complete`) finishes the exchange from each: both names in place (not begun, or
/// done); `temporary` and `second` (after 2); `temporary` and `first` (after 3). Both objects'
/// headers already bind both names (Volume.rename adds the bindings before), so either outcome
/// authenticates. The record is durable before the first rename, so no state with an object at
/// the temporary name lacks the record that says where it goes. Paths stay valid until recovery
/// because every namespace change runs under the volume's namespace lock while such a fallback
/// is in use, and nothing changes the store between a crash and the next mount's recovery.
struct ExchangeRecord: Equatable {
    /// Records in `.journal` (shadows there are named by 32 hex digits, never like this).
    static let recordPrefix: [UInt8] = Array("xc-".utf8)
    /// The reserved temporary name in the first directory while the exchange is under way.
    static let temporaryPrefix: [UInt8] = Array(".xc-".utf8)
    static let magic = "encfsd-exchange 1"
    static let sizeLimit = 64 * 1024

    /// Backing names from the store root down to each directory (empty: the root).
    var firstDirectory: [[UInt8]]
    var first: [UInt8]
    var secondDirectory: [[UInt8]]
    var second: [UInt8]
    var temporary: [UInt8]

    static func isTemporaryName(_ name: [UInt8]) -> Bool { name.starts(with: temporaryPrefix) }

    static func newTemporaryName() -> [UInt8] { temporaryPrefix + Array(Hex.encode(OpenSSL.random(count: 8)).utf8) }

    /// Text, one field a line, each name in hex: names are arbitrary bytes in principle.
    func encoded() -> [UInt8] {
        func path(_ p: [[UInt8]]) -> String { p.map { Hex.encode($0) }.joined(separator: "/") }
        let lines = [Self.magic, path(firstDirectory), Hex.encode(first), path(secondDirectory), Hex.encode(second), Hex.encode(temporary)]
        return Array((lines.joined(separator: "\n") + "\n").utf8)
    }

    /// Parses a record from the store; nil for anything encfsd would not have written.
    static func decode(_ bytes: [UInt8]) -> ExchangeRecord? {
        let lines = String(decoding: bytes, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        guard lines.count == 7, lines[0] == magic, lines[6].isEmpty else { return nil }
        func name(_ s: String) -> [UInt8]? { Hex.decode(s).flatMap { $0.isEmpty ? nil : $0 } }
        func path(_ s: String) -> [[UInt8]]? {
            if s.isEmpty { return [] }
            let parts = s.split(separator: "/", omittingEmptySubsequences: false).map { name(String($0)) }
            return parts.contains(where: { $0 == nil }) ? nil : parts.map { $0! }
        }
        guard let d1 = path(lines[1]), let n1 = name(lines[2]), let d2 = path(lines[3]), let n2 = name(lines[4]),
              let t = name(lines[5]), isTemporaryName(t) else { return nil }
        return ExchangeRecord(firstDirectory: d1, first: n1, secondDirectory: d2, second: n2, temporary: t)
    }

    /// Runs the whole sequence. `firstFD` and `secondFD` are the two directories (any
    /// descriptor of them; O_PATH is enough). On an error before the second rename nothing has
    /// changed; after it, the exchange is completed here or, failing that, at the next mount.
    func perform(journalFD: borrowing FileDescriptor, firstFD: borrowing FileDescriptor, secondFD: borrowing FileDescriptor) throws {
        let recordName = Self.recordPrefix + Array(Hex.encode(OpenSSL.random(count: 8)).utf8)
        let file = try journalFD.createEntry(recordName, mode: 0o600)
        do {
            let bytes = encoded()
            _ = try bytes.withUnsafeBytes { try file.pwrite($0, offset: 0) }
            try file.fsync()
            try Self.syncDirectory(journalFD)
        } catch {
            try? journalFD.unlinkAt(recordName)
            throw error
        }
        FaultPoints.reach(.exchangeRecorded)
        do {
            try firstFD.renameAt(first, firstFD, temporary)
            try Self.syncDirectory(firstFD)
        } catch {
            try? firstFD.renameAt(temporary, firstFD, first)
            try? journalFD.unlinkAt(recordName)
            throw error
        }
        FaultPoints.reach(.exchangeFirstMoved)
        try complete(firstFD: firstFD, secondFD: secondFD)
        try? journalFD.unlinkAt(recordName)
    }

    /// Finishes an exchange from whichever of its states the directories are in.
    func complete(firstFD: borrowing FileDescriptor, secondFD: borrowing FileDescriptor) throws {
        func exists(_ dir: borrowing FileDescriptor, _ name: [UInt8]) throws -> Bool {
            do { _ = try dir.fstatAt(name); return true } catch StoreError.system(ENOENT) { return false }
        }
        guard try exists(firstFD, temporary) else { return } // not begun, or already done
        if try !exists(firstFD, first) {
            guard try exists(secondFD, second) else {
                throw StoreError.integrity("an interrupted exchange finds neither of its names; the object stays at \(String(decoding: temporary, as: UTF8.self))")
            }
            try secondFD.renameAt(second, firstFD, first)
            try Self.syncDirectory(firstFD)
            try Self.syncDirectory(secondFD)
            FaultPoints.reach(.exchangeSecondMoved)
        }
        guard try !exists(secondFD, second) else {
            throw StoreError.integrity("an interrupted exchange finds both names taken; the object stays at \(String(decoding: temporary, as: UTF8.self))")
        }
        try firstFD.renameAt(temporary, secondFD, second)
        try Self.syncDirectory(secondFD)
        try Self.syncDirectory(firstFD)
    }

    static func syncDirectory(_ dir: borrowing FileDescriptor) throws {
        let fd = try dir.listingDescriptor()
        try fd.fsync()
    }

    /// Completes every exchange recorded in `.journal` (at mount and in fsck, before any lookup).
    /// A record that cannot be read or acted on is reported and kept for fsck.
    static func recoverAll(journalFD: borrowing FileDescriptor, storeFD: borrowing FileDescriptor) throws {
        var completed = false
        for entry in try journalFD.listDirectory() where !entry.isDirectory && entry.name.starts(with: recordPrefix) {
            let shown = String(decoding: entry.name, as: UTF8.self)
            do {
                guard let record = decode(try journalFD.readEntry(entry.name, limit: sizeLimit)) else {
                    throw StoreError.integrity("not an exchange record encfsd writes")
                }
                try withDirectory(storeFD, record.firstDirectory[...]) { first in
                    try withDirectory(storeFD, record.secondDirectory[...]) { second in try record.complete(firstFD: first, secondFD: second) }
                }
                try journalFD.unlinkAt(entry.name)
                completed = true
                Diagnostics.report("completed an interrupted exchange (\(shown))")
            } catch {
                Diagnostics.report("cannot complete the interrupted exchange .journal/\(shown): \(error)")
            }
        }
        if completed { try syncDirectory(journalFD) }
    }

    /// Runs `body` on the directory at `path` below the store root, each step through the store boundary.
    private static func withDirectory(_ dir: borrowing FileDescriptor, _ path: ArraySlice<[UInt8]>,
                                      _ body: (borrowing FileDescriptor) throws -> Void) throws {
        guard let component = path.first else { return try body(dir) }
        try withDirectory(try dir.openEntry(component, .directory, .path), path.dropFirst(), body)
    }
}
