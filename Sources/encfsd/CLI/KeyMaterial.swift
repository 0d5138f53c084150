import EncCore
import Foundation

/// Reading and writing raw master keys for the CLI.
enum KeyMaterial {
    /// Reads a key from `path` (or standard input when nil). A file holds the raw bytes, or the
    /// same bytes as hex text (one line); either way 16 to 64 bytes, as fscrypt accepts.
    static func read(path: String?) throws -> [UInt8] {
        let data: Data
        if let path {
            guard let contents = FileManager.default.contents(atPath: path) else {
                throw CLIError("cannot read key file \(path)")
            }
            data = contents
        } else {
            data = FileHandle.standardInput.readDataToEndOfFile()
        }
        var bytes = [UInt8](data)
        if let text = String(bytes: bytes, encoding: .ascii)?.trimmingCharacters(in: .whitespacesAndNewlines),
           text.count >= 32, let decoded = Hex.decode(text) {
            bytes.withUnsafeMutableBytes { OpenSSL.cleanse($0) }
            bytes = decoded
        }
        guard (MasterKey.minimumCount...MasterKey.maximumCount).contains(bytes.count) else {
            throw CLIError("a key must be \(MasterKey.minimumCount) to \(MasterKey.maximumCount) bytes; got \(bytes.count)")
        }
        return bytes
    }
}

struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
