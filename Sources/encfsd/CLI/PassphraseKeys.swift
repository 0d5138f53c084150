import EncCore
import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Master keys derived from passphrases with scrypt (parameters and salt in `encfsd.conf`).
enum PassphraseKeys {
    /// scrypt N = 2^17, r = 8, p = 1: 128 MiB and about half a second per derivation, the cost
    /// that makes each guess expensive.
    static let defaultLogN = 17
    /// The largest N a store may ask for (`PassphraseParameters.maximumN`); with r = 8 that is 1 GiB.
    static let maximumLogN = StoreConfig.PassphraseParameters.maximumN.trailingZeroBitCount

    static func newParameters(passphrase: [UInt8], logN: Int) throws -> (SecureBytes, StoreConfig.PassphraseParameters) {
        let salt = OpenSSL.random(count: 32)
        var parameters = StoreConfig.PassphraseParameters(identifier: KeyIdentifier(bytes: [UInt8](repeating: 0, count: 16))!,
                                                          salt: salt, n: 1 << UInt64(logN), r: 8, p: 1)
        let key = try parameters.derive(passphrase: passphrase)
        parameters.identifier = key.withBytes { KeyIdentifier(rawKey: $0) }.hex
        return (key, parameters)
    }

    /// Reads a passphrase and finds, among the store's passphrase keys, the one it derives.
    static func derive(forMountpoint mountpoint: String) throws -> SecureBytes {
        let store = try storePath(of: mountpoint)
        let config: StoreConfig
        do { config = try StoreConfig.load(storePath: store) } catch { throw CLIError("Error adding encryption key: \(error)") }
        guard let candidates = config.passphrases, !candidates.isEmpty else {
            throw CLIError("Error adding encryption key: the store has no passphrase-protected key")
        }
        var passphrase = try read(prompt: "Enter passphrase: ")
        defer { passphrase.withUnsafeMutableBytes { OpenSSL.cleanse($0) } }
        for parameters in candidates {
            let key = try parameters.derive(passphrase: passphrase)
            if key.withBytes({ KeyIdentifier(rawKey: $0) }).hex == parameters.identifier { return key }
        }
        throw CLIError("Error adding encryption key: wrong passphrase")
    }

    /// From the terminal with echo off, or one line of standard input.
    static func read(prompt: String) throws -> [UInt8] {
        if isatty(0) == 1 {
            FileHandle.standardError.write(Data(prompt.utf8))
            var saved = termios()
            tcgetattr(0, &saved)
            var quiet = saved
            quiet.c_lflag &= ~tcflag_t(ECHO)
            tcsetattr(0, TCSANOW, &quiet)
            defer {
                tcsetattr(0, TCSANOW, &saved)
                FileHandle.standardError.write(Data("\n".utf8))
            }
            return Array((readLine(strippingNewline: true) ?? "").utf8)
        }
        guard let line = readLine(strippingNewline: true), !line.isEmpty else { throw CLIError("no passphrase on standard input") }
        return Array(line.utf8)
    }

    /// The store behind a mountpoint (or any path inside it).
    static func storePath(of mountpoint: String) throws -> String {
        let target = try Paths.absolute(mountpoint, what: "mountpoint")
        let containing = MountTable.encfsdMounts().filter { target == $0.point || target.hasPrefix($0.point + "/") }
        guard let mount = containing.max(by: { $0.point.count < $1.point.count }) else {
            throw CLIError("\(mountpoint) is not on an encfsd mount")
        }
        return mount.store
    }
}
