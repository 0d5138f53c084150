import ArgumentParser
import Foundation

/// encfsd as mount(8)'s helper, so `mount -t fuse.encfsd STORE DIR -o OPTIONS` and fstab lines of
/// type `fuse.encfsd` work. Two ways in, both ending in `encfsd mount`:
///
/// - `mount.fuse.encfsd STORE DIR [-sfnv] [-o OPTIONS] [-t fuse.encfsd]`: libmount runs
///   `/sbin/mount.<type>` first; the install script and the package link that name to encfsd.
/// - `encfsd STORE DIR [-o OPTIONS]`: without that link libmount falls back to /sbin/mount.fuse
///   (mount.fuse3), which runs the subtype as a command, through /bin/sh with the default PATH.
///
/// encfsd's own settings come as `-o` options (`key_file=`, `threads=`, `idle=`, ...); what
/// mount(8), fstab and systemd keep for themselves (`nofail`, `x-systemd.*`, `_netdev`, `noauto`,
/// ...) is dropped; the kernel's and FUSE's mount flags go on to libfuse. Anything else is an
/// error, reported before anything is mounted.
enum MountHelper {
    static let programName = "mount.fuse.encfsd"

    /// `-o NAME=VALUE` options that are `encfsd mount` options, and how each value is checked.
    static let valueOptions: [(name: String, flag: String, repeatable: Bool, valid: @Sendable (String) -> Bool)] = [
        ("key_file", "--key-file", true, { !$0.isEmpty }),
        ("threads", "--threads", false, { Int($0).map { (1...256).contains($0) } ?? false }),
        ("read_ahead_kb", "--read-ahead-kb", false, { Int($0).map { (0...1_048_576).contains($0) } ?? false }),
        ("key_quota", "--key-quota", false, { Int($0).map { $0 >= 0 } ?? false }),
        ("log_file", "--log-file", false, { !$0.isEmpty }),
        ("log_level", "--log-level", false, { LogLevel(rawValue: $0) != nil }),
        ("idle", "--idle", false, { DurationArgument(argument: $0) != nil }),
    ]
    static let flagOptions = ["no_keyring": "--no-keyring"]
    /// Passed on as `-o`: encfsd's FUSE options and the kernel's generic mount flags (libfuse
    /// applies these to the mount).
    static let mountFlags: Set<String> = [
        "allow_other", "default_permissions", "writeback_cache", "no_writeback_cache", "ro",
        "dev", "nodev", "suid", "nosuid", "exec", "noexec", "sync", "async", "dirsync",
        "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime", "strictatime", "nostrictatime",
        "lazytime", "nolazytime",
    ]
    /// mount(8)'s, fstab's and systemd's own options: they never reach the daemon. (`rw` is the
    /// default; mount.fuse3 itself adds `dev,suid` for root, which libfuse accepts.)
    static let generic: Set<String> = ["rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users",
                                       "nouser", "owner", "group"]
    static let genericPrefixes = ["x-", "comment="]

    struct Invocation: Equatable {
        var store: String
        var mountpoint: String
        var options: [String] = []
        /// `-f`: check everything, mount nothing (mount(8)'s "fake").
        var fake = false
        /// `-s`: drop unknown options instead of failing (mount(8)'s "sloppy").
        var sloppy = false
    }

    struct UsageError: Error, CustomStringConvertible {
        let description: String
        init(_ description: String) { self.description = description }
    }

    /// Whether this process was started as mount(8)'s helper rather than as the encfsd CLI.
    static func isInvocation(_ argv: [String], subcommands: Set<String>) -> Bool {
        if (argv.first.map { URL(fileURLWithPath: $0).lastPathComponent }) == programName { return true }
        // mount.fuse3's shape: exactly `SOURCE MOUNTPOINT` or `SOURCE MOUNTPOINT -o OPTIONS`.
        let rest = Array(argv.dropFirst())
        guard rest.count == 2 || (rest.count == 4 && rest[2] == "-o") else { return false }
        return !subcommands.contains(rest[0]) && !rest[0].hasPrefix("-") && !rest[1].hasPrefix("-")
    }

    /// Parses libmount's helper command line (after argv[0]).
    static func parse(_ arguments: [String]) throws(UsageError) -> Invocation {
        var positional: [String] = []
        var invocation = Invocation(store: "", mountpoint: "")
        var i = 0
        func value(_ flag: String) throws(UsageError) -> String {
            i += 1
            guard i < arguments.count else { throw UsageError("\(flag) needs a value") }
            return arguments[i]
        }
        while i < arguments.count {
            let argument = arguments[i]
            switch argument {
            case "-o": invocation.options += try split(value("-o"))
            case "-t":
                let type = try value("-t")
                guard type == "fuse.encfsd" || type == "encfsd" else { throw UsageError("type \(type) is not fuse.encfsd") }
            case "-f": invocation.fake = true
            case "-s": invocation.sloppy = true
            case "-n", "-v", "-w": break // no mtab to write; verbosity; read-write is the default
            case "-r": invocation.options.append("ro")
            case "-N": throw UsageError("mounting in another namespace (-N) is not supported")
            default:
                if argument.hasPrefix("-o"), argument.count > 2 {
                    invocation.options += split(String(argument.dropFirst(2)))
                } else if argument.hasPrefix("-") {
                    throw UsageError("unknown flag \(argument)")
                } else {
                    positional.append(argument)
                }
            }
            i += 1
        }
        guard positional.count == 2 else {
            throw UsageError("usage: \(programName) STORE MOUNTPOINT [-o OPTIONS] (as mount(8) runs it)")
        }
        invocation.store = positional[0]
        invocation.mountpoint = positional[1]
        return invocation
    }

    static func split(_ options: String) -> [String] {
        options.split(separator: ",", omittingEmptySubsequences: true).map(String.init)
    }

    /// The `encfsd mount` command line for an invocation; every option is checked here, so a
    /// malformed one fails before the daemon starts.
    static func mountArguments(_ invocation: Invocation) throws(UsageError) -> [String] {
        var arguments = [invocation.store, invocation.mountpoint]
        var passed: [String] = []
        var seen: Set<String> = []
        for option in invocation.options {
            let parts = option.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            let name = parts[0], value = parts.count == 2 ? parts[1] : nil
            if generic.contains(name) || genericPrefixes.contains(where: { option.hasPrefix($0) }) { continue }
            if let known = valueOptions.first(where: { $0.name == name }) {
                guard let value, known.valid(value) else { throw UsageError("bad value in mount option \(option)") }
                guard known.repeatable || seen.insert(name).inserted else { throw UsageError("mount option \(name) given twice") }
                arguments += [known.flag, value]
            } else if let flag = flagOptions[name], value == nil {
                arguments.append(flag)
            } else if mountFlags.contains(name), value == nil {
                passed.append(name)
            } else if !invocation.sloppy {
                throw UsageError("unknown mount option \(option)")
            }
        }
        if !passed.isEmpty { arguments += ["-o", passed.joined(separator: ",")] }
        return arguments
    }

    /// Runs as mount(8)'s helper. Exit status as mount(8) documents for helpers: 0 mounted,
    /// 1 incorrect invocation, 32 mount failure.
    static func run(_ argv: [String]) -> Never {
        func fail(_ message: String, _ status: Int32) -> Never {
            FileHandle.standardError.write(Data("\(programName): \(message)\n".utf8))
            exit(status)
        }
        let command: MountCommand
        do {
            let invocation = try parse(Array(argv.dropFirst()))
            let arguments = try mountArguments(invocation)
            command = try MountCommand.parse(arguments)
            if invocation.fake { exit(0) }
        } catch let error as UsageError {
            fail(error.description, 1)
        } catch {
            fail(MountCommand.message(for: error), 1)
        }
        do {
            try command.run()
        } catch {
            fail("\(error)", 32)
        }
        exit(0)
    }
}
