import Testing
import Foundation
import Locking
@testable import EncCore

/// The fan-out of one request's extents over helper threads: every piece runs exactly once, on
/// whichever thread, however many requests share the helpers; and what it seals or opens is the
/// same as on one thread.
@Suite struct ForkJoinTests {
    /// Runs `forEach(count)` and returns how many times each index ran.
    private func counts(_ pool: ForkJoin, _ count: Int) -> [Int] {
        let seen = Lock([Int](repeating: 0, count: count))
        pool.forEach(count) { i in seen.withLock { $0[i] += 1 } }
        return seen.withLock { $0 }
    }

    @Test(arguments: [0, 1, 2, 3, 17, 1000])
    func everyPieceRunsExactlyOnce(count: Int) {
        let pool = ForkJoin(helpers: 3)
        #expect(counts(pool, count) == Array(repeating: 1, count: count))
        #expect(counts(ForkJoin(helpers: 0), count) == Array(repeating: 1, count: count))
    }

    @Test func requestsSharingTheHelpersEachGetEveryPiece() {
        let pool = ForkJoin(helpers: 2)
        let wrong = Lock(0)
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            for round in 0..<200 where counts(pool, 5 + round % 40) != Array(repeating: 1, count: 5 + round % 40) {
                wrong.withLock { $0 += 1 }
            }
        }
        #expect(wrong.withLock { $0 } == 0)
    }

    @Test func helpersTakePiecesWhenTheCallerIsBusy() {
        // Each piece waits (up to 5 s) for a second thread to have joined, so the caller cannot
        // take every piece before the helper wakes, however loaded the machine.
        let pool = ForkJoin(helpers: 1)
        let threads = Lock<Set<UInt64>>([])
        let deadline = ContinuousClock.now + .seconds(5)
        pool.forEach(16) { _ in
            threads.withLock { _ = $0.insert(UInt64(pthread_self())) }
            while threads.withLock({ $0.count }) < 2 && ContinuousClock.now < deadline { usleep(1_000) }
        }
        #expect(threads.withLock { $0.count } == 2)
    }

    @Test func theFirstFailingRangeIsRethrownAfterAllRanges() {
        struct Failure: Error, Equatable { let at: Int }
        let ran = Lock(0)
        // 1 MiB of 4 KiB extents: spread, in pieces of several extents.
        #expect(throws: Failure(at: 128)) {
            try ExtentFanOut.forEach(256, extentSize: 4096) { (range: Range<Int>) throws in
                ran.withLock { $0 += range.count }
                if range.contains(128) { throw Failure(at: 128) }
                if range.contains(200) { throw Failure(at: 200) }
            }
        }
        #expect(ran.withLock { $0 } == 256)
    }

    @Test(arguments: [4096, 16384])
    func largeWritesAndReadsRoundTripThroughTheFanOut(extentSize: Int) throws {
        let object = try ScratchObject(extentSize: extentSize)
        // Whole extents sealed ahead (the appended run), then an unaligned overwrite of most of
        // them (plain extents sealed at the commit), then one read of everything.
        var expected = randomBytes(1 << 20, seed: 1)
        try object.write(expected, at: 0)
        let patch = randomBytes(700_001, seed: 2)
        try object.write(patch, at: 5_000)
        expected.replaceSubrange(5_000..<(5_000 + patch.count), with: patch)
        #expect(try object.read(0, 1 << 20) == expected)
        #expect(try object.read(3, (1 << 20) - 10) == Array(expected[3..<((1 << 20) - 7)]))
    }

    @Test func aDamagedExtentInALargeReadFailsTheRead() throws {
        let object = try ScratchObject(extentSize: 4096)
        try object.write(randomBytes(1 << 20, seed: 3), at: 0)
        var backing = object.backingBytes
        let stride = 4096 + 32
        backing[4096 + 200 * stride + 100] ^= 1
        object.backingBytes = backing
        #expect(throws: (any Error).self) { try object.read(0, 1 << 20) }
        #expect(try object.read(0, 4096 * 100).count == 4096 * 100)
    }
}
