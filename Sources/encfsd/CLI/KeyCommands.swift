import ArgumentParser
import EncCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

struct KeyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "key", abstract: "Generate master keys and manage the keys of a mounted store.",
        subcommands: [KeyGenerate.self, KeyAdd.self])
}

struct KeyGenerate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate", abstract: "Write 64 random bytes from OpenSSL's CSPRNG, for use as a master key.")

    @Option(name: .shortAndLong, help: "File to create (mode 0600); standard output when omitted.")
    var output: String?

    func run() throws {
        var key = OpenSSL.random(count: MasterKey.maximumCount)
        defer { key.withUnsafeMutableBytes { OpenSSL.cleanse($0) } }
        guard let output else {
            FileHandle.standardOutput.write(Data(key))
            return
        }
        let fd = Glibc.open(output, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CLIError("cannot create \(output): \(String(cString: strerror(errno)))") }
        defer { Glibc.close(fd) }
        let written = key.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard written == key.count, fsync(fd) == 0 else { throw CLIError("cannot write \(output)") }
    }
}

struct KeyAdd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "add", abstract: "Unlock a mounted store (or a directory policy in it) with a master key.")

    @Argument(help: "The mountpoint, or any directory inside the mount.")
    var mountpoint: String

    @Option(name: .long, help: "File holding the raw key (16 to 64 bytes); standard input when omitted.")
    var keyFile: String?

    func run() throws {
        var raw = try KeyMaterial.read(path: keyFile)
        defer { raw.withUnsafeMutableBytes { OpenSSL.cleanse($0) } }
        let argument = ControlProtocol.AddKeyArgument(source: .raw, raw: raw)
        let reply = try ControlClient.call(mountpoint, ControlProtocol.addKey, argument.encoded(), what: "adding encryption key")
        guard let decoded = ControlProtocol.AddKeyArgument.decode(reply), let identifier = KeyIdentifier(bytes: decoded.identifier) else {
            throw CLIError("the daemon's reply was malformed")
        }
        print("Added encryption key with identifier \(identifier.hex)")
    }
}

/// Sends control ioctls to the daemon through a directory of the mount.
enum ControlClient {
    static func call(_ path: String, _ command: UInt32, _ argument: [UInt8], what: String) throws -> [UInt8] {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CLIError("\(path): \(String(cString: strerror(errno)))") }
        defer { Glibc.close(fd) }
        var buffer = argument
        do {
            try Sys.ioctl(fd, UInt(command), &buffer)
        } catch StoreError.system(let code) {
            if code == ENOTTY { throw CLIError("\(path) is not on an encfsd mount") }
            throw CLIError("Error \(what): \(String(cString: strerror(code)))")
        }
        return buffer
    }
}
