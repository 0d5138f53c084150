import ArgumentParser
import EncCore
import Foundation
import EncCrypto
import EncKeys
import EncFormat

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-codec",
        abstract: "Measure the extent codec alone: seal/open GB/s on one core per extent size, and HKDF derivations/s.",
        discussion: """
            "GCM stream" is OpenSSL's AES-256-GCM alone on one context with no per-extent setup, what \
            `openssl speed -evp aes-256-gcm -bytes <size>` measures, timed right after each seal and \
            open; the ratios are per measurement (their median), so they hold on a busy machine.
            """)

    @Option(help: "Extent sizes to measure.")
    var sizes: [Int] = [4096, 16384, 65536, 262_144, 1_048_576]

    @Option(help: "Plaintext bytes processed per measurement.")
    var bytes = 512 << 20

    @Option(help: "Measurements per size, each timing seal, open and the GCM stream back to back; more than 1 prints the best and the median, for a busy machine.")
    var runs = 1

    @Option(help: "Extent-key derivations to time (0 skips them, e.g. to profile seal and open alone).")
    var derivations = 1_000_000

    func run() throws {
        let key = try MasterKey(raw: OpenSSL.random(count: 64))
        let objectID = OpenSSL.random(count: 16)
        if runs > 1 { print("GB/s: best (median) of \(runs) measurements; ratios: median of the \(runs) pairs.\n") }
        print("| extent size | seal GB/s | open GB/s | grouped seal GB/s | grouped open GB/s | GCM stream GB/s | seal / stream | open / stream |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for size in sizes {
            let plaintext = OpenSSL.random(count: size)
            var stored = [UInt8](repeating: 0, count: size + ExtentGeometry.overheadBytes)
            var other = stored
            var opened = [UInt8](repeating: 0, count: size)
            let rounds = max(1, bytes / size)
            var seals: [Double] = [], opens: [Double] = [], streams: [Double] = []
            var groupedSeals: [Double] = [], groupedOpens: [Double] = []
            let geometry = ExtentGeometry(extentSize: size, keyGroups: true)
            let members = Int(geometry.keyGroup)
            var group = [[UInt8]](repeating: [UInt8](repeating: 0, count: size + ExtentGeometry.overheadBytes), count: members)
            var sealRatios: [Double] = [], openRatios: [Double] = []
            var scratch = plaintext
            for _ in 0..<max(1, runs) {
                seals.append(measure(rounds: rounds, size: size) { i in
                    plaintext.withUnsafeBytes { p in stored.withUnsafeMutableBytes { s in
                        ExtentCodec.seal(key: key, objectID: objectID, index: UInt64(i), plaintext: p, into: s)
                    }}
                })
                plaintext.withUnsafeBytes { p in stored.withUnsafeMutableBytes { s in
                    ExtentCodec.seal(key: key, objectID: objectID, index: 0, plaintext: p, into: s)
                }}
                plaintext.withUnsafeBytes { p in other.withUnsafeMutableBytes { s in
                    ExtentCodec.seal(key: key, objectID: objectID, index: 0, plaintext: p, into: s)
                }}
                // Two extents in turn: each open derives its key, as a random read's does (the
                // thread's context keeps only the last extent key).
                opens.append(measure(rounds: rounds, size: size) { i in
                    try! (i & 1 == 0 ? stored : other).withUnsafeBytes { s in try opened.withUnsafeMutableBytes { o in
                        try ExtentCodec.open(key: key, objectID: objectID, index: 0, stored: s, into: o)
                    }}
                })
                // Consecutive extents of one file, as a streaming write seals and a read opens them:
                // a key derivation per key group, not per extent.
                var sealer = ExtentGroupSealer(key: key, objectID: objectID, geometry: geometry)
                groupedSeals.append(measure(rounds: rounds, size: size) { i in
                    plaintext.withUnsafeBytes { p in group[i % members].withUnsafeMutableBytes { s in
                        sealer.seal(index: UInt64(i), plaintext: p, into: s)
                    }}
                })
                for m in 0..<members {
                    plaintext.withUnsafeBytes { p in group[m].withUnsafeMutableBytes { s in
                        sealer.seal(index: UInt64(m), plaintext: p, into: s)
                    }}
                }
                groupedOpens.append(measure(rounds: rounds, size: size) { i in
                    let m = i % members
                    try! group[m].withUnsafeBytes { s in try opened.withUnsafeMutableBytes { o in
                        try ExtentCodec.open(key: key, objectID: objectID, index: UInt64(m), member: geometry.keyGroupMember(UInt64(m)),
                                             stored: s, into: o)
                    }}
                })
                streams.append(scratch.withUnsafeMutableBytes { buffer in
                    OpenSSL.gcmStreamReference(buffer: buffer, rounds: min(rounds, 64))
                    let start = DispatchTime.now().uptimeNanoseconds
                    OpenSSL.gcmStreamReference(buffer: buffer, rounds: rounds)
                    let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
                    return Double(rounds * size) / seconds / 1e9
                })
                sealRatios.append(seals.last! / streams.last!)
                openRatios.append(opens.last! / streams.last!)
            }
            print("| \(size) | \(summary(seals)) | \(summary(opens)) | \(summary(groupedSeals)) | \(summary(groupedOpens)) | \(summary(streams)) "
                + "| \(percent(sealRatios)) | \(percent(openRatios)) |")
        }
        guard derivations > 0 else { return }
        let nonce = OpenSSL.random(count: 16)
        var out = [UInt8](repeating: 0, count: 44)
        let start = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<derivations {
            nonce.withUnsafeBytes { n in out.withUnsafeMutableBytes { key.deriveExtentKey(nonce: n, into: $0) } }
        }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        print("HKDF-SHA512 extent-key derivations: \(Int(Double(derivations) / seconds)) per second")
    }

    /// GB/s to two decimals; with several measurements, "best (median)".
    private func summary(_ rates: [Double]) -> String {
        let sorted = rates.sorted()
        let best = String(format: "%.2f", sorted.last!)
        guard sorted.count > 1 else { return best }
        return "\(best) (\(String(format: "%.2f", sorted[sorted.count / 2])))"
    }

    /// The median ratio, as a percentage.
    private func percent(_ ratios: [Double]) -> String {
        String(format: "%.0f%%", 100 * ratios.sorted()[ratios.count / 2])
    }

    private func measure(rounds: Int, size: Int, _ body: (Int) -> Void) -> Double {
        for i in 0..<min(rounds, 64) { body(i) }
        let start = DispatchTime.now().uptimeNanoseconds
        for i in 0..<rounds { body(i) }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        return Double(rounds * size) / seconds / 1e9
    }
}
