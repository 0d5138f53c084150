import ArgumentParser
import EncCore
import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

struct KeyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "key", abstract: "Generate master keys and manage the keys of a mounted store (fscrypt v2 semantics).",
        subcommands: [KeyGenerate.self, KeyAdd.self, KeyRemove.self, KeyStatus.self])
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
        commandName: "add",
        abstract: "Unlock a mounted store, or directories under a policy, with a master key.",
        discussion: """
            The key goes into your user keyring as a `user` key described encfsd:<identifier>:<nonce>, and the \
            daemon loads it from there by serial, reading it with your permissions. Each user's add is a \
            claim on the key; the key stays until every claim is removed.
            """)

    @Argument(help: "The mountpoint, or any directory inside the mount.")
    var mountpoint: String

    @Option(name: .long, help: "File holding the raw key (16 to 64 bytes).")
    var keyFile: String?

    @Option(name: .long, help: "Serial of a `user` key already in the kernel keyring holding the raw key.")
    var keyringId: Int32?

    @Flag(help: "Derive the key from a passphrase (terminal, or standard input), with the store's scrypt parameters.")
    var passphrase = false

    func validate() throws {
        guard [keyFile != nil, keyringId != nil, passphrase].filter({ $0 }).count <= 1 else {
            throw ValidationError("give at most one of --key-file, --keyring-id and --passphrase")
        }
    }

    func run() throws {
        try reportingErrors {
            let placed = keyringId == nil
            let serial = try keyringId ?? placeInKeyring(try rawKey())
            if let keyringId {
                do { try Keyring.grantOwnerRead(keyringId) } catch KeyError.system(let code) {
                    throw CLIError("Error adding encryption key: \(String(cString: strerror(code)))")
                }
            }
            let argument = ControlProtocol.AddKeyArgument(source: .keyring, keyringSerial: serial)
            let reply: [UInt8]
            do {
                reply = try ControlClient.call(mountpoint, ControlProtocol.addKey, argument.encoded(), failure: "Error adding encryption key")
            } catch {
                // The daemon refused it: take back the keyring entry this command made.
                if placed { Keyring.unlinkFromUserKeyring(serial) }
                throw error
            }
            guard let decoded = ControlProtocol.AddKeyArgument.decode(reply), let identifier = KeyIdentifier(bytes: decoded.identifier) else {
                throw CLIError("Error adding encryption key: the daemon's reply was malformed")
            }
            print("Added encryption key with identifier \(identifier.hex)")
        }
    }

    private func rawKey() throws -> SecureBytes {
        if passphrase { return try PassphraseKeys.derive(forMountpoint: mountpoint) }
        return try KeyMaterial.read(path: keyFile)
    }

    private func placeInKeyring(_ raw: SecureBytes) throws -> Int32 {
        let identifier = raw.withBytes { KeyIdentifier(rawKey: $0) }
        do {
            return try raw.withBytes { try Keyring.addUserKey(description: Keyring.description(for: identifier), payload: $0) }
        } catch KeyError.system(let code) {
            throw CLIError("Error adding encryption key: cannot add it to the user keyring: \(String(cString: strerror(code)))")
        }
    }
}

struct KeyRemove: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remove",
        abstract: "Remove your claim to a key; the key itself goes once no user claims it.",
        discussion: """
            Files already open keep working until closed ("files still busy"); new opens fail with \
            ENOKEY. When the last of them closes the key is wiped; remove again to finish.
            """)

    @Argument(help: "The mountpoint, or any directory inside the mount.") var mountpoint: String
    @Argument(help: "The key identifier (32 hex digits).") var identifier: String
    @Flag(help: "Remove every user's claim (root only).") var allUsers = false

    func run() throws {
        try reportingErrors {
            guard let id = KeyIdentifier(hex: identifier) else { throw CLIError("Error removing encryption key: Invalid argument") }
            let command = allUsers ? FscryptIoctl.removeKeyAllUsers : FscryptIoctl.removeKey
            let reply = try ControlClient.call(mountpoint, command, FscryptIoctl.RemoveKeyArgument(identifier: id).encoded(),
                                               failure: "Error removing encryption key")
            guard let flags = FscryptIoctl.RemoveKeyArgument.decodeReply(reply)?.statusFlags else {
                throw CLIError("Error removing encryption key: malformed reply")
            }
            if flags & FscryptIoctl.RemoveKeyArgument.otherUsers != 0 {
                print("Removed user's claim to encryption key with identifier \(id.hex)")
            } else if flags & FscryptIoctl.RemoveKeyArgument.filesBusy != 0 {
                print("Removed encryption key with identifier \(id.hex), but files still busy")
            } else {
                print("Removed encryption key with identifier \(id.hex)")
            }
        }
    }
}

struct KeyStatus: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "Show whether a key is present, and who added it.")

    @Argument(help: "The mountpoint, or any directory inside the mount.") var mountpoint: String
    @Argument(help: "The key identifier (32 hex digits).") var identifier: String

    func run() throws {
        try reportingErrors {
            guard let id = KeyIdentifier(hex: identifier) else { throw CLIError("Error getting encryption key status: Invalid argument") }
            let reply = try ControlClient.call(mountpoint, FscryptIoctl.getKeyStatus, FscryptIoctl.KeyStatusArgument(identifier: id).encoded(),
                                               failure: "Error getting encryption key status")
            guard let status = FscryptIoctl.KeyStatusArgument.decode(reply) else {
                throw CLIError("Error getting encryption key status: malformed reply")
            }
            print(KeyState.text(KeyState.name(status.status), userCount: status.userCount,
                                addedBySelf: status.statusFlags & FscryptIoctl.KeyStatusArgument.addedBySelf != 0))
        }
    }
}
