#if canImport(Glibc)
import Glibc
#endif

/// Where the store reports problems it works around (an undecryptable entry skipped in a
/// listing). The daemon points this at its log; by default it goes to standard error.
public enum Diagnostics {
    public static func report(_ message: String) {
        let line = "encfsd: \(message)\n"
        _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
    }
}
