import ArgumentParser
import EncCore
import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show every encfsd mount (or one): its daemon, policies and key states, open files and buffers, and its backing's capabilities.",
        discussion: """
            Mounts come from /proc/self/mountinfo; each daemon is asked through the control ioctl on its \
            mountpoint, so key states are as you see them (your own claim shows as added_by_self). A mount \
            you cannot reach (another user's, without allow_other) or whose daemon is gone is listed with \
            the error.
            """)

    @Argument(help: "Only this mountpoint.") var mountpoint: String?
    @Flag(help: "Print JSON instead of text.") var json = false

    struct Report: Codable {
        struct Policy: Codable {
            var identifier: String
            var root: Bool
            var key: String
            var userCount: UInt32
            var addedBySelf: Bool
        }
        var mountpoint: String
        var store: String
        var error: String?
        var pid: UInt32?
        var formatVersion: UInt32?
        var uptimeSeconds: UInt64?
        var openFiles: UInt64?
        var openDirectories: UInt64?
        var bufferedBytes: UInt64?
        var journalEntries: UInt64?
        var journalBytes: UInt64?
        /// FUSE requests since the mount (this call's own among them), forgets counted apart.
        var requests: UInt64?
        var forgetRequests: UInt64?
        var policies: [Policy]?
        var backing: BackingReport?
    }

    func run() throws {
        try reportingErrors {
            var mounts = MountTable.encfsdMounts()
            if let mountpoint {
                let path = try Paths.absolute(mountpoint, what: "mountpoint")
                mounts = mounts.filter { $0.point == path }
                guard !mounts.isEmpty else { throw CLIError("\(mountpoint) is not an encfsd mountpoint") }
            }
            let reports = mounts.map(Self.report)
            if json {
                print(try Output.json(reports))
            } else if reports.isEmpty {
                print("no encfsd mounts")
            } else {
                print(reports.map(Self.text).joined(separator: "\n"))
            }
        }
    }

    static func report(_ mount: MountTable.Mount) -> Report {
        var report = Report(mountpoint: mount.point, store: mount.store)
        let reply: [UInt8]
        do {
            reply = try ControlClient.call(mount.point, ControlProtocol.getStatus, [UInt8](repeating: 0, count: ControlProtocol.StatusArgument.byteCount),
                                           failure: "cannot ask the daemon")
        } catch {
            report.error = "\(error)"
            return report
        }
        guard let status = ControlProtocol.StatusArgument.decode(reply) else {
            report.error = "malformed reply from the daemon"
            return report
        }
        report.pid = status.pid
        report.formatVersion = status.formatVersion
        report.uptimeSeconds = UInt64(max(0, Int64(time(nil)) - Int64(status.started)))
        report.openFiles = status.openFiles
        // Less the one this call held open: the control ioctl goes through a descriptor on the mountpoint.
        report.openDirectories = status.openDirectories > 0 ? status.openDirectories - 1 : 0
        report.bufferedBytes = status.bufferedBytes
        report.journalEntries = status.journalEntries
        report.journalBytes = status.journalBytes
        report.requests = status.requests
        report.forgetRequests = status.forgetRequests
        report.policies = status.policies.map { policy in
            Report.Policy(identifier: policy.identifier.hex, root: policy.flags & ControlProtocol.StatusArgument.rootPolicy != 0,
                          key: KeyState.name(policy.status), userCount: policy.userCount,
                          addedBySelf: policy.statusFlags & FscryptIoctl.KeyStatusArgument.addedBySelf != 0)
        }
        report.backing = status.capabilities.map(BackingReport.init)
        return report
    }

    static func text(_ r: Report) -> String {
        var lines = [r.mountpoint, "  store:          \(r.store)"]
        if let error = r.error {
            lines.append("  error:          \(error)")
            return lines.joined(separator: "\n")
        }
        lines += [
            "  daemon:         pid \(r.pid ?? 0), up \(Output.duration(r.uptimeSeconds ?? 0))",
            "  format version: \(r.formatVersion ?? 0)",
            "  open files:     \(r.openFiles ?? 0) (and \(r.openDirectories ?? 0) directories)",
            "  buffered:       \(r.bufferedBytes ?? 0) bytes",
            "  journal:        \(r.journalEntries ?? 0) entries, \(r.journalBytes ?? 0) bytes",
            "  requests:       \(r.requests ?? 0) (and \(r.forgetRequests ?? 0) forgets)",
            "  policies:",
        ]
        for p in r.policies ?? [] {
            let state = KeyState.text(p.key, userCount: p.userCount, addedBySelf: p.addedBySelf)
            lines.append("    \(p.identifier)  \(state)\(p.root ? "  (root)" : "")")
        }
        if let backing = r.backing { lines += ["  backing:"] + backing.lines.map { "    " + $0 } }
        return lines.joined(separator: "\n")
    }
}

/// Key states as `xfs_io -c enckey_status` prints them, shared by `key status` and `status`.
enum KeyState {
    static func name(_ status: UInt32) -> String {
        switch status {
        case FscryptIoctl.KeyStatusArgument.present: "present"
        case FscryptIoctl.KeyStatusArgument.incompletelyRemoved: "incompletely removed"
        default: "absent"
        }
    }

    static func text(_ name: String, userCount: UInt32, addedBySelf: Bool) -> String {
        switch name {
        case "present": "Present (user_count=\(userCount)\(addedBySelf ? ", added_by_self" : ""))"
        case "incompletely removed": "Incompletely removed"
        default: "Absent"
        }
    }
}

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Describe a store from its configuration, without its key: format, extent size, root policy, objects, and what its backing filesystem can do (probed).")

    @Argument(help: "The store directory.") var store: String
    @Flag(help: "Print JSON instead of text.") var json = false

    struct Report: Codable {
        struct Passphrase: Codable {
            var identifier: String
            var kdf = "scrypt"
            var n: UInt64
            var r: UInt32
            var p: UInt32
        }
        var store: String
        var formatVersion: Int
        var features: [String]
        var extentSize: Int
        var rootPolicy: String
        var passphrases: [Passphrase]
        var objects: Int
        var backing: BackingReport?
        var backingError: String?
    }

    func run() throws {
        try reportingErrors {
            let path = try Paths.absolute(store, what: "store")
            let config: StoreConfig
            do {
                config = try StoreConfig.load(storePath: path)
            } catch {
                throw CLIError("\(error)")
            }
            var report = Report(store: path, formatVersion: config.version, features: config.features, extentSize: config.extentSize,
                                rootPolicy: config.rootPolicy,
                                passphrases: (config.passphrases ?? []).map { .init(identifier: $0.identifier, n: $0.n, r: $0.r, p: $0.p) },
                                objects: Self.countObjects(path))
            // A probe writes a scratch directory into the store (and removes it), harmless beside a mount.
            do { report.backing = BackingReport(try BackingCapabilities.probe(storePath: path)) } catch { report.backingError = "\(error)" }
            if json {
                print(try Output.json(report))
                return
            }
            print("""
                store:          \(report.store)
                format version: \(report.formatVersion)
                features:       \(report.features.isEmpty ? "none" : report.features.joined(separator: ", "))
                extent size:    \(report.extentSize)
                root policy:    \(report.rootPolicy)
                passphrases:    \(report.passphrases.isEmpty ? "none" : report.passphrases.map { "\($0.identifier) (scrypt N=\($0.n) r=\($0.r) p=\($0.p))" }.joined(separator: ", "))
                objects:        \(report.objects)
                backing:
                """)
            if let error = report.backingError { print("  cannot probe: \(error)") }
            for line in report.backing?.lines ?? [] { print("  " + line) }
        }
    }

    /// Backing objects: the root and every distinct inode under an entry name (hard links once),
    /// outside `.journal` and `.quarantine`. Names are ciphertext; no key is needed to count them.
    static func countObjects(_ root: String) -> Int {
        var inodes: Set<UInt64> = []
        var pending = [root]
        while let directory = pending.popLast() {
            guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else { continue }
            for name in names where NameCodec.isEntryName(Array(name.utf8)) {
                let path = directory + "/" + name
                var st = stat()
                guard lstat(path, &st) == 0 else { continue }
                inodes.insert(UInt64(st.st_ino))
                if st.st_mode & S_IFMT == S_IFDIR { pending.append(path) }
            }
        }
        return inodes.count + 1
    }
}

/// What a probe of the backing found, as `info` and `status` show it.
struct BackingReport: Codable {
    var filesystemType: String
    var lockScope: String
    var native: [String]
    var fallbacks: [String: String]
    var lines: [String]

    init(_ c: BackingCapabilities) {
        filesystemType = c.filesystemType
        lockScope = c.lockScope.rawValue
        native = BackingCapabilities.Capability.allCases.filter(c.has).map(\.rawValue)
        fallbacks = Dictionary(uniqueKeysWithValues: BackingCapabilities.Capability.allCases.filter { !c.has($0) }.map { ($0.rawValue, $0.fallback) })
        lines = c.lines
        if let warning = c.lockWarning { lines.append("warning: " + warning) }
    }
}

enum Output {
    static func json<T: Encodable>(_ value: T) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        encoder.keyEncodingStrategy = .convertToSnakeCase
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    static func duration(_ seconds: UInt64) -> String {
        let (d, h, m, s) = (seconds / 86400, seconds / 3600 % 24, seconds / 60 % 60, seconds % 60)
        if d > 0 { return "\(d)d \(h)h \(m)m" }
        if h > 0 { return "\(h)h \(m)m \(s)s" }
        return m > 0 ? "\(m)m \(s)s" : "\(s)s"
    }
}
