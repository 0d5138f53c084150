#if canImport(Glibc)
import Glibc
#endif

/// User extended attributes, stored as backing xattrs with hidden names and sealed values.
///
/// Backing name: "user.encfsd." + base64url(first 24 bytes of HMAC-SHA256(xattr HMAC key, "xattr"
/// || object ID || attribute name)), fixed length whatever the attribute name's length. Value:
/// AES-256-SIV under the xattr SIV key with associated data object ID || backing name, over
/// (name length, name, value), so a value moved to another attribute or object fails to open,
/// and listing recovers names. Both keys come from their own HKDF context (0x83).
extension Volume {
    static let backingXattrPrefix = "user.encfsd."
    static let maximumXattrName = 255
    static let maximumXattrValue = 65536

    private func xattrNode(_ id: UInt64, name: [UInt8]) throws -> (Node, MasterKey, [UInt8]) {
        guard name.starts(with: Array("user.".utf8)) else { throw StoreError.notSupported }
        guard name.count <= Self.maximumXattrName else { throw StoreError.nameTooLong }
        let node = try node(id)
        let key = try objectKey(node)
        let objectID = node.state.withLock { $0.header.objectID }
        return (node, key, objectID)
    }

    private func backingXattrName(_ name: [UInt8], objectID: [UInt8], key: MasterKey) -> String {
        let mac = key.withXattrKeys { _, hmacKey in OpenSSL.hmacSHA256(key: hmacKey, Array("xattr".utf8), objectID, name) }
        return Self.backingXattrPrefix + String(decoding: Base64URL.encode(Array(mac.prefix(24))), as: UTF8.self)
    }

    /// Backing xattrs live on the directory itself for directories (O_PATH descriptors cannot
    /// carry xattr calls, so the directory is re-opened read-only), on the file otherwise.
    /// Callers must keep the returned descriptor alive across the call that uses `.raw`: a
    /// temporary would be closed first, and its number could meanwhile name another file.
    private func xattrFD(_ node: Node) throws -> FileDescriptor {
        node.isDirectory ? try Sys.reopen(node.fd.raw, flags: O_RDONLY | O_DIRECTORY) : node.fd
    }

    public enum XattrMode: Sendable { case any, create, replace }

    public func setxattr(_ id: UInt64, name: [UInt8], value: [UInt8], mode: XattrMode) throws {
        let (node, key, objectID) = try xattrNode(id, name: name)
        let backing = backingXattrName(name, objectID: objectID, key: key)
        let plaintext = [UInt8(name.count)] + name + value
        let sealed = try key.withXattrKeys { k, _ in
            try OpenSSL.sivSeal(key: k, ad: objectID + Array(backing.utf8), plaintext: plaintext)
        }
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
        let backing = backingXattrName(name, objectID: objectID, key: key)
        let fd = try xattrFD(node)
        let sealed = try withExtendedLifetime(fd) { try Sys.fgetxattr(fd.raw, backing) }
        let (storedName, value) = try openXattr(sealed, backing: backing, objectID: objectID, key: key)
        guard storedName == name else { throw StoreError.integrity("xattr bound to another name") }
        return value
    }

    public func listxattr(_ id: UInt64) throws -> [[UInt8]] {
        let node = try node(id)
        guard let key = try? objectKey(node) else { return [] }
        let objectID = node.state.withLock { $0.header.objectID }
        let fd = try xattrFD(node)
        defer { withExtendedLifetime(fd) {} }
        var names: [[UInt8]] = []
        for backing in try Sys.flistxattr(fd.raw) where backing.hasPrefix(Self.backingXattrPrefix) {
            guard let sealed = try? Sys.fgetxattr(fd.raw, backing),
                  let (name, _) = try? openXattr(sealed, backing: backing, objectID: objectID, key: key) else {
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
        try withExtendedLifetime(fd) { try Sys.fremovexattr(fd.raw, backingXattrName(name, objectID: objectID, key: key)) }
    }

    private func openXattr(_ sealed: [UInt8], backing: String, objectID: [UInt8], key: MasterKey) throws -> ([UInt8], [UInt8]) {
        let plain: [UInt8]
        do {
            plain = try key.withXattrKeys { k, _ in try OpenSSL.sivOpen(key: k, ad: objectID + Array(backing.utf8), sealed: sealed) }
        } catch {
            throw StoreError.integrity("xattr failed authentication")
        }
        guard let count = plain.first.map(Int.init), plain.count >= 1 + count else {
            throw StoreError.integrity("xattr is malformed")
        }
        return (Array(plain[1..<(1 + count)]), Array(plain[(1 + count)...]))
    }
}
