import Foundation
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat
#if canImport(Glibc)
import Glibc
#endif

@Suite struct StoreLockTests {
    static func directory() throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lock-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// OFD locks conflict between open file descriptions even within one process, so a second
    /// acquire here stands for a second daemon.
    @Test func secondAcquireIsRefusedNamingTheHolderUntilTheFirstGoes() throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var first: StoreLock? = try StoreLock.acquire(storePath: dir)
        #expect(throws: StoreLock.Failure.held(.init(pid: getpid(), host: Self.hostName()))) {
            _ = try StoreLock.acquire(storePath: dir)
        }
        withExtendedLifetime(first) {}
        first = nil
        _ = try StoreLock.acquire(storePath: dir)
    }

    @Test func plantedEntriesAreRefusedAndNotWritten() throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let victim = dir + "/victim"
        _ = FileManager.default.createFile(atPath: victim, contents: Data("keep".utf8))
        let lockPath = dir + "/" + StoreLock.fileName
        try FileManager.default.createSymbolicLink(atPath: lockPath, withDestinationPath: victim)
        #expect(throws: StoreLock.Failure.notRegularFile("a symbolic link")) { _ = try StoreLock.acquire(storePath: dir) }
        try FileManager.default.removeItem(atPath: lockPath)
        #expect(mkfifo(lockPath, 0o600) == 0)
        #expect(throws: StoreLock.Failure.notRegularFile("a FIFO")) { _ = try StoreLock.acquire(storePath: dir) }
        try FileManager.default.removeItem(atPath: lockPath)
        #expect(link(victim, lockPath) == 0)
        #expect(throws: StoreLock.Failure.notRegularFile("a file with other hard links")) { _ = try StoreLock.acquire(storePath: dir) }
        #expect(FileManager.default.contents(atPath: victim) == Data("keep".utf8))
    }

    /// A record planted by an attacker is shown only as printable ASCII.
    @Test func plantedHolderRecordIsSanitised() throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/record"
        _ = FileManager.default.createFile(atPath: path, contents: Data(#"{"pid":7,"host":"evil\u001b[2Jhost"}"#.utf8))
        let fd = try openPath(path, O_RDONLY)
        #expect(StoreLock.readHolder(fd) == .init(pid: 7, host: "evil?[2Jhost"))
        _ = FileManager.default.createFile(atPath: path, contents: Data("not json".utf8))
        let other = try openPath(path, O_RDONLY)
        #expect(StoreLock.readHolder(other) == nil)
    }

    static func hostName() -> String {
        var name = [CChar](repeating: 0, count: 256)
        _ = gethostname(&name, 255)
        return String(decoding: name.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

@Suite struct SizeLimitTests {
    /// The probe finds exactly the largest length the filesystem takes (or the cap, if it takes that).
    @Test func probeFindsTheLargestFile() throws {
        let dir = try StoreLockTests.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fd = try openPath(dir, Sys.oPath | O_DIRECTORY)
        let found = fd.probeLargestFile(upTo: SizeLimit.largestBacking)
        let limit = try #require(found)
        let probe = try openPath(dir + "/probe", O_RDWR | O_CREAT, mode: 0o600)
        try probe.ftruncate(limit)
        if limit < SizeLimit.largestBacking { #expect(throws: StoreError.system(EFBIG)) { try probe.ftruncate(limit + 1) } }
        try probe.ftruncate(0)
    }
}
