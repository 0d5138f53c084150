import Locking
import EncCore
import Foundation
import FuseBridge
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// The mount daemon: opens the store, mounts, serves until unmounted or signalled.
struct Daemon {
    static let readyLine = "encfsd: mount ready"

    let storePath: String
    let mountOptions: MountOptions
    let reportReady: Bool
    let logFile: String?
    /// Key files to unlock with at start (`--key-file`, e.g. from systemd credentials). Paths, not
    /// keys: the daemon holds no reference to a key it has handed to the key table, or removing
    /// the key could never complete (it would stay "incompletely removed", its subkeys in memory).
    var keyFiles: [String] = []
    /// How many keys a non-root user may claim (EDQUOT past it).
    var keyQuota = 200
    var unlockFromKeyring = true
    var logLevel = LogLevel.notice
    /// Unmount after this long without open files or requests (`--idle`).
    var idle: Duration?
    /// The `-o` atime options: the kernel applies none of them to a FUSE mount's inodes.
    var accessTimes = AccessTimeOptions()

    func serve() throws {
        signal(SIGPIPE, SIG_IGN)
        // Past RLIMIT_FSIZE a write gives EFBIG, reported to the caller, instead of killing the daemon.
        signal(SIGXFSZ, SIG_IGN)
        Sys.limitMallocArenas(2)
        if reportReady { _ = setsid() }
        // --log-file, else syslog in the background, else standard error (a terminal, or the
        // journal under systemd).
        try Log.start(logFile.map { .file($0) } ?? (reportReady ? .syslog : .standardError), level: logLevel)
        raiseDescriptorLimit()
        // Held until the process ends (the kernel drops it then, however the daemon dies).
        let lock = try Self.lock(storePath)
        let invalidator = CacheInvalidator()
        let table = Lock<KeyTable?>(nil)
        let keys = KeyTable(userQuota: keyQuota) { identifier in
            if let keys = table.withLock({ $0 }) { invalidator.keyWiped(identifier, keys: keys) }
        }
        table.withLock { $0 = keys }
        let volume = try Volume(storePath: storePath, keys: keys, openingEpoch: false, accessTimes: accessTimes)
        if let refusal = volume.capabilities.refusal { throw CLIError("cannot mount \(storePath): \(refusal)") }
        if let warning = volume.capabilities.lockWarning { Log.warning(warning) }
        Log.notice(volume.capabilities.summary)
        invalidator.attach(volume: volume)
        let keyService = KeyService(keys: keys, invalidator: invalidator)
        try Self.unlock(keys, withKeyFiles: keyFiles)
        let fromKeyring = unlockFromKeyring ? keyService.addKeysFromUserKeyring() : []
        for identifier in fromKeyring { Log.notice("key \(identifier) added at start") }
        let requestCounts = RequestCounts()
        let session = try FuseSession(fileSystem: EncryptedFileSystem(volume: volume, keyService: keyService, requestCounts: requestCounts),
                                      options: mountOptions, counts: requestCounts)
        invalidator.attach(session: session)
        volume.attributesMoved.withLock { $0 = AttributesMovedObserver { invalidator.attributesMoved($0) } }
        volume.kernelWritesPages.store(mountOptions.writebackCache, ordering: .relaxed)
        // Past every check that can refuse the mount: a refused mount leaves no open epoch, which
        // the next mount would read as an unclean shutdown (and so as leave to pass over damage).
        try volume.openEpoch()
        if let idle { IdleUnmount.start(after: idle, session: session, volume: volume, mountpoint: mountOptions.mountpoint) }
        // The timer flush: buffered writes reach the journal within a few seconds even when a file
        // is neither closed nor synced.
        Thread.detachNewThread {
            while true {
                Thread.sleep(forTimeInterval: 1)
                // Trimming returns freed extent buffers to the kernel; while writes are under way
                // they would only be faulted in again, so the heap is trimmed once writing stops.
                if !volume.commitIdleFiles(olderThan: .seconds(2)) { Sys.trimMalloc() }
                volume.dropStaleBindings()
            }
        }
        // A rekey interrupted by a crash or an unmount carries on where its headers say it stopped.
        volume.resumeRekeys()
        if reportReady { detach() }
        SystemdNotify.ready()
        Log.notice("mounted \(storePath) on \(mountOptions.mountpoint)")
        try session.run()
        lock.markClosing()
        // The rekey worker stops first: nothing may be written once the epoch is closed.
        volume.rekeys.stop()
        volume.closeCleanly()
        SystemdNotify.stopping()
        Log.notice("unmounted \(mountOptions.mountpoint)")
    }

    /// The store's lock. A holder that has unmounted and is finishing (its last commits and the
    /// syncfs that ends its epoch cleanly) is waited for, up to a minute: `umount` returns before
    /// the old daemon exits, and a `mount` right after it is what users do.
    private static func lock(_ storePath: String) throws -> StoreLock {
        let deadline = ContinuousClock.now + .seconds(60)
        while true {
            do {
                return try StoreLock.acquire(storePath: storePath)
            } catch .held(let holder) where holder?.closing == true && ContinuousClock.now < deadline {
                Thread.sleep(forTimeInterval: 0.05)
            } catch {
                throw CLIError("cannot mount \(storePath): \(error)")
            }
        }
    }

    /// Reads each key file and gives its key to the table, which then holds the only reference.
    /// A function of its own so no local outlives the loading: `serve` never returns while the
    /// daemon runs, and a debug build keeps locals alive to the end of their scope.
    private static func unlock(_ keys: KeyTable, withKeyFiles paths: [String]) throws {
        for path in paths {
            let identifier = try keys.add(try KeyMaterial.masterKey(path: path), claim: .init(uid: getuid(), serial: 0))
            Log.notice("key \(identifier) added at start")
        }
    }

    /// The node table holds one descriptor per known object, as passthrough_hp does.
    private func raiseDescriptorLimit() {
        var limit = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
    }

    /// Tells the waiting parent the mount is ready, then lets go of its pipe.
    private func detach() {
        FileHandle.standardOutput.write(Data((Self.readyLine + "\n").utf8))
        // Standard output and error go where the log goes (the runtime's crash reports with them),
        // through the descriptor the logger already holds rather than the path opened again.
        let null = Glibc.open("/dev/null", O_RDWR)
        let target = Log.fileDescriptor ?? null
        if null >= 0 { dup2(null, 0) }
        if target >= 0 {
            dup2(target, 1)
            dup2(target, 2)
        }
        if null >= 0 { Glibc.close(null) }
    }
}

/// Starts `encfsd mount --report-ready` in the background and waits for it to be mounted.
enum Background {
    static func start(arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        process.arguments = arguments
        process.standardInput = FileHandle.nullDevice
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        var collected = ""
        let reader = pipe.fileHandleForReading
        while true {
            let chunk = reader.availableData
            if chunk.isEmpty { break }
            collected += String(decoding: chunk, as: UTF8.self)
            if collected.contains(Daemon.readyLine) { return }
        }
        process.waitUntilExit()
        var message = collected.trimmingCharacters(in: .whitespacesAndNewlines)
        // The daemon reported through ArgumentParser, which prefixes "Error: " as this process will.
        if message.hasPrefix("Error: ") { message.removeFirst("Error: ".count) }
        throw CLIError(message.isEmpty ? "the daemon exited with status \(process.terminationStatus)" : message)
    }
}
