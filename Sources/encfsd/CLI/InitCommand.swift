import ArgumentParser
import EncCore
#if canImport(Glibc)
import Glibc
#endif

struct InitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init", abstract: "Create a new store whose root is encrypted under the given key.")

    @Argument(help: "Directory for the ciphertext (created if missing; must be empty).")
    var store: String

    @Option(name: .long, help: "File holding the raw master key (16 to 64 bytes).")
    var keyFile: String

    @Option(name: .long, help: "Plaintext bytes per extent: a power of two from 4096 to 1048576.")
    var extentSize: Int = StoreCreation.defaultExtentSize

    func validate() throws {
        guard ExtentGeometry.isValid(extentSize: extentSize) else {
            throw ValidationError("--extent-size must be a power of two from 4096 to 1048576")
        }
    }

    func run() throws {
        var raw = try KeyMaterial.read(path: keyFile)
        defer { raw.withUnsafeMutableBytes { OpenSSL.cleanse($0) } }
        let key = try MasterKey(raw: raw)
        do {
            try StoreCreation.create(at: store, key: key, extentSize: extentSize,
                                     owner: Caller(uid: getuid(), gid: getgid()))
        } catch StoreError.notEmpty {
            throw CLIError("\(store) is not empty; a store must start in an empty directory")
        } catch StoreError.system(let code) {
            throw CLIError("\(store): \(String(cString: strerror(code)))")
        }
        print("Created store \(store) with root policy \(key.identifier.hex)")
    }
}
