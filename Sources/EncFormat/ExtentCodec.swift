import EncCrypto
import EncKeys

/// Seals and opens one extent: nonce (16) || AES-256-GCM ciphertext || tag (16).
///
/// Each seal draws a fresh random nonce and derives its own key and IV from it, so no (key, IV)
/// pair is ever used twice however often an extent is rewritten, and no per-file counter has to
/// survive a crash. The associated data binds the ciphertext to its object, its index and its
/// length: a swapped, moved or truncated extent fails to open.
public enum ExtentCodec {
    package static let adBytes = 28

    public static func seal(key: MasterKey, objectID: [UInt8], index: UInt64,
                            plaintext: UnsafeRawBufferPointer, into stored: UnsafeMutableRawBufferPointer) {
        seal(key: key, objectID: objectID, index: index, plaintext: plaintext, into: stored, fixedNonce: nil)
    }

    /// `fixedNonce` exists for known-answer tests only; production seals always draw a nonce.
    package static func seal(key: MasterKey, objectID: [UInt8], index: UInt64, plaintext: UnsafeRawBufferPointer,
                     into stored: UnsafeMutableRawBufferPointer, fixedNonce: [UInt8]?) {
        precondition(stored.count == plaintext.count + ExtentGeometry.overheadBytes)
        let nonce = UnsafeMutableRawBufferPointer(rebasing: stored[0..<ExtentGeometry.nonceBytes])
        if let fixedNonce {
            nonce.copyBytes(from: fixedNonce)
        } else {
            OpenSSL.fillNonce(nonce)
        }
        let body = UnsafeMutableRawBufferPointer(rebasing: stored[ExtentGeometry.nonceBytes..<(stored.count - ExtentGeometry.tagBytes)])
        let tag = UnsafeMutableRawBufferPointer(rebasing: stored[(stored.count - ExtentGeometry.tagBytes)...])
        withKeyAndAD(key: key, nonce: UnsafeRawBufferPointer(nonce), objectID: objectID, index: index,
                     length: plaintext.count) { k, iv, ad in
            do {
                try OpenSSL.gcmSeal(key: k, iv: iv, ad: ad, plaintext: plaintext, ciphertext: body, tag: tag)
            } catch {
                fatalError("AES-256-GCM seal failed with valid parameters: \(error)")
            }
        }
    }

    public static func open(key: MasterKey, objectID: [UInt8], index: UInt64,
                            stored: UnsafeRawBufferPointer, into plaintext: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        guard stored.count >= ExtentGeometry.overheadBytes,
              plaintext.count >= stored.count - ExtentGeometry.overheadBytes else { throw .authenticationFailed }
        let length = stored.count - ExtentGeometry.overheadBytes
        let nonce = UnsafeRawBufferPointer(rebasing: stored[0..<ExtentGeometry.nonceBytes])
        let body = UnsafeRawBufferPointer(rebasing: stored[ExtentGeometry.nonceBytes..<(stored.count - ExtentGeometry.tagBytes)])
        let tag = UnsafeRawBufferPointer(rebasing: stored[(stored.count - ExtentGeometry.tagBytes)...])
        let out = UnsafeMutableRawBufferPointer(rebasing: plaintext[0..<length])
        var failure: CryptoError?
        withKeyAndAD(key: key, nonce: nonce, objectID: objectID, index: index, length: length) { k, iv, ad in
            do throws(CryptoError) {
                try OpenSSL.gcmOpen(key: k, iv: iv, ad: ad, ciphertext: body, tag: tag, plaintext: out)
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
    }

    private static func withKeyAndAD(key: MasterKey, nonce: UnsafeRawBufferPointer, objectID: [UInt8], index: UInt64,
                                     length: Int,
                                     _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer, UnsafeRawBufferPointer) -> Void) {
        // A whole HKDF block (key, IV and 20 unused bytes) saves copying the 44 out of a scratch one.
        withUnsafeTemporaryAllocation(byteCount: 64 + adBytes, alignment: 16) { scratch in
            let material = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<64])
            defer { OpenSSL.cleanse(material) }
            key.deriveExtentKey(nonce: nonce, into: material)
            let ad = UnsafeMutableRawBufferPointer(rebasing: scratch[64...])
            objectID.withUnsafeBytes { ad.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: 16) }
            ad.storeBytes(of: index.littleEndian, toByteOffset: 16, as: UInt64.self)
            ad.storeBytes(of: UInt32(length).littleEndian, toByteOffset: 24, as: UInt32.self)
            body(UnsafeRawBufferPointer(rebasing: material[0..<32]), UnsafeRawBufferPointer(rebasing: material[32..<44]),
                 UnsafeRawBufferPointer(ad))
        }
    }
}
