import ArgumentParser
import EncCore
import EncCrypto
import EncKeys
import EncFormat

struct PolicyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy", abstract: "Give an empty directory its own encryption policy, or show a policy.",
        subcommands: [PolicySet.self, PolicyGet.self])
}

struct PolicySet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "set",
        abstract: "Encrypt an empty directory (and everything later made in it) under another master key.",
        discussion: "The key need not be added yet. Fails with EEXIST if the directory already has another policy of its own, ENOTEMPTY if it is not empty.")

    @Argument(help: "An empty directory on the mount.") var directory: String
    @Argument(help: "The master key identifier (32 hex digits).") var identifier: String

    func run() throws {
        try reportingErrors {
            guard let id = KeyIdentifier(hex: identifier) else { throw CLIError("\(directory): failed to set encryption policy: Invalid argument") }
            _ = try ControlClient.call(directory, ControlProtocol.setPolicy, ControlProtocol.PolicyArgument(identifier: id).encoded(),
                                       failure: "\(directory): failed to set encryption policy")
        }
    }
}

struct PolicyGet: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "get", abstract: "Show the encryption policy of a file or directory.")

    @Argument(help: "A file or directory on the mount.") var path: String

    func run() throws {
        try reportingErrors {
            let reply = try ControlClient.call(path, ControlProtocol.getPolicy,
                                               [UInt8](repeating: 0, count: ControlProtocol.PolicyArgument.byteCount),
                                               failure: "\(path): failed to get encryption policy")
            guard let policy = ControlProtocol.PolicyArgument.decode(reply) else {
                throw CLIError("\(path): failed to get encryption policy: malformed reply")
            }
            print("Encryption policy for \(path):")
            print("\tMaster key identifier: \(policy.identifier.hex)")
            print("\tContents encryption: AES-256-GCM, a key per extent (HKDF-SHA512)")
            print("\tFilenames encryption: AES-256-SIV")
            print("\tSet on this directory: \(policy.flags & ControlProtocol.PolicyArgument.ownPolicy != 0 ? "yes" : "no (inherited)")")
        }
    }
}

struct NonceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nonce", abstract: "Print a file's 16-byte encryption nonce, as FS_IOC_GET_ENCRYPTION_NONCE reports it.")

    @Argument(help: "A file or directory on the mount.") var path: String

    func run() throws {
        try reportingErrors {
            let nonce = try ControlClient.call(path, FscryptIoctl.getNonce, [UInt8](repeating: 0, count: 16),
                                               failure: "\(path): failed to get encryption nonce")
            print(Hex.encode(nonce))
        }
    }
}
