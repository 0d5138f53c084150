import Foundation
import EncCrypto
import EncKeys

/// `encfsd.conf` at the top of a store: format version, features and parameters. It holds no
/// secret, so it may be readable by anyone who can read the ciphertext.
public struct StoreConfig: Codable, Equatable, Sendable {
    public static let fileName = "encfsd.conf"
    public static let currentVersion = 3
    /// Features this build understands. A store naming any other is refused, never guessed at.
    public static let knownFeatures: Set<String> = [extentKeyGroups]
    /// Files made in the store seal their extents in key groups (FORMAT.md 5.3, 10.2).
    public static let extentKeyGroups = "extent-key-groups"

    /// Whether files made from now on get the `keyGroups` header flag.
    public var makesKeyGroups: Bool { features.contains(Self.extentKeyGroups) }

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
    /// Version 2: the trees being rekeyed (FORMAT.md 2.2a), so a rekey resumes after a crash.
    public var rekeys: [RekeyRecord]?

    /// One tree moving from key `from` to key `to`: the directory with that policy of its own
    /// (or the root), found by its object ID.
    public struct RekeyRecord: Codable, Equatable, Sendable {
        /// The policy root's object ID, 32 hex digits.
        public var root: String
        public var from: String
        public var to: String
        /// Whether the tree is the store's root directory (its policy is `rootPolicy`).
        public var isRoot: Bool
        /// For a passphrase change: the old key's `passphrases` entry, removed once done.
        public var retirePassphrase: Bool?

        public init(root: [UInt8], from: KeyIdentifier, to: KeyIdentifier, isRoot: Bool, retirePassphrase: Bool = false) {
            self.root = Hex.encode(root)
            self.from = from.hex
            self.to = to.hex
            self.isRoot = isRoot
            self.retirePassphrase = retirePassphrase ? true : nil
        }
    }

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

        /// The most a store may ask one derivation to spend. The parameters come from the store,
        /// which an attacker may write: unbounded, a planted `encfsd.conf` could make every
        /// `key add --passphrase` take any amount of memory and time. scrypt's working memory is
        /// about 128·N·r·p bytes (p lanes run one after another in OpenSSL, but the cost is the
        /// product), and its time grows with N·r·p, so one bound on the product caps both.
        public static let maximumN: UInt64 = 1 << 20
        public static let maximumR: UInt32 = 16
        public static let maximumP: UInt32 = 4
        public static let maximumMemory: UInt64 = 1 << 30
        public static let saltBytes = 32

        /// Refuses parameters outside the bounds above or malformed, before any scrypt call.
        public func validate() throws(Problem) {
            func refuse(_ why: String) -> Problem { .passphraseParameters("key \(identifier.prefix(32)): \(why)") }
            guard KeyIdentifier(hex: identifier) != nil else { throw refuse("the identifier is not 32 hex digits") }
            guard let saltBytes = Hex.decode(salt), saltBytes.count == Self.saltBytes else {
                throw refuse("the salt is not \(Self.saltBytes) bytes of hex")
            }
            guard n >= 2, n & (n - 1) == 0 else { throw refuse("scrypt N = \(n) is not a power of two of at least 2") }
            guard n <= Self.maximumN else { throw refuse("scrypt N = \(n) is over the maximum \(Self.maximumN)") }
            guard (1...Self.maximumR).contains(r) else { throw refuse("scrypt r = \(r) is not 1 to \(Self.maximumR)") }
            guard (1...Self.maximumP).contains(p) else { throw refuse("scrypt p = \(p) is not 1 to \(Self.maximumP)") }
            // No overflow: each factor is bounded above, the product by 2^20 · 16 · 4 · 128.
            let memory = 128 * n * UInt64(r) * UInt64(p)
            guard memory <= Self.maximumMemory else {
                throw refuse("scrypt would need \(memory >> 20) MiB (128·N·r·p), over the maximum \(Self.maximumMemory >> 20) MiB")
            }
        }

        /// The raw 64-byte master key for `passphrase`, in locked memory.
        public func derive(passphrase: [UInt8]) throws -> SecureBytes {
            try validate()
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

    /// At most this many passphrase keys: a wrong passphrase is tried against each of them.
    public static let maximumPassphraseKeys = 16

    public enum Problem: Error, Equatable, CustomStringConvertible {
        case missing(String)
        case unreadable(String)
        case unsupported(String)
        /// Passphrase parameters malformed or costlier than encfsd allows (`PassphraseParameters.validate`).
        case passphraseParameters(String)

        public var description: String {
            switch self {
            case .missing(let path): "\(path): not an encfsd store (no \(StoreConfig.fileName))"
            case .unreadable(let why): "store configuration is unreadable: \(why)"
            case .unsupported(let why): "store uses something this encfsd does not support: \(why)"
            case .passphraseParameters(let why): "store configuration asks for passphrase parameters encfsd refuses: \(why)"
            }
        }
    }

    /// Most bytes `encfsd.conf` may have: it is read from a store that may be hostile.
    public static let maximumBytes = 1 << 20


    public static func decode(_ data: Data) throws(Problem) -> StoreConfig {
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
        // Key groups arrived with version 3 stores; an older store naming it was not made by encfsd.
        guard !config.makesKeyGroups || config.version >= 3 else { throw .unreadable("feature \(extentKeyGroups) in a version \(config.version) store") }
        guard ExtentGeometry.isValid(extentSize: config.extentSize) else {
            throw .unreadable("extent size \(config.extentSize) is not a power of two in 4 KiB...1 MiB")
        }
        guard KeyIdentifier(hex: config.rootPolicy) != nil else { throw .unreadable("root policy is not a key identifier") }
        for record in config.rekeys ?? [] {
            guard config.version >= 2, Hex.decode(record.root)?.count == 16, KeyIdentifier(hex: record.from) != nil,
                  KeyIdentifier(hex: record.to) != nil else { throw .unreadable("malformed rekey record") }
        }
        if let passphrases = config.passphrases {
            guard passphrases.count <= maximumPassphraseKeys else {
                throw .passphraseParameters("\(passphrases.count) passphrase keys, over the maximum \(maximumPassphraseKeys)")
            }
            for parameters in passphrases { try parameters.validate() }
        }
        return config
    }

    public func encoded() -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return (try? encoder.encode(self)) ?? Data()
    }

    public var rootIdentifier: KeyIdentifier { KeyIdentifier(hex: rootPolicy)! }
}
