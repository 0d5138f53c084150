import ArgumentParser
import EncCore
import EncCrypto
import EncKeys
import EncFormat
import Foundation
#if canImport(Glibc)
import Glibc
#endif

struct RekeyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rekey", abstract: "Move a directory tree to another master key while it stays mounted and in use.",
        subcommands: [RekeyStart.self, RekeyStatus.self, RekeyWait.self])
}

struct RekeyStart: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "start",
        abstract: "Start re-encrypting a tree (the mount's root, or a directory with a policy of its own) under another key.",
        discussion: """
        Both keys must be added. From now on everything written under PATH is sealed with the new key; the daemon \
        rewrites what is still under the old key in the background (and resumes after a crash or an unmount). \
        Upgrades a format version 1 store to version 2. Once `rekey wait` returns, the old key can be removed.
        """)

    @Argument(help: "The mount point, or a directory on the mount with a policy of its own.") var path: String
    @Option(name: .customLong("to"), help: "The new master key's identifier (32 hex digits).") var identifier: String

    func run() throws {
        try reportingErrors {
            guard let id = KeyIdentifier(hex: identifier) else { throw CLIError("\(path): failed to start rekey: Invalid argument") }
            try Rekey.start(path, to: id, flags: 0)
            print("Rekey of \(path) to \(id.hex) started")
        }
    }
}

struct RekeyStatus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Show how far the rekey of a tree has got: objects and bytes done, rate, time left.")

    @Argument(help: "A path in the tree.") var path: String

    func run() throws {
        try reportingErrors {
            let status = try Rekey.status(path)
            guard status.state != .none else {
                print("\(path): no rekey under way")
                return
            }
            print(Rekey.describe(status))
        }
    }
}

struct RekeyWait: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wait", abstract: "Wait until the rekey of a tree is done (a progress bar on a terminal).")

    @Argument(help: "A path in the tree.") var path: String

    func run() throws {
        try reportingErrors {
            try Rekey.wait(path)
        }
    }
}

/// The calls and formatting shared by `rekey` and `key change-passphrase`.
enum Rekey {
    static func start(_ path: String, to id: KeyIdentifier, flags: UInt32) throws {
        _ = try ControlClient.call(path, ControlProtocol.rekeyStart, ControlProtocol.PolicyArgument(identifier: id, flags: flags).encoded(),
                                   failure: "\(path): failed to start rekey")
    }

    static func status(_ path: String) throws -> ControlProtocol.RekeyStatusArgument {
        let reply = try ControlClient.call(path, ControlProtocol.rekeyStatus,
                                           [UInt8](repeating: 0, count: ControlProtocol.RekeyStatusArgument.byteCount),
                                           failure: "\(path): failed to get rekey status")
        guard let status = ControlProtocol.RekeyStatusArgument.decode(reply) else {
            throw CLIError("\(path): failed to get rekey status: malformed reply")
        }
        return status
    }

    /// Several lines: keys, objects, bytes, rate and time left, and what reads ENOKEY.
    static func describe(_ s: ControlProtocol.RekeyStatusArgument) -> String {
        let seconds = Double(s.elapsedNanoseconds) / 1e9
        let rate = seconds > 0 ? Double(s.bytesRewritten) / seconds : 0
        let left = s.bytesTotal > s.bytesDone ? s.bytesTotal - s.bytesDone : 0
        var lines = [
            "Rekey \(s.from.hex) -> \(s.to.hex): \(s.state == .finished ? "done" : "\(s.percentDone)% re-encrypted")",
            "\tObjects: \(s.objectsDone) of \(s.objectsTotal)",
            "\tBytes: \(s.bytesDone) of \(s.bytesTotal)",
        ]
        if s.state == .running {
            lines.append("\tRate: \(formatBytes(rate))/s")
            lines.append("\tTime left: \(rate > 0 ? "\(Int((Double(left) / rate).rounded(.up))) s" : "unknown")")
        }
        if s.objectsLocked > 0 {
            lines.append("\tStill under the removed key \(s.from.hex) (read ENOKEY): \(s.objectsLocked) objects")
        }
        return lines.joined(separator: "\n")
    }

    static func formatBytes(_ value: Double) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var v = value
        var unit = 0
        while v >= 1024 && unit < units.count - 1 {
            v /= 1024
            unit += 1
        }
        return String(format: unit == 0 ? "%.0f %@" : "%.1f %@", v, units[unit])
    }

    /// Polls until the tree is done; on a terminal redraws one progress line.
    static func wait(_ path: String) throws {
        let terminal = isatty(STDOUT_FILENO) == 1
        while true {
            let s = try status(path)
            if s.state != .running {
                if terminal { print("") }
                print(s.state == .none ? "\(path): no rekey under way" : "Rekey \(s.from.hex) -> \(s.to.hex): done")
                return
            }
            if terminal {
                let width = 30
                let filled = s.percentDone * width / 100
                let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
                FileHandle.standardOutput.write(Data("\r[\(bar)] \(s.percentDone)% \(s.objectsDone)/\(s.objectsTotal) objects".utf8))
            }
            usleep(200_000)
        }
    }
}
