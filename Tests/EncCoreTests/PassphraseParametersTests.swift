import Foundation
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat

/// The scrypt parameters come from the (writable, hostile) store: anything costlier than the
/// documented maximum, or malformed, is refused before scrypt runs.
@Suite struct PassphraseParametersTests {
    typealias Parameters = StoreConfig.PassphraseParameters
    static let identifier = KeyIdentifier(bytes: [UInt8](repeating: 7, count: 16))!

    static func parameters(n: UInt64 = 1 << 17, r: UInt32 = 8, p: UInt32 = 1, saltBytes: Int = 32) -> Parameters {
        Parameters(identifier: identifier, salt: [UInt8](repeating: 9, count: saltBytes), n: n, r: r, p: p)
    }

    static func isRefused(_ parameters: Parameters) -> Bool {
        do {
            try parameters.validate()
            return false
        } catch {
            if case .passphraseParameters = error { return true }
            return false
        }
    }

    @Test func theDefaultAndTheLargestAllowedPass() throws {
        try Self.parameters().validate()
        try Self.parameters(n: Parameters.maximumN, r: 8, p: 1).validate() // exactly 1 GiB
        try Self.parameters(n: 1 << 14, r: Parameters.maximumR, p: Parameters.maximumP).validate()
        try Self.parameters(n: 2, r: 1, p: 1).validate()
    }

    @Test(arguments: [
        parameters(n: 1 << 21),                          // N over 2^20
        parameters(n: 1 << 63),
        parameters(n: (1 << 17) + 1),                    // not a power of two
        parameters(n: 0), parameters(n: 1),
        parameters(r: 0), parameters(r: 17),
        parameters(p: 0), parameters(p: 5),
        parameters(n: 1 << 20, r: 16, p: 1),             // each bound kept, 2 GiB in all
        parameters(n: 1 << 19, r: 8, p: 4),
        parameters(saltBytes: 31), parameters(saltBytes: 33), parameters(saltBytes: 0),
    ])
    func costlyOrMalformedParametersAreRefused(_ parameters: Parameters) {
        #expect(Self.isRefused(parameters))
    }

    @Test func malformedIdentifierOrSaltIsRefused() {
        var bad = Self.parameters()
        bad.salt = String(repeating: "zz", count: 32)
        #expect(Self.isRefused(bad))
        bad = Self.parameters()
        bad.identifier = "not hex"
        #expect(Self.isRefused(bad))
    }

    /// The refusal comes before scrypt: a derivation of a planted N = 2^62 fails at once with the
    /// configuration's error, not OpenSSL's.
    @Test func deriveRefusesBeforeScrypt() {
        #expect(throws: StoreConfig.Problem.self) { try Self.parameters(n: 1 << 62, r: 16, p: 4).derive(passphrase: Array("x".utf8)) }
    }

    @Test func aPlantedConfigIsRefusedAtLoad() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cfg-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var config = StoreConfig(extentSize: 16384, rootPolicy: Self.identifier)
        func load(_ passphrases: [Parameters]) -> StoreConfig.Problem? {
            config.passphrases = passphrases
            _ = FileManager.default.createFile(atPath: dir + "/" + StoreConfig.fileName, contents: config.encoded())
            do {
                _ = try StoreConfig.load(storePath: dir)
                return nil
            } catch {
                return error
            }
        }
        #expect(load([Self.parameters()]) == nil)
        guard case .passphraseParameters(let why)? = load([Self.parameters(), Self.parameters(n: 1 << 30)]) else {
            Issue.record("a config asking for N = 2^30 loaded")
            return
        }
        #expect(why.contains("over the maximum"))
        let many = [Parameters](repeating: Self.parameters(), count: StoreConfig.maximumPassphraseKeys + 1)
        guard case .passphraseParameters? = load(many) else {
            Issue.record("a config with \(many.count) passphrase keys loaded")
            return
        }
    }
}
