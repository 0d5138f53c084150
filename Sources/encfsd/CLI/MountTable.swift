import Foundation

/// Mounted encfsd stores, from /proc/self/mountinfo: a mount's source is its store's path.
enum MountTable {
    struct Mount {
        var point: String
        var store: String
    }

    static func encfsdMounts() -> [Mount] {
        guard let info = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return [] }
        return info.split(separator: "\n").compactMap { line in
            let halves = line.components(separatedBy: " - ")
            guard halves.count == 2 else { return nil }
            let left = halves[0].split(separator: " "), right = halves[1].split(separator: " ")
            guard left.count > 4, right.count > 1, right[0] == "fuse.encfsd" else { return nil }
            return Mount(point: unescape(String(left[4])), store: unescape(String(right[1])))
        }
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
