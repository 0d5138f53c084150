import ArgumentParser
import EncCore
import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

struct FsckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fsck",
        abstract: "Check an unmounted store: headers, names, bindings, every extent, interrupted writes.",
        discussion: """
            Keys come from --key-file and from the encfsd: keys in your keyring; objects whose key is \
            absent are checked for structure only. --repair completes interrupted writes from their \
            journals, removes encfsd's own leftovers, and moves what cannot be recovered into \
            .quarantine/ in the store: it never deletes data. Exit status follows fsck(8): 0 no \
            problem, 1 problems corrected, 4 problems left, 8 operational error, 16 usage error.
            """)

    @Argument(help: "The store directory.") var store: String
    @Flag(help: "Repair what can be repaired.") var repair = false
    @Option(help: "A raw key file to check with (repeatable).") var keyFile: [String] = []
    @Flag(help: "Check even a store that is mounted or locked (results may be wrong while a daemon writes).") var force = false

    func run() throws {
        let storePath: String
        // Held while the check runs, so no daemon mounts the store meanwhile.
        var lock: StoreLock?
        do {
            storePath = try Paths.absolute(store, what: "store")
            if !force { lock = try exclusiveUse(of: storePath) }
        } catch let error as CLIError {
            FileHandle.standardError.write(Data("encfsd fsck: \(error.description)\n".utf8))
            throw ExitCode(8)
        }
        defer { lock.take()?.release() }
        let keys = KeyTable()
        do {
            for path in keyFile { try keys.add(try KeyMaterial.masterKey(path: path), claim: .init(uid: getuid(), serial: 0)) }
        } catch {
            FileHandle.standardError.write(Data("encfsd fsck: \(error)\n".utf8))
            throw ExitCode(8)
        }
        for serial in Keyring.encfsdKeysInUserKeyring() {
            if let key = try? Keyring.loadMasterKey(serial: serial) { _ = try? keys.add(key, claim: .init(uid: getuid(), serial: serial)) }
        }
        let progress = ProgressBar(total: isatty(2) == 1 ? StoreChecker.countObjects(storePath: storePath) : 0)
        let summary: StoreChecker.Summary
        do {
            summary = try StoreChecker(storePath: storePath, keys: keys, repair: repair, progress: progress.update).run()
        } catch {
            progress.finish()
            FileHandle.standardError.write(Data("encfsd fsck: \(storePath): \(error)\n".utf8))
            throw ExitCode(8)
        }
        progress.finish()
        for finding in summary.findings {
            let tag = switch finding.severity {
            case .problem: "PROBLEM"
            case .repaired: "repaired"
            case .notice: "notice"
            }
            print("\(tag): \(finding)")
        }
        print("encfsd fsck: \(summary.directories) directories, \(summary.files) files, "
              + "\(summary.extentsVerified) extents (\(summary.bytesVerified) bytes) verified"
              + (summary.locked > 0 ? ", \(summary.locked) directories without their key (structure only)" : "")
              + (summary.notChecked > 0 ? ", \(summary.notChecked) items of a half-rekeyed tree under a key not given (not checked)" : "")
              + "; \(summary.problemsLeft) problem(s) left, \(summary.repaired) repaired")
        if summary.problemsLeft > 0 { throw ExitCode(4) }
        if summary.repaired > 0 { throw ExitCode(1) }
    }
}

extension FsckCommand {
    /// The store's lock, or why the store may not be checked now.
    private func exclusiveUse(of storePath: String) throws -> StoreLock {
        let mounted = MountTable.mountpoint(ofStore: storePath).map { " (mounted at \($0))" } ?? ""
        let lock: StoreLock
        do {
            lock = try StoreLock.acquire(storePath: storePath)
        } catch .held(let holder) {
            throw CLIError("\(store) is in use by encfsd \(holder.map { "\($0)" } ?? "(holder unknown)")\(mounted); "
                           + "unmount it first, or give --force")
        } catch {
            throw CLIError("\(store): \(error)")
        }
        // A daemon of a version before the lock holds none.
        guard mounted.isEmpty else { throw CLIError("\(store) is mounted\(mounted); unmount it first, or give --force") }
        return lock
    }
}

/// A one-line progress bar on standard error, drawn only on a terminal.
final class ProgressBar {
    let total: Int
    private var last = -1
    init(total: Int) { self.total = total }

    func update(_ done: Int) {
        guard total > 0 else { return }
        let percent = min(100, done * 100 / total)
        guard percent != last else { return }
        last = percent
        let filled = percent / 5
        let bar = String(repeating: "#", count: filled) + String(repeating: " ", count: 20 - filled)
        FileHandle.standardError.write(Data("\r[\(bar)] \(percent)% \(done)/\(total) objects".utf8))
    }

    func finish() {
        if total > 0 && last >= 0 { FileHandle.standardError.write(Data("\n".utf8)) }
    }
}

