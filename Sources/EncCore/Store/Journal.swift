import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// The redo journal of one flush transaction: the shadow file `.journal/<object ID in hex>`.
///
/// Layout (FORMAT.md, "Journal"):
///
///     0     4     magic "EFSJ"
///     4     2     version: 1, or 2 (stores of format version 3 only)
///     6     2     reserved, 0
///     8     16    object ID
///     24    8     pending sequence: the sequence of the header that carries the pending flag
///     32    4     record count
///     36    4     reserved, 0
///     40    2048  the final header's slot image, sealed (sequence = pending + 1, flag clear)
///     2088  ...   records: u64 extent index, u32 stored length, u32 reserved, stored extent bytes
///     end   32    HMAC-SHA256 under the object's header key: version 1 over everything before it;
///                 version 2 over the fixed part, the slot image and each record's header, nonce and
///                 tag (each stored extent's own GCM tag authenticates its ciphertext)
///
/// Version 2 exists for throughput: hashing every shadow byte cost a rekey batch more CPU than
/// decrypting and resealing the extents (SHA-256 took 31% of a rekey's profile). A record's tag is
/// a MAC of its ciphertext under a key only the master key derives, so the journal MAC over the
/// tags binds the bytes as firmly; recovery opens every record before it writes any.
///
/// Redo, not undo: the shadow holds the *new* sealed extents, so recovery copies bytes and never
/// needs to re-encrypt, and a crash before the pending flag is durable leaves the old state
/// untouched. The shadow is bounded by the flush batch (the dirty limit) and recovery streams it.
enum Journal {
    static let directoryName: [UInt8] = Array(".journal".utf8)
    static let magic: [UInt8] = Array("EFSJ".utf8)
    static let fixedBytes = 40
    static let recordHeaderBytes = 16

    struct Record {
        var index: UInt64
        var stored: [UInt8]
    }

    static func name(of objectID: [UInt8]) -> [UInt8] { Array(Hex.encode(objectID).utf8) }

    /// The shadow version a store of format `storeVersion` writes, and the newest it replays.
    static func version(storeVersion: UInt16) -> UInt16 { storeVersion >= 3 ? 2 : 1 }

    /// The bytes of a stored extent a version 2 journal MAC covers: its nonce and its tag.
    static func authenticatedParts(of stored: UnsafeRawBufferPointer) -> (UnsafeRawBufferPointer, UnsafeRawBufferPointer) {
        (UnsafeRawBufferPointer(rebasing: stored[0..<ExtentGeometry.nonceBytes]),
         UnsafeRawBufferPointer(rebasing: stored[(stored.count - ExtentGeometry.tagBytes)...]))
    }

    /// Writes the shadow and makes it durable. The file is reused across transactions (truncated,
    /// never unlinked while the object is open), so its directory entry needs syncing only once.
    static func write(journalFD: borrowing FileDescriptor, objectID: [UInt8], pendingSequence: UInt64, finalSlot: [UInt8],
                      records: [Record], key: MasterKey, storeVersion: UInt16) throws {
        let version = version(storeVersion: storeVersion)
        let shadowName = name(of: objectID)
        var created = false
        let fd = try openShadow(shadowName, in: journalFD, created: &created)
        do {
            var w = ByteWriter(capacity: fixedBytes + finalSlot.count)
            w.raw(magic)
            w.u16(version)
            w.u16(0)
            w.raw(objectID)
            w.u64(pendingSequence)
            w.u32(UInt32(records.count))
            w.u32(0)
            w.raw(finalSlot)
            let mac = key.withHeaderKey(objectID: objectID) { OpenSSL.HMACStream(key: $0) }
            var offset: Int64 = 0
            func emit(_ bytes: [UInt8]) throws {
                bytes.withUnsafeBytes { mac.update($0) }
                try bytes.withUnsafeBytes { try fd.pwrite($0, offset: offset) }
                offset += Int64(bytes.count)
            }
            try emit(w.bytes)
            // Record headers and extents go out 32 pairs per pwritev: a 16 MiB batch of 16 KiB
            // extents took 2,048 pwrite calls one piece at a time.
            var first = records.startIndex
            while first < records.endIndex {
                let batch = records[first..<min(records.endIndex, first + 32)]
                let headers = batch.map { record -> [UInt8] in
                    var h = ByteWriter(capacity: recordHeaderBytes)
                    h.u64(record.index)
                    h.u32(UInt32(record.stored.count))
                    h.u32(0)
                    return h.bytes
                }
                try withBuffers(zip(headers, batch).flatMap { [$0, $1.stored] }) { buffers in
                    if version == 1 {
                        for buffer in buffers { mac.update(buffer) }
                    } else {
                        for pair in stride(from: 0, to: buffers.count, by: 2) {
                            let (nonce, tag) = authenticatedParts(of: buffers[pair + 1])
                            mac.update(buffers[pair])
                            mac.update(nonce)
                            mac.update(tag)
                        }
                    }
                    try fd.pwritev(buffers, offset: offset)
                    offset += Int64(buffers.reduce(0) { $0 + $1.count })
                }
                first = batch.endIndex
            }
            let trailer = mac.finish()
            try trailer.withUnsafeBytes { try fd.pwrite($0, offset: offset) }
            try fd.ftruncate(offset + 32)
            try fd.fdatasync()
        }
        // A new directory entry is durable only once its directory is synced.
        if created {
            let dir = try journalFD.listingDescriptor()
            try dir.fsync()
        }
    }

    /// The shadow of a new transaction: created (`created` set: its entry still needs a sync), or
    /// the one a finished transaction left, reopened.
    private static func openShadow(_ shadowName: [UInt8], in journalFD: borrowing FileDescriptor,
                                   created: inout Bool) throws -> FileDescriptor {
        do {
            let fd = try journalFD.createEntry(shadowName, mode: 0o600)
            created = true
            return fd
        } catch StoreError.system(EEXIST) {
            // A planted symlink, FIFO or directory here fails the type check: the flush fails
            // with EIO and nothing outside the journal is touched.
            return try journalFD.openPrivateFile(shadowName)
        }
    }

    /// The shadow an interrupted transaction of `objectID` left, for its replay.
    private static func openShadow(of objectID: [UInt8], in journalFD: borrowing FileDescriptor) throws -> FileDescriptor {
        do {
            return try journalFD.openPrivateFile(name(of: objectID))
        } catch let error as StoreError where error != .system(ENOENT) {
            throw StoreError.integrity("interrupted write cannot be recovered: its journal is unusable: \(error)")
        } catch {
            throw StoreError.integrity("interrupted write cannot be recovered: its journal is missing")
        }
    }

    /// Removes the shadow when the object is closed; a lost unlink leaves a file that recovery
    /// ignores (no pending header names it) and the next transaction overwrites.
    static func remove(journalFD: borrowing FileDescriptor, objectID: [UInt8]) {
        try? journalFD.unlinkAt(name(of: objectID))
    }

    /// Completes the transaction `pending` marks: verifies the whole shadow (streaming), copies its
    /// extents into place, and writes its final header. Returns the final header. Called only by
    /// `HeaderSlots.completeInterruptedWrite`, which owns when a pending header is replayed.
    ///
    /// - Throws: `StoreError.integrity` when the shadow is missing, damaged or belongs to another
    ///   transaction. The object is then refused, never served half-written.
    /// - Parameter storeVersion: the store's format version; it bounds the shadow versions accepted.
    static func recover(journalFD: borrowing FileDescriptor, objectFD: borrowing FileDescriptor, pending: ObjectHeader, key: MasterKey,
                        storeVersion: UInt16) throws -> ObjectHeader {
        let shadow = try openShadow(of: pending.objectID, in: journalFD)
        do {
            let length = Int64(try shadow.fstat().st_size)
            func read(_ count: Int, at offset: Int64) throws -> [UInt8] {
                var bytes = [UInt8](repeating: 0, count: count)
                let n = try bytes.withUnsafeMutableBytes { try shadow.pread($0, offset: offset) }
                guard n == count else { throw StoreError.integrity("interrupted write's journal is truncated") }
                return bytes
            }
            let bodyEnd = length - 32
            guard bodyEnd >= Int64(fixedBytes + ExtentGeometry.headerSlotBytes) else {
                throw StoreError.integrity("interrupted write's journal is empty or truncated")
            }
            var r = ByteReader(try read(fixedBytes, at: 0)[...])
            guard r.raw(4) == magic, let version = r.u16(), version >= 1, version <= self.version(storeVersion: storeVersion),
                  r.u16() == 0, r.raw(16) == pending.objectID,
                  r.u64() == pending.sequence, let recordCount = r.u32(), r.u32() == 0 else {
                throw StoreError.integrity("journal belongs to another transaction")
            }
            let slot = try read(ExtentGeometry.headerSlotBytes, at: Int64(fixedBytes))
            guard case .valid(let final) = HeaderCodec.open(slot: slot[...], key: key),
                  final.sequence == pending.sequence + 1, final.objectID == pending.objectID,
                  !final.flags.contains(.pendingWrite), final.extentSize == pending.extentSize,
                  final.flags.contains(.keyGroups) == pending.flags.contains(.keyGroups) else {
                throw StoreError.integrity("journal's final header is invalid")
            }
            let geometry = final.geometry
            /// The header of the record at `offset`, checked against the final header and the shadow's length.
            func record(at offset: Int64) throws -> (index: UInt64, count: Int) {
                var h = ByteReader(try read(recordHeaderBytes, at: offset)[...])
                guard let index = h.u64(), let count = h.u32().map(Int.init), h.u32() == 0,
                      index < geometry.extentCount(size: final.size),
                      count == geometry.plaintextLength(index, size: final.size) + ExtentGeometry.overheadBytes,
                      offset + Int64(recordHeaderBytes + count) <= bodyEnd else {
                    throw StoreError.integrity("journal record is malformed")
                }
                return (index, count)
            }
            let recordsStart = Int64(fixedBytes + ExtentGeometry.headerSlotBytes)
            // Pass 1: authenticate everything before acting on any of it.
            let mac = key.withHeaderKey(objectID: pending.objectID) { OpenSSL.HMACStream(key: $0) }
            if version == 1 {
                var offset: Int64 = 0
                while offset < bodyEnd {
                    let chunk = try read(Int(min(Int64(1 << 20), bodyEnd - offset)), at: offset)
                    chunk.withUnsafeBytes { mac.update($0) }
                    offset += Int64(chunk.count)
                }
            } else {
                try read(Int(recordsStart), at: 0).withUnsafeBytes { mac.update($0) }
                var offset = recordsStart
                for _ in 0..<recordCount {
                    let (index, count) = try record(at: offset)
                    let bytes = try read(recordHeaderBytes + count, at: offset)
                    try bytes.withUnsafeBytes { raw in
                        let stored = UnsafeRawBufferPointer(rebasing: raw[recordHeaderBytes...])
                        let (nonce, tag) = authenticatedParts(of: stored)
                        mac.update(UnsafeRawBufferPointer(rebasing: raw[0..<recordHeaderBytes]))
                        mac.update(nonce)
                        mac.update(tag)
                        let plain = ThreadScratch.current.extent(count: geometry.extentSize)
                        do {
                            try ExtentCodec.open(key: key, objectID: pending.objectID, index: index,
                                                 member: geometry.keyGroupMember(index), stored: stored, into: plain)
                        } catch {
                            throw StoreError.integrity("journal record for extent \(index) failed authentication")
                        }
                    }
                    offset += Int64(recordHeaderBytes + count)
                }
                guard offset == bodyEnd else { throw StoreError.integrity("journal has bytes after its records") }
            }
            guard constantTimeEqual(mac.finish(), try read(32, at: bodyEnd)) else {
                throw StoreError.integrity("interrupted write's journal failed authentication")
            }
            // Pass 2: redo, one record at a time.
            var offset = recordsStart
            for _ in 0..<recordCount {
                let (index, count) = try record(at: offset)
                let stored = try read(count, at: offset + Int64(recordHeaderBytes))
                try stored.withUnsafeBytes { try objectFD.pwrite($0, offset: geometry.backingOffset(index)) }
                offset += Int64(recordHeaderBytes + count)
            }
            let finalLength = geometry.backingLength(size: final.size)
            if Int64(try objectFD.fstat().st_size) < finalLength { try objectFD.ftruncate(finalLength) }
            try objectFD.fdatasync()
            FaultPoints.reach(.recoveryExtentsApplied)
            try HeaderSlots.writeSealed(fd: objectFD, slot, sequence: final.sequence)
            try objectFD.fdatasync()
            FaultPoints.reach(.recoveryHeaderWritten)
            if Int64(try objectFD.fstat().st_size) > finalLength { try objectFD.ftruncate(finalLength) }
            try shadow.ftruncate(0)
            return final
        }
    }
}
