import ArgumentParser
import EncCore
import Foundation
import FuseBridge
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Serve a store's plaintext at a mountpoint.",
        discussion: """
            Without --foreground the daemon moves to the background, and this command returns only once \
            the mount is ready (or fails with the daemon's error). Unmount with `encfsd umount MOUNTPOINT` \
            or `fusermount3 -u MOUNTPOINT`.
            """)

    @Argument(help: "The store directory (created by `encfsd init`).")
    var store: String

    @Argument(help: "An existing empty directory to mount on.")
    var mountpoint: String

    @Flag(help: "Stay in the foreground; log to standard error.")
    var foreground = false

    @Option(name: .customShort("o"), help: ArgumentHelp("Mount options, comma-separated: allow_other, default_permissions (always on), writeback_cache, ro, noatime, relatime (the default), strictatime, nodiratime, lazytime, ...", valueName: "options"))
    var options: [String] = []

    @Option(help: "Most request threads.")
    var threads = 16

    @Option(name: .customLong("read-ahead-kb"),
            help: "The mount's read-ahead in KiB (the kernel's own for a FUSE mount is 128); 0 keeps the kernel's.")
    var readAheadKiB = MountOptions.defaultReadAheadKiB

    @Option(help: "Where the background daemon logs (default: syslog, identifier encfsd, facility daemon).")
    var logFile: String?

    @Option(help: "How much the daemon logs: error, warning, notice, info or debug.")
    var logLevel: LogLevel = .notice

    @Option(help: "Unmount after this long with no open file and no request: 30s, 10m, 2h, ...")
    var idle: DurationArgument?

    @Option(help: "Unlock with this raw key file at start (repeatable), e.g. $CREDENTIALS_DIRECTORY/key under systemd. Keys already in your keyring are loaded anyway.")
    var keyFile: [String] = []

    @Option(help: "Most keys one non-root user may add (EDQUOT past it).")
    var keyQuota = 200

    @Flag(help: "Do not unlock with the encfsd: keys already in your user keyring.")
    var noKeyring = false

    @Flag(help: .hidden)
    var reportReady = false

    func validate() throws {
        guard (1...256).contains(threads) else { throw ValidationError("--threads must be 1...256") }
        guard (0...1_048_576).contains(readAheadKiB) else { throw ValidationError("--read-ahead-kb must be 0...1048576") }
    }

    func run() throws {
        let storePath = try Paths.absolute(store, what: "store")
        let mountPath = try Paths.absolute(mountpoint, what: "mountpoint")
        do {
            _ = try StoreConfig.load(storePath: storePath)
        } catch {
            throw CLIError("\(error)")
        }
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: mountPath, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw CLIError("\(mountpoint) is not a directory")
        }
        if foreground || reportReady {
            var daemon = Daemon(storePath: storePath, mountOptions: mountOptions(mountPath, storePath: storePath),
                                reportReady: reportReady, logFile: logFile)
            daemon.keyQuota = keyQuota
            daemon.unlockFromKeyring = !noKeyring
            daemon.keyFiles = keyFile
            daemon.logLevel = logLevel
            daemon.idle = idle?.duration
            daemon.accessTimes = accessTimes
            try daemon.serve()
        } else {
            var arguments = ["mount", storePath, mountPath, "--report-ready", "--threads", "\(threads)", "--key-quota", "\(keyQuota)",
                             "--read-ahead-kb", "\(readAheadKiB)"]
            if noKeyring { arguments.append("--no-keyring") }
            arguments += options.flatMap { ["-o", $0] }
            if let logFile { arguments += ["--log-file", logFile] }
            arguments += ["--log-level", logLevel.rawValue] + (idle.map { ["--idle", $0.text] } ?? [])
            arguments += keyFile.flatMap { ["--key-file", $0] }
            try Background.start(arguments: arguments)
        }
    }

    /// The atime options among `-o`'s, in order (a later one wins, as with mount(8)).
    private var accessTimes: AccessTimeOptions {
        var result = AccessTimeOptions()
        for option in options.flatMap({ $0.split(separator: ",").map(String.init) }) { _ = result.apply(option) }
        return result
    }

    private func mountOptions(_ mountPath: String, storePath: String) -> MountOptions {
        // The store's absolute path is the mount's source (so `key add --passphrase` can find its
        // configuration); libfuse splits options on commas, so those are escaped.
        let fsName = storePath.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: ",", with: "\\,")
        var result = MountOptions(mountpoint: mountPath, fsName: fsName, threads: threads, readAheadKiB: readAheadKiB)
        for option in options.flatMap({ $0.split(separator: ",").map(String.init) }) {
            switch option {
            case "allow_other": result.allowOther = true
            case "default_permissions": break // always on: the kernel checks permissions against our modes
            // The kernel writeback cache, off by default (see FuseSession's init).
            case "writeback_cache": result.writebackCache = true
            case "no_writeback_cache": result.writebackCache = false
            default:
                // The atime options are the daemon's to apply (the kernel updates no atime of a
                // FUSE inode); libfuse knows only some of them. noatime alone also goes to the
                // VFS mount, so /proc/mounts shows it.
                var probe = AccessTimeOptions()
                if !probe.apply(option) { result.extra.append(option) }
            }
        }
        if accessTimes.rule == .never { result.extra.append("noatime") }
        return result
    }
}

struct UmountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "umount", abstract: "Unmount (same as fusermount3 -u).")

    @Argument var mountpoint: String

    func run() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/fusermount3")
        process.arguments = ["-u", mountpoint]
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw ExitCode(process.terminationStatus) }
    }
}

enum Paths {
    static func absolute(_ path: String, what: String) throws -> String {
        guard let resolved = realpath(path, nil) else {
            throw CLIError("\(what) \(path): \(String(cString: strerror(errno)))")
        }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}
