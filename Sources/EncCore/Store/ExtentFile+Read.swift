import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Reads: uncommitted extents come from memory under the node lock, committed ones are decrypted
/// after it is dropped, under a lease that keeps a commit from rewriting them meanwhile.
extension ExtentFile {
    /// Reads into a new array, for callers off the data path (symlinks, fsck, tests) that hold the
    /// node lock anyway.
    func read(offset: UInt64, count: Int) throws -> [UInt8] {
        guard offset < size, count > 0 else { return [] }
        var out = [UInt8](repeating: 0, count: Int(min(size - offset, UInt64(count))))
        _ = try out.withUnsafeMutableBytes { buffer in
            try prepareRead(offset: offset, count: count, into: buffer).finish(into: buffer)
        }
        return out
    }

    /// The second half of a read, to be done after the node lock is dropped: the committed extents
    /// still to decrypt, and the shared hold on `ioLock` that keeps a commit from rewriting them.
    /// It is a non-copyable value: the hold is released exactly once, by `finish` or, if the lease
    /// is dropped unused (an error on the way), by its `deinit`, never by anyone else.
    struct ReadLease: ~Copyable {
        let file: ExtentFile
        let plan: ReadPlan

        /// Bytes the read returns.
        var length: Int { plan.length }

        fileprivate init(file: ExtentFile, plan: ReadPlan) {
            self.file = file
            self.plan = plan
            if !plan.runs.isEmpty { file.ioLock.lockShared() }
        }

        consuming func finish(into out: UnsafeMutableRawBufferPointer) throws -> Int {
            try file.finishRead(plan, into: out)
            return plan.length
        }

        deinit {
            if !plan.runs.isEmpty { file.ioLock.unlockShared() }
        }
    }

    /// What a read still has to fetch after `prepareRead`: runs of committed extents.
    struct ReadPlan {
        var offset: UInt64
        var length: Int
        /// The file size the runs were planned against (it fixes the last extent's length).
        var size: UInt64
        var runs: [ClosedRange<UInt64>] = []
    }

    /// First half of a read, under the node lock: copies uncommitted extents and zeroes holes into
    /// `out`, and leases the committed extents still to decrypt. The caller drops the node lock and
    /// finishes the lease: decrypting outside the node lock lets reads of one file run in
    /// parallel, and the lease's shared lock keeps a commit from rewriting the extents meanwhile.
    func prepareRead(offset: UInt64, count: Int, into out: UnsafeMutableRawBufferPointer) throws -> ReadLease {
        guard offset < size, count > 0 else { return ReadLease(file: self, plan: ReadPlan(offset: offset, length: 0, size: size)) }
        let end = min(size, offset + UInt64(count))
        var plan = ReadPlan(offset: offset, length: Int(end - offset), size: size)
        try forEachExtent(offset: offset, end: end) { index, start, from, to in
            let target = UnsafeMutableRawBufferPointer(rebasing: out[Int(from - offset)..<Int(to - offset)])
            let inExtent = Int(from - start)..<Int(to - start)
            if let plain = changes.plain[index] {
                plain.withUnsafeBytes { target.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inExtent])) }
            } else if let stored = changes.sealed[index] {
                let plain = ThreadScratch.current.extent(count: geometry.extentSize)
                try stored.withUnsafeBytes { try open(index, stored: $0, into: plain, committed: false) }
                target.copyMemory(from: UnsafeRawBufferPointer(rebasing: plain[inExtent]))
            } else if holes.contains(index) {
                target.initializeMemory(as: UInt8.self, repeating: 0)
            } else if let lastRun = plan.runs.last, lastRun.upperBound + 1 == index {
                plan.runs[plan.runs.count - 1] = lastRun.lowerBound...index
            } else {
                plan.runs.append(index...index)
            }
        }
        return ReadLease(file: self, plan: plan)
    }

    /// Second half of a read: one pread per run of committed extents, each extent decrypted
    /// straight into `out` when the read wants all of it.
    /// A large run is decrypted on the fan-out helpers too (`ExtentFanOut`), each extent into its
    /// own part of `out`.
    fileprivate func finishRead(_ plan: ReadPlan, into out: UnsafeMutableRawBufferPointer) throws {
        let end = plan.offset + UInt64(plan.length)
        for run in plan.runs {
            let lastLength = geometry.plaintextLength(run.upperBound, size: plan.size)
            let runBytes = Int(geometry.backingOffset(run.upperBound) - geometry.backingOffset(run.lowerBound))
                + lastLength + ExtentGeometry.overheadBytes
            let stored = UnsafeRawBufferPointer(ThreadScratch.current.ciphertext(count: runBytes))
            let n = try backing.descriptor.pread(UnsafeMutableRawBufferPointer(mutating: stored), offset: geometry.backingOffset(run.lowerBound))
            guard n == runBytes else { throw StoreError.integrity("extent \(run.upperBound) is truncated") }
            try ExtentFanOut.forEach(run.count, extentSize: geometry.extentSize, first: run.lowerBound,
                                     keyGroup: geometry.keyGroup) { (pieces: Range<Int>) throws in
                for index in run.lowerBound + UInt64(pieces.lowerBound) ..< run.lowerBound + UInt64(pieces.upperBound) {
                    let length = geometry.plaintextLength(index, size: plan.size)
                    let at = Int(geometry.backingOffset(index) - geometry.backingOffset(run.lowerBound))
                    let one = UnsafeRawBufferPointer(rebasing: stored[at..<(at + length + ExtentGeometry.overheadBytes)])
                    let start = geometry.extentStart(index)
                    let from = max(plan.offset, start)
                    let to = min(end, start + UInt64(length))
                    if from == start && to == start + UInt64(length) {
                        let target = UnsafeMutableRawBufferPointer(rebasing: out[Int(from - plan.offset)..<Int(to - plan.offset)])
                        try open(index, stored: one, into: target, committed: true)
                    } else {
                        // This thread's own scratch: a helper must not share the caller's.
                        let plain = ThreadScratch.current.extent(count: geometry.extentSize)
                        try open(index, stored: one, into: plain, committed: true)
                        UnsafeMutableRawBufferPointer(rebasing: out[Int(from - plan.offset)..<Int(to - plan.offset)])
                            .copyMemory(from: UnsafeRawBufferPointer(rebasing: plain[Int(from - start)..<Int(to - start)]))
                    }
                }
            }
        }
    }
}
