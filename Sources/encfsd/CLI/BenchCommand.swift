import ArgumentParser
import EncCore
import Foundation

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-codec",
        abstract: "Measure the extent codec alone: seal/open GB/s on one core per extent size, and HKDF derivations/s.")

    @Option(help: "Extent sizes to measure.")
    var sizes: [Int] = [4096, 16384, 65536, 262_144, 1_048_576]

    @Option(help: "Plaintext bytes processed per measurement.")
    var bytes = 512 << 20

    func run() throws {
        let key = try MasterKey(raw: OpenSSL.random(count: 64))
        let objectID = OpenSSL.random(count: 16)
        print("| extent size | seal GB/s | open GB/s |")
        print("|---:|---:|---:|")
        for size in sizes {
            let plaintext = OpenSSL.random(count: size)
            var stored = [UInt8](repeating: 0, count: size + ExtentGeometry.overheadBytes)
            var opened = [UInt8](repeating: 0, count: size)
            let rounds = max(1, bytes / size)
            let seal = measure(rounds: rounds, size: size) { i in
                plaintext.withUnsafeBytes { p in stored.withUnsafeMutableBytes { s in
                    ExtentCodec.seal(key: key, objectID: objectID, index: UInt64(i), plaintext: p, into: s)
                }}
            }
            plaintext.withUnsafeBytes { p in stored.withUnsafeMutableBytes { s in
                ExtentCodec.seal(key: key, objectID: objectID, index: 0, plaintext: p, into: s)
            }}
            let open = measure(rounds: rounds, size: size) { _ in
                try? stored.withUnsafeBytes { s in try opened.withUnsafeMutableBytes { o in
                    try ExtentCodec.open(key: key, objectID: objectID, index: 0, stored: s, into: o)
                }}
            }
            print("| \(size) | \(String(format: "%.2f", seal)) | \(String(format: "%.2f", open)) |")
        }
        let nonce = OpenSSL.random(count: 16)
        var out = [UInt8](repeating: 0, count: 44)
        let derivations = 1_000_000
        let start = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<derivations {
            nonce.withUnsafeBytes { n in out.withUnsafeMutableBytes { key.deriveExtentKey(nonce: n, into: $0) } }
        }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        print("HKDF-SHA512 extent-key derivations: \(Int(Double(derivations) / seconds)) per second")
    }

    private func measure(rounds: Int, size: Int, _ body: (Int) -> Void) -> Double {
        for i in 0..<min(rounds, 64) { body(i) }
        let start = DispatchTime.now().uptimeNanoseconds
        for i in 0..<rounds { body(i) }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        return Double(rounds * size) / seconds / 1e9
    }
}
