import Locking
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Where the store reports what it works around or refuses (an undecryptable entry skipped in a
/// listing, an interrupted write recovered). The daemon routes this into its logger (syslog or
/// a file, with levels); until it does, and in fsck and tests, lines go to standard error.
public enum Diagnostics {
    /// syslog's severities, most severe first, so a level keeps every severity up to its own.
    public enum Severity: Int, Comparable, Sendable {
        case error, warning, notice, info, debug
        public static func < (a: Severity, b: Severity) -> Bool { a.rawValue < b.rawValue }
    }

    public typealias Sink = @Sendable (Severity, String) -> Void

    private static let sink = Lock<Sink?>(nil)

    /// Sends every later report to `sink` (set once by the daemon before it serves).
    public static func route(to sink: @escaping Sink) { self.sink.withLock { $0 = sink } }

    /// Reports at `severity`; warnings by default: what the store works around is worth keeping
    /// in a default install's log.
    public static func report(_ message: String, severity: Severity = .warning) {
        if let sink = sink.withLock({ $0 }) {
            sink(severity, message)
            return
        }
        let line = "encfsd: \(message)\n"
        _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
    }
}
