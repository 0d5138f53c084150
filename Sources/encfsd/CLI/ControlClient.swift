import ArgumentParser
import EncCore
import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Sends control ioctls to the daemon through a path inside the mount, as fscryptctl drives
/// the kernel. Failures print xfs_io's wording ("Error removing encryption key: <strerror>"),
/// so transcripts read the same as the kernel's.
enum ControlClient {
    static func call(_ path: String, _ command: UInt32, _ argument: [UInt8], failure: String) throws -> [UInt8] {
        // O_NONBLOCK: the path may be a FIFO (whose open would wait for a writer) or a device.
        let number = Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
        guard number >= 0 else { throw CLIError("\(path): \(String(cString: strerror(errno)))") }
        let fd = FileDescriptor(taking: number)
        var buffer = argument
        do {
            try fd.ioctl(UInt(command), &buffer)
        } catch StoreError.system(let code) {
            if code == ENOTTY { throw CLIError("\(path) is not on an encfsd mount") }
            throw CLIError("\(failure): \(String(cString: strerror(code)))")
        }
        return buffer
    }
}

struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Prints `CLIError`s as the bare message (no "Error: " prefix), exit status 1.
func reportingErrors(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let error as CLIError {
        FileHandle.standardError.write(Data((error.description + "\n").utf8))
        throw ExitCode.failure
    }
}
