import Foundation
import Testing
@testable import EncCore
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

@Suite struct BackingCapabilitiesTests {
    static func directory() throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("probe-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// The test machine's temporary directory is a local Linux filesystem: every capability is
    /// there, the probe leaves nothing behind, and the directory's times are as before.
    @Test func probeOfALocalDirectoryFindsEverythingAndLeavesNoTrace() throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var times = [timespec(tv_sec: 1_000_000, tv_nsec: 5), timespec(tv_sec: 2_000_000, tv_nsec: 7)]
        #expect(utimensat(AT_FDCWD, dir, &times, 0) == 0)
        let found = try BackingCapabilities.probe(storePath: dir)
        #expect(found.present == Set(BackingCapabilities.Capability.allCases), "\(found)")
        #expect(found.refusal == nil)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).isEmpty)
        var st = stat()
        #expect(stat(dir, &st) == 0 && st.st_mtim.tv_sec == 2_000_000 && st.st_mtim.tv_nsec == 7)
    }

    @Test func aStaleProbeDirectoryIsRemovedByTheNextProbe() throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let stale = dir + "/.probe-0123456789abcdef"
        try FileManager.default.createDirectory(atPath: stale, withIntermediateDirectories: false)
        _ = FileManager.default.createFile(atPath: stale + "/a", contents: Data("x".utf8))
        _ = try BackingCapabilities.probe(storePath: dir)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).isEmpty)
    }

    @Test func requiredCapabilitiesRefuseAndLockScopesWarn() {
        var c = BackingCapabilities(present: Set(BackingCapabilities.Capability.allCases).subtracting([.lock]),
                                    filesystemType: "fuse.x", lockScope: .unknown)
        #expect(c.refusal?.contains("ofd-lock") == true)
        #expect(c.lockWarning != nil)
        c.present.insert(.lock)
        c.present.remove(.renameExchange)
        #expect(c.refusal == nil && c.needsNamespaceLock)
        #expect(BackingCapabilities.lockScope(of: "fuse.sshfs") == .thisHostOnly)
        #expect(BackingCapabilities.lockScope(of: "fuse.glusterfs") == .allClients)
        #expect(BackingCapabilities.lockScope(of: "ext4") == .thisMachine)
        #expect(BackingCapabilities.local.lockWarning == nil && !BackingCapabilities.local.needsNamespaceLock)
    }

    @Test func statusReplyCarriesTheCapabilities() throws {
        var status = ControlProtocol.StatusArgument()
        status.pid = 42
        let found = BackingCapabilities(present: [.fdatasync, .lock, .stableInodes], filesystemType: "fuse.glusterfs", lockScope: .allClients)
        status.report(found)
        let decoded = try #require(ControlProtocol.StatusArgument.decode(status.encoded()))
        #expect(decoded.capabilities == found)
        #expect(decoded.pid == 42)
        #expect(ControlProtocol.StatusArgument.decode(ControlProtocol.StatusArgument().encoded())?.capabilities == nil)
    }

    /// The status ioctl's bits are the cases' places (bit i: `Capability.allCases[i]`), as older
    /// `encfsd status` binaries read them.
    @Test func eachCapabilityBitIsItsPlaceAmongTheCases() {
        for (i, c) in BackingCapabilities.Capability.allCases.enumerated() {
            #expect(BackingCapabilities.bit(c) == 1 << UInt32(i), "\(c)")
        }
        #expect(BackingCapabilities.local.bits == 1 << UInt32(BackingCapabilities.Capability.allCases.count) - 1)
    }

    @Test func exchangeRecordsRoundTripAndOddOnesAreRefused() {
        let record = ExchangeRecord(firstDirectory: [], first: Array("a".utf8), secondDirectory: [Array("d".utf8), [0xff, 0x00]],
                                    second: Array("b".utf8), temporary: ExchangeRecord.newTemporaryName())
        #expect(ExchangeRecord.decode(record.encoded()) == record)
        var other = record
        other.temporary = Array("not-reserved".utf8)
        #expect(ExchangeRecord.decode(other.encoded()) == nil)
        #expect(ExchangeRecord.decode(Array("encfsd-exchange 2\n\n61\n\n62\n\n".utf8)) == nil)
        #expect(ExchangeRecord.decode(Array(String(decoding: record.encoded(), as: UTF8.self).dropLast().utf8)) == nil)
    }
}
