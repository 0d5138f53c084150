import EncCrypto
import EncKeys
import EncFormat

/// How a backing entry name becomes a plaintext name, and whether an object is bound to the
/// entry it was found under: the one implementation the daemon (listings, lookups) and fsck share,
/// so fsck checks exactly what the daemon would serve.
enum NameResolver {
    /// The plaintext name of `backingName` in the directory `directoryID`. A short name carries its
    /// ciphertext; a long (hashed) one finds it in the binding of the object it names, whose
    /// header `bindings` gives (asked for only then).
    static func plaintext(of backingName: [UInt8], directoryID: [UInt8], key: MasterKey,
                          bindings: () throws -> [Binding]) throws -> [UInt8] {
        try plaintext(of: backingName, short: NameCodec.ciphertext(ofShortBackingName: backingName),
                      directoryID: directoryID, key: key, bindings: bindings)
    }

    /// The same, with the short name's ciphertext already decoded (nil for a long name): a
    /// listing decodes each entry's name once, to tell entries from other files.
    static func plaintext(of backingName: [UInt8], short: [UInt8]?, directoryID: [UInt8], key: MasterKey,
                          bindings: () throws -> [Binding]) throws -> [UInt8] {
        let ciphertext: [UInt8]
        if let short {
            ciphertext = short
        } else {
            let digest = Binding.digest(parentID: directoryID, backingName: backingName)
            guard let long = try bindings().first(where: { $0.digest == digest })?.longName,
                  NameCodec.backingName(forCiphertext: long) == backingName
            else { throw StoreError.integrity("long name missing from its header") }
            ciphertext = long
        }
        return try NameCodec.decrypt(ciphertext: ciphertext, directoryID: directoryID, key: key)
    }

    /// Whether `bindings` (an object's verified header's) name the entry `backingName` of the
    /// directory `parentID`: an object moved or swapped in the backing store is not.
    static func isBound(_ bindings: [Binding], parentID: [UInt8], backingName: [UInt8]) -> Bool {
        let digest = Binding.digest(parentID: parentID, backingName: backingName)
        return bindings.contains { $0.digest == digest }
    }
}
