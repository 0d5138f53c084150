import ArgumentParser
import EncCore
import EncCrypto
import EncKeys
import EncFormat
import Foundation

struct KeyChangePassphrase: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "change-passphrase",
        abstract: "Move a mounted store's root from its passphrase key to a key from a new passphrase.",
        discussion: """
            The root's passphrase key must be added. A new passphrase (terminal, or standard input) gives a new \
            key, whose scrypt parameters go into encfsd.conf; the root is then rekeyed to it (`encfsd rekey`), \
            and once that is done the old passphrase's entry is removed, so the old passphrase opens nothing. \
            Returns when the rekey is done, unless --no-wait.
            """)

    @Argument(help: "The mountpoint.") var mountpoint: String
    @Flag(help: "Return once the rekey has started (`encfsd rekey wait` waits for it).") var noWait = false
    @Option(help: .hidden) var scryptLogN = PassphraseKeys.defaultLogN

    func run() throws {
        try reportingErrors {
            guard (10...PassphraseKeys.maximumLogN).contains(scryptLogN) else { throw CLIError("--scrypt-log-n must be 10 to \(PassphraseKeys.maximumLogN)") }
            let store = try PassphraseKeys.storePath(of: mountpoint)
            var config: StoreConfig
            do { config = try StoreConfig.load(storePath: store) } catch { throw CLIError("\(store): \(error)") }
            guard config.passphrases?.contains(where: { $0.identifier == config.rootPolicy }) == true else {
                throw CLIError("\(mountpoint): the root key is not a passphrase key")
            }
            var phrase = try PassphraseKeys.read(prompt: "Enter new passphrase: ")
            defer { phrase.withUnsafeMutableBytes { OpenSSL.cleanse($0) } }
            let (raw, parameters) = try PassphraseKeys.newParameters(passphrase: phrase, logN: scryptLogN)
            guard config.passphrases!.count < StoreConfig.maximumPassphraseKeys else {
                throw CLIError("\(store): already \(StoreConfig.maximumPassphraseKeys) passphrase keys")
            }
            // The parameters are durable before anything is sealed under the key they derive.
            config.passphrases!.append(parameters)
            do { try StoreConfig.replace(config, storePath: store) } catch { throw CLIError("\(store): cannot write \(StoreConfig.fileName): \(error)") }
            let identifier = try KeyAdd.add(raw, to: mountpoint)
            try Rekey.start(mountpoint, to: identifier, flags: ControlProtocol.retirePassphrase)
            print("Rekey of \(mountpoint) to the new passphrase's key \(identifier.hex) started")
            if !noWait { try Rekey.wait(mountpoint) }
        }
    }
}

struct UpgradeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "upgrade",
        abstract: "Upgrade an unmounted store to the newest format version (builds of encfsd that only know its older version can then no longer open it).",
        discussion: "Nothing else upgrades a store, except starting a rekey. Objects move to the newest header version as they are next written. Files made after the upgrade seal their extents in key groups (FORMAT.md 16.4); files already there keep their layout.")

    @Argument(help: "The store directory.") var store: String

    func run() throws {
        try reportingErrors {
            let path = try Paths.absolute(store, what: "store")
            let lock: StoreLock
            do { lock = try StoreLock.acquire(storePath: path) } catch { throw CLIError("\(store) is in use: \(error)") }
            var config: StoreConfig
            do { config = try StoreConfig.load(storePath: path) } catch { throw CLIError("\(store): \(error)") }
            guard config.version < StoreConfig.currentVersion || !config.makesKeyGroups else {
                lock.release()
                return print("\(store) is already format version \(config.version)")
            }
            let oldVersion = config.version
            config.version = StoreConfig.currentVersion
            config.features = Array(Set(config.features + [StoreConfig.extentKeyGroups])).sorted()
            do { try StoreConfig.replace(config, storePath: path) } catch { throw CLIError("\(store): cannot write \(StoreConfig.fileName): \(error)") }
            print(oldVersion < config.version ? "Upgraded \(store) to format version \(config.version)"
                  : "Upgraded \(store): files made from now on seal their extents in key groups (\(StoreConfig.extentKeyGroups))")
            lock.release()
        }
    }
}
