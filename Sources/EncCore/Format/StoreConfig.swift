import Foundation

/// `encfsd.conf` at the top of a store: format version, features and parameters. It holds no
/// secret, so it may be readable by anyone who can read the ciphertext.
public struct StoreConfig: Codable, Equatable, Sendable {
    public static let fileName = "encfsd.conf"
    public static let currentVersion = 1
    /// Features this build understands. A store naming any other is refused, never guessed at.
    public static let knownFeatures: Set<String> = []

    public var format: String = "encfsd"
    public var version: Int = StoreConfig.currentVersion
    public var features: [String] = []
    /// Plaintext bytes per extent for files created from now on (each file records its own).
    public var extentSize: Int
    /// Policy (key identifier, hex) of the root directory.
    public var rootPolicy: String
    /// How to derive passphrase-protected keys: scrypt parameters and salt per key identifier.
    /// Not secret: without the passphrase they give nothing.
    public var passphrases: [PassphraseParameters]?

    public struct PassphraseParameters: Codable, Equatable, Sendable {
        public var identifier: String
        /// 32 random bytes, hex.
        public var salt: String
        public var n: UInt64
        public var r: UInt32
        public var p: UInt32

        public init(identifier: KeyIdentifier, salt: [UInt8], n: UInt64, r: UInt32, p: UInt32) {
            self.identifier = identifier.hex
            self.salt = Hex.encode(salt)
            self.n = n
            self.r = r
            self.p = p
        }

        /// The raw 64-byte master key for `passphrase`, in locked memory.
        public func derive(passphrase: [UInt8]) throws -> SecureBytes {
            guard let saltBytes = Hex.decode(salt) else { throw Problem.unreadable("passphrase salt is not hex") }
            var key = try OpenSSL.scrypt(password: passphrase, salt: saltBytes, n: n, r: r, p: p, outputCount: MasterKey.maximumCount)
            defer { key.withUnsafeMutableBytes { OpenSSL.cleanse($0) } }
            return key.withUnsafeBytes { SecureBytes(copying: $0) }
        }
    }

    public init(extentSize: Int, rootPolicy: KeyIdentifier) {
        self.extentSize = extentSize
        self.rootPolicy = rootPolicy.hex
    }

    public enum Problem: Error, Equatable, CustomStringConvertible {
        case missing(String)
        case unreadable(String)
        case unsupported(String)

        public var description: String {
            switch self {
            case .missing(let path): "\(path): not an encfsd store (no \(StoreConfig.fileName))"
            case .unreadable(let why): "store configuration is unreadable: \(why)"
            case .unsupported(let why): "store uses something this encfsd does not support: \(why)"
            }
        }
    }

    /// Most bytes `encfsd.conf` may have: it is read from a store that may be hostile.
    static let maximumBytes = 1 << 20

    public static func load(storePath: String) throws(Problem) -> StoreConfig {
        let root: FileDescriptor
        do {
            root = try Sys.openStoreRoot(storePath)
        } catch {
            throw .missing(storePath)
        }
        return try withExtendedLifetime(root) { () throws(Problem) -> StoreConfig in try load(storeFD: root.raw, shownAs: storePath) }
    }

    /// Reads the configuration through the store boundary (never a link, never a FIFO).
    public static func load(storeFD: Int32, shownAs storePath: String = "store") throws(Problem) -> StoreConfig {
        let data: Data
        do {
            data = Data(try Sys.readEntry(storeFD, Array(fileName.utf8), limit: maximumBytes))
        } catch StoreError.system(ENOENT) {
            throw .missing(storePath)
        } catch {
            throw .unreadable("\(fileName): \(error)")
        }
        return try decode(data)
    }

    static func decode(_ data: Data) throws(Problem) -> StoreConfig {
        let config: StoreConfig
        do {
            config = try JSONDecoder().decode(StoreConfig.self, from: data)
        } catch {
            throw .unreadable("\(error)")
        }
        guard config.format == "encfsd" else { throw .unreadable("format is \"\(config.format)\"") }
        guard config.version >= 1 else { throw .unreadable("format version \(config.version)") }
        guard config.version <= currentVersion else {
            throw .unsupported("format version \(config.version) (this build reads up to \(currentVersion))")
        }
        let unknown = Set(config.features).subtracting(knownFeatures)
        guard unknown.isEmpty else { throw .unsupported("features \(unknown.sorted())") }
        guard ExtentGeometry.isValid(extentSize: config.extentSize) else {
            throw .unreadable("extent size \(config.extentSize) is not a power of two in 4 KiB...1 MiB")
        }
        guard KeyIdentifier(hex: config.rootPolicy) != nil else { throw .unreadable("root policy is not a key identifier") }
        return config
    }

    public func encoded() -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return (try? encoder.encode(self)) ?? Data()
    }

    public var rootIdentifier: KeyIdentifier { KeyIdentifier(hex: rootPolicy)! }
}
