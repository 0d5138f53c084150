import EncCore
import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Reading raw master keys for the CLI and the daemon.
enum KeyMaterial {
    /// Reads a key from `path` (or standard input when nil): the raw bytes, 16 to 64 of them, as
    /// fscrypt and xfstests keep keys. No text encoding is guessed at: a raw key may itself look
    /// like hex, and reading it as hex would silently produce a different key.
    ///
    /// The bytes go from `read(2)` through a wiped stack buffer straight into locked memory:
    /// Foundation's `Data` would leave a copy in freed heap, where the daemon (which reads
    /// `--key-file` keys and runs for months) would keep it after the key is removed.
    static func read(path: String?) throws -> SecureBytes {
        let fd = path.map { Glibc.open($0, O_RDONLY | O_CLOEXEC) } ?? 0
        guard fd >= 0 else { throw CLIError("cannot read key file \(path!): \(String(cString: strerror(errno)))") }
        defer { if path != nil { Glibc.close(fd) } }
        // One byte more than the largest key, to tell an oversized file from a full-size key.
        let capacity = MasterKey.maximumCount + 1
        return try withUnsafeTemporaryAllocation(byteCount: capacity, alignment: 16) { buffer in
            defer { OpenSSL.cleanse(buffer) }
            var count = 0
            while count < capacity {
                let n = Glibc.read(fd, buffer.baseAddress! + count, capacity - count)
                if n < 0 && errno == EINTR { continue }
                guard n >= 0 else { throw CLIError("cannot read key file \(path ?? "(standard input)"): \(String(cString: strerror(errno)))") }
                if n == 0 { break }
                count += n
            }
            guard (MasterKey.minimumCount...MasterKey.maximumCount).contains(count) else {
                let got = count == capacity ? "more" : "\(count)"
                throw CLIError("a key must be \(MasterKey.minimumCount) to \(MasterKey.maximumCount) bytes; got \(got)")
            }
            return SecureBytes(copying: UnsafeRawBufferPointer(rebasing: buffer[0..<count]))
        }
    }

    /// A master key built from a key file; the raw bytes are wiped before this returns.
    static func masterKey(path: String) throws -> MasterKey {
        try read(path: path).withBytes { try MasterKey(raw: $0) }
    }
}
