import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Mounted encfsd stores, from /proc/self/mountinfo: a mount's source is its store's path.
enum MountTable {
    struct Mount {
        var point: String
        var store: String
    }

    static func encfsdMounts() -> [Mount] {
        guard let info = readAll("/proc/self/mountinfo") else { return [] }
        return info.split(separator: "\n").compactMap { line in
            let halves = line.components(separatedBy: " - ")
            guard halves.count == 2 else { return nil }
            let left = halves[0].split(separator: " "), right = halves[1].split(separator: " ")
            guard left.count > 4, right.count > 1, right[0] == "fuse.encfsd" else { return nil }
            return Mount(point: unescape(String(left[4])), store: unescape(String(right[1])))
        }
    }

    /// A /proc file read to its end. /proc reports a size of 0, and a reader that trusts one short
    /// read stops at the first page: with many mounts, the later ones were missing.
    static func readAll(_ path: String) -> String? {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { return nil }
            if n == 0 { break }
            bytes += chunk[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    static func mountpoint(ofStore store: String) -> String? {
        encfsdMounts().first { $0.store == store }?.point
    }

    /// mountinfo escapes space, tab, newline and backslash as \ooo.
    static func unescape(_ field: String) -> String {
        var out = [UInt8](), bytes = Array(field.utf8), i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "\\"), i + 3 < bytes.count,
               let value = UInt8(String(decoding: bytes[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                out.append(value)
                i += 4
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
