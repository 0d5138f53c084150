import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Per-thread buffers for the read path: the ciphertext of a run of extents and one extent's
/// plaintext.
///
/// A read of 1 MiB used to allocate (and zero) its ciphertext, a temporary extent and the reply
/// per request; reusing one buffer per FUSE worker keeps malloc and page faults off the data path.
/// Each buffer grows to the largest request the thread has served (at most the kernel's 1 MiB
/// request plus per-extent overhead) and is freed when the thread exits.
final class ThreadScratch {
    private(set) var ciphertext = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    private(set) var extent = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    /// Whole extents a write sealed before taking the node lock (`ExtentFile.sealWholeExtents`).
    private(set) var sealing = UnsafeMutableRawBufferPointer(start: nil, count: 0)

    func ciphertext(count: Int) -> UnsafeMutableRawBufferPointer {
        Self.grow(&ciphertext, to: count)
        return UnsafeMutableRawBufferPointer(rebasing: ciphertext[0..<count])
    }

    func extent(count: Int) -> UnsafeMutableRawBufferPointer {
        Self.grow(&extent, to: count)
        return UnsafeMutableRawBufferPointer(rebasing: extent[0..<count])
    }

    func sealing(count: Int) -> UnsafeMutableRawBufferPointer {
        Self.grow(&sealing, to: count)
        return UnsafeMutableRawBufferPointer(rebasing: sealing[0..<count])
    }

    private static func grow(_ buffer: inout UnsafeMutableRawBufferPointer, to count: Int) {
        guard buffer.count < count else { return }
        buffer.deallocate()
        buffer = .allocate(byteCount: count, alignment: 64)
    }

    deinit {
        ciphertext.deallocate()
        extent.deallocate()
        sealing.deallocate()
    }

    private static let perThread = PerThread { ThreadScratch() }

    /// The calling thread's buffers. Never hand them to another thread.
    static var current: ThreadScratch { perThread.current }
}
