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

    private func xattrNode(_ id: UInt64, name: [UInt8]) throws -> (Node, MasterKey, [UInt8]) {
        guard name.starts(with: Array("user.".utf8)) else { throw StoreError.notSupported }
        guard name.count <= Self.maximumXattrName else { throw StoreError.nameTooLong }
        let node = try node(id)
        let key = try key(for: node, .newContents).key
        let objectID = node.state.withLock { $0.header.objectID }
        return (node, key, objectID)
    }

    /// Backing xattrs live on the directory itself for directories (O_PATH descriptors cannot
    /// carry xattr calls, so the directory is re-opened read-only), on the file otherwise.
    /// Callers must keep the returned descriptor alive across the call that uses `.raw`: a
    /// temporary would be closed first, and its number could meanwhile name another file.
    private func xattrFD(_ node: Node) throws -> FileDescriptor {
        if node.isDirectory {
            let dir = try directoryFD(node)
            return try withExtendedLifetime(dir) { try Sys.listingDescriptor(dir.raw) }
        }
        let state = node.state.withLock { $0 }
        return try objectDescriptor(node, state, .readOnly)
    }

    public enum XattrMode: Sendable { case any, create, replace }

    public func setxattr(_ id: UInt64, name: [UInt8], value: [UInt8], mode: XattrMode) throws {
        let (node, key, objectID) = try xattrNode(id, name: name)
        let backing = XattrCodec.backingName(name, objectID: objectID, key: key)
        let sealed = try XattrCodec.seal(name: name, value: value, objectID: objectID, backingName: backing, key: key)
        // The backing filesystem's value limit applies to the sealed form (17 + name bytes more).
        guard sealed.count <= Self.maximumXattrValue else { throw StoreError.system(E2BIG) }
        let flags: Int32 = switch mode {
        case .any: 0
        case .create: 1 // XATTR_CREATE
        case .replace: 2 // XATTR_REPLACE
        }
        let fd = try xattrFD(node)
        try withExtendedLifetime(fd) { try Sys.fsetxattr(fd.raw, backing, sealed, flags: flags) }
    }

    public func getxattr(_ id: UInt64, name: [UInt8]) throws -> [UInt8] {
        let (node, key, objectID) = try xattrNode(id, name: name)
        let backing = XattrCodec.backingName(name, objectID: objectID, key: key)
        let fd = try xattrFD(node)
        let sealed = try withExtendedLifetime(fd) { try Sys.fgetxattr(fd.raw, backing) }
        let (storedName, value) = try XattrCodec.open(sealed, objectID: objectID, backingName: backing, key: key)
        guard storedName == name else { throw StoreError.integrity("xattr bound to another name") }
        return value
    }

    public func listxattr(_ id: UInt64) throws -> [[UInt8]] {
        let node = try node(id)
        guard let key = try? key(for: node, .newContents).key else { return [] }
        let objectID = node.state.withLock { $0.header.objectID }
        let fd = try xattrFD(node)
        defer { withExtendedLifetime(fd) {} }
        var names: [[UInt8]] = []
        for backing in try Sys.flistxattr(fd.raw) where backing.hasPrefix(XattrCodec.backingPrefix) {
            guard let sealed = try? Sys.fgetxattr(fd.raw, backing),
                  let (name, _) = try? XattrCodec.open(sealed, objectID: objectID, backingName: backing, key: key) else {
                Diagnostics.report("skipping undecryptable xattr \(backing)")
                continue
            }
            names.append(name)
        }
        return names
    }

    public func removexattr(_ id: UInt64, name: [UInt8]) throws {
        let (node, key, objectID) = try xattrNode(id, name: name)
        let fd = try xattrFD(node)
        let backing = XattrCodec.backingName(name, objectID: objectID, key: key)
        try withExtendedLifetime(fd) { try Sys.fremovexattr(fd.raw, backing) }
    }
}
