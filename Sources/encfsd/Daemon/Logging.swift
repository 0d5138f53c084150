import Locking
import ArgumentParser
import EncCore
import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// How much the daemon logs: syslog's severities from most to least severe. A level keeps its
/// own severity and every more severe one; the default, `notice`, keeps what an administrator
/// must see (integrity failures, keys coming and going, recoveries) and drops routine chatter.
enum LogLevel: String, CaseIterable, ExpressibleByArgument, Sendable {
    case error, warning, notice, info, debug

    var severity: Diagnostics.Severity {
        switch self {
        case .error: .error
        case .warning: .warning
        case .notice: .notice
        case .info: .info
        case .debug: .debug
        }
    }
}

/// The daemon's one logger. Everything it reports, and the store's `Diagnostics`, goes through
/// here, to one destination chosen at start:
/// - `syslog`: a background daemon (identifier `encfsd`, facility daemon, with its pid), which
///   journald picks up from /dev/log on a systemd machine;
/// - `standardError`: the foreground. Under systemd (`JOURNAL_STREAM` set) each line carries a
///   `<N>` priority prefix, which journald reads as the line's severity;
/// - `file`: `--log-file`, opened at start, so nothing said before the daemon detaches is lost.
enum Log {
    enum Destination: Sendable {
        case syslog
        case standardError
        case file(String)
    }

    private struct Configuration {
        var destination = Destination.standardError
        var fd: Int32 = 2
        var level = Diagnostics.Severity.notice
        var priorityPrefix = false
    }

    private static let configuration = Lock(Configuration())
    /// openlog(3) keeps the identifier pointer: it must live as long as the process. Safe to share:
    /// written once here, only ever read (by libc).
    nonisolated(unsafe) private static let identifier: UnsafeMutablePointer<CChar> = strdup("encfsd")

    /// Chooses where and how much to log, and routes the store's diagnostics here.
    static func start(_ destination: Destination, level: LogLevel) throws {
        var fd: Int32 = 2
        switch destination {
        case .syslog:
            // LOG_NDELAY connects now, so the first message is not the one to pay for it.
            openlog(identifier, LOG_PID | LOG_NDELAY, LOG_DAEMON)
        case .file(let path):
            fd = Glibc.open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw CLIError("log file \(path): \(String(cString: strerror(errno)))") }
        case .standardError:
            break
        }
        let journal = ProcessInfo.processInfo.environment["JOURNAL_STREAM"] != nil
        configuration.withLock {
            if $0.fd > 2 { Glibc.close($0.fd) }
            $0 = Configuration(destination: destination, fd: fd, level: level.severity,
                               priorityPrefix: journal && fd == 2)
        }
        Diagnostics.route { severity, message in write(severity, message) }
    }

    /// The log file's descriptor, when logging to a file.
    static var fileDescriptor: Int32? { configuration.withLock { $0.fd > 2 ? $0.fd : nil } }

    static func error(_ message: String) { write(.error, message) }
    static func warning(_ message: String) { write(.warning, message) }
    static func notice(_ message: String) { write(.notice, message) }
    static func info(_ message: String) { write(.info, message) }
    static func debug(_ message: String) { write(.debug, message) }

    static func write(_ severity: Diagnostics.Severity, _ message: String) {
        let current = configuration.withLock { $0 }
        guard severity <= current.level else { return }
        switch current.destination {
        case .syslog:
            message.withCString { text in
                withVaList([text]) { vsyslog(LOG_DAEMON | priority(severity), "%s", $0) }
            }
        case .standardError, .file:
            // One write(2) per line, unbuffered: a daemon dying at a fault point keeps its last words.
            let line = current.priorityPrefix
                ? "<\(priority(severity))>\(message)\n"
                : "\(timestamp()) encfsd[\(getpid())]: \(label(severity)): \(message)\n"
            _ = line.withCString { Glibc.write(current.fd, $0, strlen($0)) }
        }
    }

    private static func priority(_ severity: Diagnostics.Severity) -> Int32 {
        switch severity {
        case .error: LOG_ERR
        case .warning: LOG_WARNING
        case .notice: LOG_NOTICE
        case .info: LOG_INFO
        case .debug: LOG_DEBUG
        }
    }

    private static func label(_ severity: Diagnostics.Severity) -> String {
        switch severity {
        case .error: "error"
        case .warning: "warning"
        case .notice: "notice"
        case .info: "info"
        case .debug: "debug"
        }
    }

    private static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var parts = tm()
        var seconds = now.tv_sec
        gmtime_r(&seconds, &parts)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", Int(parts.tm_year) + 1900, Int(parts.tm_mon) + 1,
                      Int(parts.tm_mday), Int(parts.tm_hour), Int(parts.tm_min), Int(parts.tm_sec), now.tv_nsec / 1_000_000)
    }
}
