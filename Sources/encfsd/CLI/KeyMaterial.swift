import EncCore
import Foundation

/// Reading and writing raw master keys for the CLI.
enum KeyMaterial {
    /// Reads a key from `path` (or standard input when nil): the raw bytes, 16 to 64 of them, as
    /// fscrypt and xfstests keep keys. No text encoding is guessed at: a raw key may itself look
    /// like hex, and reading it as hex would silently produce a different key.
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
        let bytes = [UInt8](data)
        guard (MasterKey.minimumCount...MasterKey.maximumCount).contains(bytes.count) else {
            throw CLIError("a key must be \(MasterKey.minimumCount) to \(MasterKey.maximumCount) bytes; got \(bytes.count)")
        }
        return bytes
    }
}
