import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// User extended attributes, stored as backing xattrs encoded by `XattrCodec`.
extension Volume {
    static let maximumXattrName = 255
    static let maximumXattrValue = 65536

    /// The object, its key, its ID, and the key of xattrs a rekey has not moved yet (if any).
    private func xattrNode(_ id: UInt64, name: [UInt8]) throws -> (Node, MasterKey, [UInt8], MasterKey?) {
        // A backing without user xattrs has nowhere to keep them (a side object is issue 12's).
        guard name.starts(with: Array("user.".utf8)), capabilities.has(.userXattrs) else { throw StoreError.notSupported }
        guard name.count <= Self.maximumXattrName else { throw StoreError.nameTooLong }
        let node = try node(id)
        let grant = try key(for: node, .newContents)
        return (node, grant.key, grant.header.objectID, grant.header.previousPolicy.flatMap { keys.key(for: $0, allowLingering: true) })
    }

    /// Backing xattrs live on the directory itself for directories (O_PATH descriptors cannot
    /// carry xattr calls, so the directory is re-opened read-only), on the file otherwise.
    /// Callers must keep the returned descriptor alive across the call that uses `.raw`: a
    /// temporary would be closed first, and its number could meanwhile name another file.
    func xattrFD(_ node: Node) throws -> FileDescriptor {
        if node.isDirectory {
            let dir = try directoryFD(node)
            return try withExtendedLifetime(dir) { try Sys.listingDescriptor(dir.raw) }
        }
        let state = node.state.withLock { $0 }
        return try objectDescriptor(node, state, .readOnly)
    }

    public enum XattrMode: Sendable { case any, create, replace }

    public func setxattr(_ id: UInt64, name: [UInt8], value: [UInt8], mode: XattrMode) throws {
        if let node = try? node(id) { try convertForRekey(node) }
        let (node, key, objectID, previousKey) = try xattrNode(id, name: name)
        let backing = XattrCodec.backingName(name, objectID: objectID, key: key)
        let sealed = try XattrCodec.seal(name: name, value: value, objectID: objectID, backingName: backing, key: key)
        // The backing filesystem's value limit applies to the sealed form (17 + name bytes more).
        guard sealed.count <= Self.maximumXattrValue else { throw StoreError.system(E2BIG) }
        let fd = try xattrFD(node)
        try withExtendedLifetime(fd) {
            // During a rekey the attribute may still exist under the old key's backing name: it
            // counts for XATTR_CREATE and XATTR_REPLACE, and goes once the new one is written.
            let legacy = previousKey.map { XattrCodec.backingName(name, objectID: objectID, key: $0) }
            let legacyExists = legacy.map { (try? Sys.fgetxattr(fd.raw, $0)) != nil } ?? false
            var flags: Int32 = switch mode {
            case .any: 0
            case .create: 1 // XATTR_CREATE
            case .replace: 2 // XATTR_REPLACE
            }
            if legacyExists {
                if mode == .create { throw StoreError.system(EEXIST) }
                flags = 0
            }
            try Sys.fsetxattr(fd.raw, backing, sealed, flags: flags)
            if legacyExists, let legacy { try? Sys.fremovexattr(fd.raw, legacy) }
        }
    }

    public func getxattr(_ id: UInt64, name: [UInt8]) throws -> [UInt8] {
        let (node, key, objectID, previousKey) = try xattrNode(id, name: name)
        let fd = try xattrFD(node)
        return try withExtendedLifetime(fd) {
            for k in [key] + (previousKey.map { [$0] } ?? []) {
                let backing = XattrCodec.backingName(name, objectID: objectID, key: k)
                let sealed: [UInt8]
                do {
                    sealed = try Sys.fgetxattr(fd.raw, backing)
                } catch StoreError.system(ENODATA) where k !== previousKey && previousKey != nil {
                    continue
                }
                let (storedName, value) = try XattrCodec.open(sealed, objectID: objectID, backingName: backing, key: k)
                guard storedName == name else { throw StoreError.integrity("xattr bound to another name") }
                return value
            }
            throw StoreError.system(ENODATA)
        }
    }

    public func listxattr(_ id: UInt64) throws -> [[UInt8]] {
        let node = try node(id)
        guard capabilities.has(.userXattrs), let grant = try? key(for: node, .newContents) else { return [] }
        let header = grant.header
        let candidates = [grant.key] + (header.previousPolicy.flatMap { keys.key(for: $0, allowLingering: true) }.map { [$0] } ?? [])
        let fd = try xattrFD(node)
        defer { withExtendedLifetime(fd) {} }
        var names: [[UInt8]] = []
        for backing in try Sys.flistxattr(fd.raw) where backing.hasPrefix(XattrCodec.backingPrefix) {
            let sealed = try? Sys.fgetxattr(fd.raw, backing)
            guard let sealed, let (name, _) = candidates.lazy.compactMap({
                try? XattrCodec.open(sealed, objectID: header.objectID, backingName: backing, key: $0)
            }).first else {
                Diagnostics.report("skipping undecryptable xattr \(backing)")
                continue
            }
            // A rekey interrupted between writing the new copy and removing the old shows both.
            if !names.contains(name) { names.append(name) }
        }
        return names
    }

    public func removexattr(_ id: UInt64, name: [UInt8]) throws {
        let (node, key, objectID, previousKey) = try xattrNode(id, name: name)
        let fd = try xattrFD(node)
        try withExtendedLifetime(fd) {
            let backing = XattrCodec.backingName(name, objectID: objectID, key: key)
            guard let previousKey else { return try Sys.fremovexattr(fd.raw, backing) }
            let legacy = XattrCodec.backingName(name, objectID: objectID, key: previousKey)
            let removedNew = (try? Sys.fremovexattr(fd.raw, backing)) != nil
            let removedOld = (try? Sys.fremovexattr(fd.raw, legacy)) != nil
            if !removedNew && !removedOld { throw StoreError.system(ENODATA) }
        }
    }
}
