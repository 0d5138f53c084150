import COpenSSL
import Synchronization

/// HMAC-SHA512 contexts already keyed with a master key's HKDF PRK, one set per thread, so a
/// per-extent HKDF-Expand costs the two compressions of the HMAC itself and not the two more
/// (and the allocations) of hashing the key pads again.
///
/// Identity: entries are found by the master key's `instanceSerial`, a number no other
/// `MasterKey` instance ever gets, not by the object's address. An address is reused as soon as
/// a wiped key's memory is freed, and a new key allocated there would then derive with the old
/// key's pads: wrong keys, silently.
///
/// Wiping: a context holds the HMAC pad state, which is as good as the PRK for deriving extent
/// keys, and it lives on the ordinary heap. A serial checked on use would stop a wiped key's
/// state from being *used*, but an idle worker thread would keep that secret in memory until it
/// next ran, long after soft removal promised the key was gone. So `MasterKey.deinit` frees the
/// contexts of its serial in every thread right away (`forget`), and a thread frees all of its
/// own when it exits (`retire`). Each cache has a lock for that purpose only: the owning thread
/// takes it (uncontended) around each use, and another thread takes it only to free an entry,
/// never to use one, so no context is ever used by two threads.
package final class KeyedExpandCache: Sendable {
    /// More master keys than this in use by one thread evicts the least recently keyed one.
    package static let capacity = 8

    /// Invariant making this `@unchecked Sendable`: an entry only moves into and out of its
    /// thread's `entries` lock, under which alone its context is used or freed.
    private struct Entry: @unchecked Sendable {
        package var serial: UInt64
        package var ctx: OpaquePointer
    }

    private let entries = Mutex<[Entry]>([])

    /// Every thread's cache, for `forget`.
    private static let registry = Mutex<[ObjectIdentifier: KeyedExpandCache]>([:])

    package init() {
        Self.registry.withLock { $0[ObjectIdentifier(self)] = self }
    }

    /// HMAC-SHA512(prk, message) into `block` (64 bytes), with the context this thread keyed for
    /// `serial`, keying one on first use. HKDF's T(1) when `message` is info || 0x01.
    package func firstBlock(serial: UInt64, prk: UnsafeRawBufferPointer, message: UnsafeRawBufferPointer,
                    into block: UnsafeMutableRawBufferPointer) -> Bool {
        precondition(block.count == 64)
        return entries.withLock { entries -> Bool in
            let ctx: OpaquePointer
            if let found = entries.firstIndex(where: { $0.serial == serial }) {
                ctx = entries[found].ctx
            } else {
                guard let fresh = Self.keyedContext(serial: serial, prk) else { return false }
                if entries.count == Self.capacity { EVP_MAC_CTX_free(entries.removeFirst().ctx) }
                entries.append(fresh)
                ctx = fresh.ctx
            }
            var written = 0
            // A NULL key re-initialises from the pad state computed when the context was keyed.
            return EVP_MAC_init(ctx, nil, 0, nil) == 1
                && EVP_MAC_update(ctx, message.baseAddress!.assumingMemoryBound(to: UInt8.self), message.count) == 1
                && EVP_MAC_final(ctx, block.baseAddress!.assumingMemoryBound(to: UInt8.self), &written, 64) == 1
                && written == 64
        }
    }

    private static func keyedContext(serial: UInt64, _ prk: UnsafeRawBufferPointer) -> Entry? {
        guard let ctx = EVP_MAC_CTX_new(Algorithms.shared.hmac) else { return nil }
        var digestName: (CChar, CChar, CChar, CChar, CChar, CChar, CChar) = (83, 72, 65, 53, 49, 50, 0) // "SHA512"
        let keyed = withUnsafeMutablePointer(to: &digestName) { namePtr -> Bool in
            withUnsafeTemporaryAllocation(of: OSSL_PARAM.self, capacity: 2) { params in
                params[0] = OSSL_PARAM_construct_utf8_string(
                    ParamName.digest, UnsafeMutableRawPointer(namePtr).assumingMemoryBound(to: CChar.self), 0)
                params[1] = OSSL_PARAM_construct_end()
                return EVP_MAC_init(ctx, prk.baseAddress!.assumingMemoryBound(to: UInt8.self), prk.count, params.baseAddress) == 1
            }
        }
        guard keyed else {
            EVP_MAC_CTX_free(ctx)
            return nil
        }
        return Entry(serial: serial, ctx: ctx)
    }

    /// Frees the contexts keyed for `serial` in every thread: its master key is being wiped.
    package static func forget(serial: UInt64) {
        // Taken out of the registry lock first, so no two locks are ever held together. A thread
        // that exits meanwhile has retired its (emptied) cache; one that starts has no entry for
        // a key nobody can use any more.
        let caches = registry.withLock { Array($0.values) }
        for cache in caches {
            cache.entries.withLock { entries in
                entries.removeAll { entry in
                    guard entry.serial == serial else { return false }
                    EVP_MAC_CTX_free(entry.ctx)
                    return true
                }
            }
        }
    }

    /// The owning thread is exiting: frees every context.
    package func retire() {
        _ = Self.registry.withLock { $0.removeValue(forKey: ObjectIdentifier(self)) }
        entries.withLock { entries in
            for entry in entries { EVP_MAC_CTX_free(entry.ctx) }
            entries.removeAll()
        }
    }

    /// How many threads hold a context keyed for `serial` (tests).
    package static func contexts(for serial: UInt64) -> Int {
        let caches = registry.withLock { Array($0.values) }
        return caches.filter { cache in cache.entries.withLock { $0.contains { $0.serial == serial } } }.count
    }
}
