import Foundation
import FuseBridge
#if canImport(Glibc)
import Glibc
#endif

/// What a request's caller may do beyond its uid. FUSE passes uid, gid and pid, not
/// capabilities: the kernel checks them itself wherever it decides (trusted.* get, set and
/// remove need CAP_SYS_ADMIN before a request is sent), but passes a listing through unfiltered,
/// and ext4 lists trusted.* names only to CAP_SYS_ADMIN. So for a listing the caller's effective
/// set is read from /proc/<pid>/status. A pid the daemon cannot see (another pid namespace: 0)
/// or a process gone by then counts as unprivileged, which hides names and reveals none.
enum CallerCapabilities {
    /// Capability numbers (linux/capability.h).
    enum Capability: Int {
        case fileOwner = 3 // CAP_FOWNER
        case linuxImmutable = 9 // CAP_LINUX_IMMUTABLE
        case sysAdmin = 21 // CAP_SYS_ADMIN
    }

    static func hasSysAdmin(_ context: RequestContext) -> Bool { has(.sysAdmin, context) }

    /// Whether the caller's effective set has `capability` (FS_IOC_SETFLAGS asks for
    /// CAP_LINUX_IMMUTABLE and CAP_FOWNER; the kernel checks them too, but what the daemon
    /// enforces it must decide itself).
    static func has(_ capability: Capability, _ context: RequestContext) -> Bool {
        guard context.pid > 0, let status = try? String(contentsOfFile: "/proc/\(context.pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("CapEff:") }),
              let bits = UInt64(line.dropFirst("CapEff:".count).trimmingCharacters(in: .whitespaces), radix: 16) else {
            return false
        }
        return bits & (1 << UInt64(capability.rawValue)) != 0
    }
}
