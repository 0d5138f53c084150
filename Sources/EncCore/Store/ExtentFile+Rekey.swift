import Locking
import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Rekey: legacy extents (sealed under the header's `previousPolicy`) resealed under `key`, either
/// queued for the next commit or resealed in batches without the node lock.
extension ExtentFile {
    /// Committed extents a rekey has still to rewrite.
    var legacyExtentCount: UInt64 {
        legacy.ranges.reduce(0) { $0 + UInt64($1.count) }
    }

    /// Queues up to `limit` legacy extents for resealing under `key` by the next commit (which
    /// journals them: they are overwrites in place), loading each under the legacy key. Returns
    /// the plaintext bytes queued. Extents the file already holds dirty are left to that write.
    func queueLegacy(limit: Int) throws -> Int {
        var queued = 0
        var bytes = 0
        for range in legacy.ranges {
            for index in range where queued < limit {
                queued += 1
                guard !changes.buffers(index), !holes.contains(index), index < geometry.extentCount(size: size)
                else { continue }
                try makeDirty(index, willOverwriteWhole: false)
                bytes += geometry.plaintextLength(index, size: size)
            }
        }
        if queued > 0 { metadataChanged = true }
        return bytes
    }

    // MARK: rekey batches resealed without the node lock

    /// Up to `limit` committed legacy extents that a rekey can reseal without the node lock: whole
    /// (their stored length cannot change with the size), not a hole, not held dirty or sealed
    /// by a write. The rest (a partial last extent, extents a write holds) go through
    /// `queueLegacy`.
    func wholeLegacyExtents(limit: Int) -> [UInt64] {
        let wholeCount = min(size, committedSize) / UInt64(geometry.extentSize)
        var found: [UInt64] = []
        for range in legacy.ranges where found.count < limit {
            for index in range where found.count < limit {
                guard index < wholeCount else { break }
                guard !changes.buffers(index), !holes.contains(index) else { continue }
                found.append(index)
            }
        }
        return found
    }

    /// Reads the whole legacy extents `indices` (ascending) from the backing file, opens them under
    /// the legacy key and seals them under `key`. Runs without the node lock: it reads only what
    /// never changes for this file (descriptor, keys, object ID, geometry). A commit may rewrite
    /// the extents meanwhile; the caller installs the result only if none did (`installResealed`),
    /// and a failed open then means that, not damage.
    ///
    /// - Parameter threads: how many threads share the decryption and sealing.
    func resealLegacy(_ indices: [UInt64], threads: Int) throws -> [Journal.Record] {
        guard let legacyKey else { throw StoreError.noKey }
        let stride = geometry.stride
        let resealed = Lock([Journal.Record]())
        let failure = Lock<Error?>(nil)
        let parts = max(1, min(threads, indices.count / 16))
        DispatchQueue.concurrentPerform(iterations: parts) { part in
            let mine = indices[(indices.count * part / parts)..<(indices.count * (part + 1) / parts)]
            var records: [Journal.Record] = []
            records.reserveCapacity(mine.count)
            var sealer = object.groupSealer()
            do {
                var i = mine.startIndex
                while i < mine.endIndex {
                    // Contiguous extents are read with one pread, at most 64 at a time.
                    var j = i
                    while j + 1 < mine.endIndex && j - i < 63 && mine[j + 1] == mine[j] + 1 { j += 1 }
                    let count = j - i + 1
                    let stored = ThreadScratch.current.ciphertext(count: count * stride)
                    let n = try backing.descriptor.pread(stored, offset: geometry.backingOffset(mine[i]))
                    guard n == stored.count else { throw StoreError.integrity("extent \(mine[j]) is truncated") }
                    let plain = ThreadScratch.current.extent(count: geometry.extentSize)
                    for k in 0..<count {
                        let index = mine[i + k]
                        let one = UnsafeRawBufferPointer(rebasing: stored[(k * stride)..<((k + 1) * stride)])
                        do {
                            try ExtentCodec.open(key: legacyKey, objectID: objectID, index: index,
                                                 member: geometry.keyGroupMember(index), stored: one, into: plain)
                        } catch {
                            throw StoreError.integrity("extent \(index) failed authentication")
                        }
                        records.append(Journal.Record(index: index, stored: object.seal(index, plaintext: UnsafeRawBufferPointer(plain),
                                                                                        using: &sealer)))
                    }
                    i = j + 1
                }
                resealed.withLock { $0 += records }
            } catch {
                failure.withLock { $0 = error }
            }
        }
        if let error = failure.withLock({ $0 }) { throw error }
        return resealed.withLock { $0 }
    }

    /// Takes resealed legacy extents for the next commit, each only if it is still what
    /// `wholeLegacyExtents` chose it for (a write or truncate meanwhile wins). The caller has
    /// checked that no header was written since they were read. Returns the plaintext bytes taken.
    func installResealed(_ records: [Journal.Record], sealedWith sealing: MasterKey) -> Int {
        guard sealing === key || sealing.identifier == key.identifier else { return 0 }
        let wholeCount = min(size, committedSize) / UInt64(geometry.extentSize)
        var taken = 0
        for record in records where record.index < wholeCount && legacy.contains(record.index)
            && !changes.buffers(record.index) && !holes.contains(record.index) {
            changes.setSealed(record.index, record.stored)
            taken += geometry.extentSize
        }
        return taken
    }

    /// Extent `index` sealed with a fresh nonce. The seal writes every byte of the result, so it
}
