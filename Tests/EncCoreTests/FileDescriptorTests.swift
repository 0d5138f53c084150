import Foundation
import Testing
@testable import EncCore
#if canImport(Glibc)
import Glibc
#endif

/// A descriptor is a value with one owner: closed when that owner lets go, never before, and a
/// call on a descriptor that is not open traps instead of acting on whatever file has its number.
@Suite struct FileDescriptorTests {
    /// What `/proc/self/fd/N` names now, or nil when N is not open. A number another test's file
    /// took since names that file, never the scratch path, so the checks below hold whatever runs
    /// in parallel.
    static func target(of number: Int32) -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/fd/\(number)", &buffer, buffer.count - 1)
        return n < 0 ? nil : String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func scratchFile() throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("enccore-fd-\(UUID().uuidString)").path
        #expect(FileManager.default.createFile(atPath: path, contents: Data([1, 2, 3])))
        return path
    }

    @Test func deinitClosesTheDescriptor() throws {
        let path = try Self.scratchFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var number: Int32 = -1
        do {
            let fd = try openPath(path, O_RDONLY)
            // The test reads the number only to look it up in /proc after the owner is gone.
            number = fd.withUnsafeNumber { $0 }
            #expect(Self.target(of: number) == path)
            let size = try fd.fstat().st_size
            #expect(size == 3)
        }
        #expect(Self.target(of: number) != path)
    }

    @Test func sharedDescriptorClosesWithItsLastReference() throws {
        let path = try Self.scratchFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var shared: SharedDescriptor? = SharedDescriptor(try openPath(path, O_RDONLY))
        let number = shared!.descriptor.withUnsafeNumber { $0 }
        var other = shared
        shared = nil
        #expect(Self.target(of: number) == path)
        let size = try other!.descriptor.fstat().st_size
        #expect(size == 3)
        other = nil
        #expect(Self.target(of: number) != path)
    }

    /// A moved descriptor keeps one owner: consuming it into a `SharedDescriptor` does not close it.
    @Test func movingADescriptorKeepsItOpen() throws {
        let path = try Self.scratchFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let fd = try openPath(path, O_RDONLY)
        let number = fd.withUnsafeNumber { $0 }
        let shared = SharedDescriptor(fd)
        #expect(Self.target(of: number) == path)
        var bytes = [UInt8](repeating: 0, count: 3)
        let n = try bytes.withUnsafeMutableBytes { try shared.descriptor.pread($0, offset: 0) }
        #expect(n == 3)
        #expect(bytes == [1, 2, 3])
    }

    /// EBADF can only mean a descriptor bug: the read loop traps on it (as every call does)
    /// rather than throwing an error a caller might carry on from.
    @Test func readingAClosedNumberTraps() async {
        await #expect(processExitsWith: .signal(SIGILL)) {
            let fd = FileDescriptor(taking: Int32.max)
            var byte: UInt8 = 0
            _ = try withUnsafeMutableBytes(of: &byte) { try fd.pread($0, offset: 0) }
        }
    }

    @Test func writingAClosedNumberTraps() async {
        await #expect(processExitsWith: .signal(SIGILL)) {
            let fd = FileDescriptor(taking: Int32.max)
            let byte: UInt8 = 0
            try withUnsafeBytes(of: byte) { try fd.pwrite($0, offset: 0) }
        }
    }
}
