import ArgumentParser
import EncCore
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

struct InitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init", abstract: "Create a new store whose root is encrypted under the given key.")

    @Argument(help: "Directory for the ciphertext (created if missing; must be empty).")
    var store: String

    @Option(name: .long, help: "File holding the raw master key (16 to 64 bytes).")
    var keyFile: String?

    @Flag(help: "Derive the root key from a passphrase (terminal, or standard input) with scrypt; `key add --passphrase` unlocks it.")
    var passphrase = false

    @Option(help: .hidden) var scryptLogN = PassphraseKeys.defaultLogN

    @Option(name: .long, help: "Plaintext bytes per extent: a power of two from 4096 to 1048576.")
    var extentSize: Int = StoreCreation.defaultExtentSize

    func validate() throws {
        guard (keyFile != nil) != passphrase else { throw ValidationError("give exactly one of --key-file and --passphrase") }
        guard (10...PassphraseKeys.maximumLogN).contains(scryptLogN) else {
            throw ValidationError("scrypt log N must be 10...\(PassphraseKeys.maximumLogN)")
        }
        guard ExtentGeometry.isValid(extentSize: extentSize) else {
            throw ValidationError("--extent-size must be a power of two from 4096 to 1048576")
        }
    }

    func run() throws {
        let raw: SecureBytes
        var parameters: StoreConfig.PassphraseParameters?
        if passphrase {
            var phrase = try PassphraseKeys.read(prompt: "Enter passphrase: ")
            defer { phrase.withUnsafeMutableBytes { OpenSSL.cleanse($0) } }
            (raw, parameters) = try PassphraseKeys.newParameters(passphrase: phrase, logN: scryptLogN)
        } else {
            raw = try KeyMaterial.read(path: keyFile)
        }
        let key = try raw.withBytes { try MasterKey(raw: $0) }
        do {
            try StoreCreation.create(at: store, key: key, extentSize: extentSize,
                                     owner: Caller(uid: getuid(), gid: getgid()), passphrase: parameters)
        } catch StoreError.notEmpty {
            throw CLIError("\(store) is not empty; a store must start in an empty directory")
        } catch StoreError.system(let code) {
            throw CLIError("\(store): \(String(cString: strerror(code)))")
        }
        print("Created store \(store) with root policy \(key.identifier.hex)")
    }
}
