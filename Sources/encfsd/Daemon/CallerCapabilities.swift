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
    ///
    /// A CapEff counts only for a caller in the daemon's own user namespace: anyone can make a
    /// namespace of their own and hold every capability there (`unshare -Ur`), which grants
    /// nothing over objects outside it (ext4 asks for CAP_LINUX_IMMUTABLE in the initial
    /// namespace). A caller in another one counts as unprivileged.
    static func has(_ capability: Capability, _ context: RequestContext) -> Bool {
        guard context.pid > 0, let own = userNamespace("self"), userNamespace(String(context.pid)) == own,
              let status = try? String(contentsOfFile: "/proc/\(context.pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("CapEff:") }),
              let bits = UInt64(line.dropFirst("CapEff:".count).trimmingCharacters(in: .whitespaces), radix: 16) else {
            return false
        }
        return bits & (1 << UInt64(capability.rawValue)) != 0
    }

    /// The user namespace of /proc/`process` (`user:[inode]`), nil when it cannot be read.
    private static func userNamespace(_ process: String) -> String? {
        var buffer = [CChar](repeating: 0, count: 64)
        let n = readlink("/proc/\(process)/ns/user", &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
