import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Creates a new, empty store.
public enum StoreCreation {
    /// 4 KiB: with key groups (FORMAT.md 16.4) it streams as fast as 16 KiB did and doubles random
    /// 4 KiB I/O (PERFORMANCE.md, "Extent key groups").
    public static let defaultExtentSize = 4096

    /// Writes `encfsd.conf` and the root directory's header into `path` (created if missing;
    /// must be empty otherwise). Both files are fsynced, and then the directory, before this
    /// returns: a store is never left half-initialised by a power loss.
    public static func create(at path: String, key: MasterKey, extentSize: Int = defaultExtentSize,
                              owner: Caller, rootMode: UInt32 = 0o755,
                              passphrase: StoreConfig.PassphraseParameters? = nil) throws {
        guard ExtentGeometry.isValid(extentSize: extentSize) else { throw StoreError.invalidArgument }
        if mkdir(path, 0o700) != 0 && errno != EEXIST { throw StoreError.system(errno) }
        let root = try Sys.openStoreRoot(path)
        let dir = try root.listingDescriptor()
        guard try dir.listDirectory().isEmpty else { throw StoreError.notEmpty }

        var config = StoreConfig(extentSize: extentSize, rootPolicy: key.identifier)
        config.features = [StoreConfig.extentKeyGroups]
        config.passphrases = passphrase.map { [$0] }
        let configFD = try dir.createEntry(Array(StoreConfig.fileName.utf8), mode: 0o644)
        try Array(config.encoded()).withUnsafeBytes { try configFD.pwrite($0, offset: 0) }
        try configFD.fsync()

        var header = ObjectHeader(type: .directory, mode: rootMode, uid: owner.uid, gid: owner.gid, extentSize: 0,
                                  objectID: OpenSSL.random(count: 16), policy: key.identifier)
        header.birthTime = Volume.nowNanoseconds()
        // Epoch 0 is the store's creation; the first mount opens epoch 1.
        try EpochRecord.create(storeFD: dir)
        let slots = HeaderSlots(epoch: 0, evidence: .cleanHistory, storeVersion: UInt16(config.version))
        let headerFD = try dir.createEntry(directoryHeaderName, mode: 0o600)
        try slots.create(fd: headerFD, header: &header, key: key)
        try headerFD.fsync()
        try dir.mkdirAt(Journal.directoryName, mode: 0o700)
        try dir.fsync()
    }
}
