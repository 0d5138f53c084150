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

    /// Seals with a fresh nonce. `member` is the extent's place in its key group
    /// (`ExtentGeometry.keyGroupMember`, 0 in an object without key groups).
    public static func seal(key: MasterKey, objectID: [UInt8], index: UInt64, member: UInt8 = 0,
                            plaintext: UnsafeRawBufferPointer, into stored: UnsafeMutableRawBufferPointer) {
        seal(key: key, objectID: objectID, index: index, member: member, plaintext: plaintext, into: stored, nonce: nil)
    }

    /// Seals with `nonce` when it is shared among the members of a key group. Only
    /// `ExtentGroupSealer` (which never seals one member twice under one nonce) and known-answer
    /// tests pass one: a nonce passed twice for one member would repeat a key and IV.
    package static func seal(key: MasterKey, objectID: [UInt8], index: UInt64, member: UInt8,
                             plaintext: UnsafeRawBufferPointer, into stored: UnsafeMutableRawBufferPointer,
                             nonce sharedNonce: UnsafeRawBufferPointer?) {
        precondition(stored.count == plaintext.count + ExtentGeometry.overheadBytes)
        let nonce = UnsafeMutableRawBufferPointer(rebasing: stored[0..<ExtentGeometry.nonceBytes])
        if let sharedNonce {
            precondition(sharedNonce.count == ExtentGeometry.nonceBytes)
            nonce.copyMemory(from: sharedNonce)
        } else {
            OpenSSL.fillNonce(nonce)
        }
        let body = UnsafeMutableRawBufferPointer(rebasing: stored[ExtentGeometry.nonceBytes..<(stored.count - ExtentGeometry.tagBytes)])
        let tag = UnsafeMutableRawBufferPointer(rebasing: stored[(stored.count - ExtentGeometry.tagBytes)...])
        withAD(objectID: objectID, index: index, length: plaintext.count) { ad in
            do {
                try OpenSSL.extentSeal(serial: key.instanceSerial, nonce: UnsafeRawBufferPointer(nonce), member: member,
                                       derive: { key.deriveExtentKey(nonce: UnsafeRawBufferPointer(nonce), into: $0) },
                                       ad: ad, plaintext: plaintext, ciphertext: body, tag: tag)
            } catch {
                fatalError("AES-256-GCM seal failed with valid parameters: \(error)")
            }
        }
    }

    /// A known-answer test's seal under a given nonce.
    package static func seal(key: MasterKey, objectID: [UInt8], index: UInt64, member: UInt8 = 0, plaintext: UnsafeRawBufferPointer,
                             into stored: UnsafeMutableRawBufferPointer, fixedNonce: [UInt8]?) {
        guard let fixedNonce else { return seal(key: key, objectID: objectID, index: index, member: member, plaintext: plaintext, into: stored) }
        fixedNonce.withUnsafeBytes {
            seal(key: key, objectID: objectID, index: index, member: member, plaintext: plaintext, into: stored, nonce: $0)
        }
    }

    public static func open(key: MasterKey, objectID: [UInt8], index: UInt64, member: UInt8 = 0,
                            stored: UnsafeRawBufferPointer, into plaintext: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        guard stored.count >= ExtentGeometry.overheadBytes,
              plaintext.count >= stored.count - ExtentGeometry.overheadBytes else { throw .authenticationFailed }
        let length = stored.count - ExtentGeometry.overheadBytes
        let nonce = UnsafeRawBufferPointer(rebasing: stored[0..<ExtentGeometry.nonceBytes])
        let body = UnsafeRawBufferPointer(rebasing: stored[ExtentGeometry.nonceBytes..<(stored.count - ExtentGeometry.tagBytes)])
        let tag = UnsafeRawBufferPointer(rebasing: stored[(stored.count - ExtentGeometry.tagBytes)...])
        let out = UnsafeMutableRawBufferPointer(rebasing: plaintext[0..<length])
        var failure: CryptoError?
        withAD(objectID: objectID, index: index, length: length) { ad in
            do throws(CryptoError) {
                try OpenSSL.extentOpen(serial: key.instanceSerial, nonce: nonce, member: member,
                                       derive: { key.deriveExtentKey(nonce: nonce, into: $0) },
                                       ad: ad, ciphertext: body, tag: tag, plaintext: out)
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
    }

    private static func withAD(objectID: [UInt8], index: UInt64, length: Int, _ body: (UnsafeRawBufferPointer) -> Void) {
        withUnsafeTemporaryAllocation(byteCount: adBytes, alignment: 16) { ad in
            objectID.withUnsafeBytes { ad.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: 16) }
            ad.storeBytes(of: index.littleEndian, toByteOffset: 16, as: UInt64.self)
            ad.storeBytes(of: UInt32(length).littleEndian, toByteOffset: 24, as: UInt32.self)
            body(UnsafeRawBufferPointer(ad))
        }
    }
}

/// Seals the extents of one object in a batch, sharing one fresh nonce among the members of a key
/// group it seals in a row (`ExtentGeometry.keyGroup` > 1): one key derivation and one AES key
/// schedule per group, not per extent. A nonce is never used for one member twice: a member met
/// again, or another group, draws a new one. Without key groups every seal draws its own nonce.
public struct ExtentGroupSealer {
    public let key: MasterKey
    public let objectID: [UInt8]
    public let geometry: ExtentGeometry
    private var nonce: (UInt64, UInt64) = (0, 0)
    private var group: UInt64?
    private var membersSealed: UInt64 = 0

    public init(key: MasterKey, objectID: [UInt8], geometry: ExtentGeometry) {
        precondition(geometry.keyGroup <= 64)
        self.key = key
        self.objectID = objectID
        self.geometry = geometry
    }

    public mutating func seal(index: UInt64, plaintext: UnsafeRawBufferPointer, into stored: UnsafeMutableRawBufferPointer) {
        let member = geometry.keyGroupMember(index)
        guard geometry.keyGroup > 1 else {
            ExtentCodec.seal(key: key, objectID: objectID, index: index, plaintext: plaintext, into: stored)
            return
        }
        let bit = UInt64(1) << UInt64(member)
        if group != geometry.keyGroupIndex(index) || membersSealed & bit != 0 {
            withUnsafeMutableBytes(of: &nonce) { OpenSSL.fillNonce($0) }
            group = geometry.keyGroupIndex(index)
            membersSealed = 0
        }
        membersSealed |= bit
        let shared = nonce
        withUnsafeBytes(of: shared) { n in
            ExtentCodec.seal(key: key, objectID: objectID, index: index, member: member, plaintext: plaintext, into: stored, nonce: n)
        }
    }
}
