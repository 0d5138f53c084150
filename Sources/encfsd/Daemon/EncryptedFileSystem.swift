import EncCore
import FuseBridge
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Wires the FUSE bridge to the store: converts between the bridge's plain types and the
/// store's, and logs integrity failures once, where they surface.
final class EncryptedFileSystem: FileSystem {
    let volume: Volume
    let control: ControlHandler

    init(volume: Volume, keyService: KeyService, requestCounts: RequestCounts) {
        self.volume = volume
        control = ControlHandler(volume: volume, keyService: keyService, requestCounts: requestCounts)
    }

    private func entry(_ result: (UInt64, Attributes)) -> Entry {
        Entry(node: result.0, attributes: Self.convert(result.1))
    }

    static func convert(_ a: Attributes) -> FileAttributes {
        var converted = FileAttributes(inode: a.inode, mode: a.mode, linkCount: a.linkCount, uid: a.uid, gid: a.gid, rdev: a.rdev,
                       size: a.size, blocks: a.blocks,
                       accessTime: (a.accessTime.seconds, a.accessTime.nanoseconds),
                       modificationTime: (a.modificationTime.seconds, a.modificationTime.nanoseconds),
                       changeTime: (a.changeTime.seconds, a.changeTime.nanoseconds))
        converted.blockSize = a.blockSize
        converted.birthTime = a.birthTime.map { ($0.seconds, $0.nanoseconds) }
        return converted
    }

    /// Integrity failures are attacks or media errors: worth an error in the log naming what
    /// failed, by plaintext path when the daemon knows it (and the extent, in `why`, for data).
    private func logged<R>(_ what: @autoclosure () -> String, node: UInt64? = nil, _ body: () throws -> R) throws -> R {
        do {
            return try body()
        } catch {
            if let why = Self.integrityFailure(of: error) {
                let path = node.flatMap { volume.plaintextPath(of: $0) }.map { " (\($0))" } ?? ""
                Log.error("integrity failure: \(what())\(path): \(why)")
            }
            throw error
        }
    }

    func lookup(parent: UInt64, name: [UInt8]) throws -> Entry {
        try logged("lookup in node \(parent)", node: parent) { entry(try volume.lookup(parent: parent, name: name)) }
    }

    func forget(_ node: UInt64, count: UInt64) { volume.forget(node, count: count) }

    func getattr(_ node: UInt64) throws -> FileAttributes { try logged("getattr of node \(node)", node: node) { Self.convert(try volume.getattr(node)) } }

    func setattr(_ node: UInt64, _ changes: SetAttributes) throws -> FileAttributes {
        var c = AttributeChanges()
        c.mode = changes.mode
        c.uid = changes.uid
        c.gid = changes.gid
        c.size = changes.size
        c.dropSetID = changes.dropSetID
        func time(_ t: SetAttributes.Time?) -> AttributeChanges.TimeChange? {
            switch t {
            case nil: nil
            case .now: .now
            case .set(let s, let ns): .set(Timestamp(seconds: s, nanoseconds: ns))
            }
        }
        c.accessTime = time(changes.accessTime)
        c.modificationTime = time(changes.modificationTime)
        return try logged("setattr of node \(node)", node: node) { Self.convert(try volume.setattr(node, c)) }
    }

    func readlink(_ node: UInt64) throws -> [UInt8] { try logged("readlink of node \(node)", node: node) { try volume.readlink(node) } }

    private func caller(_ context: RequestContext) -> Caller { Caller(uid: context.uid, gid: context.gid, umask: context.umask) }

    func mknod(parent: UInt64, name: [UInt8], mode: UInt32, rdev: UInt64, context: RequestContext) throws -> Entry {
        try logged("mknod in node \(parent)", node: parent) { entry(try volume.mknod(parent: parent, name: name, mode: mode, rdev: rdev, caller: caller(context))) }
    }

    func mkdir(parent: UInt64, name: [UInt8], mode: UInt32, context: RequestContext) throws -> Entry {
        try logged("mkdir in node \(parent)", node: parent) { entry(try volume.mkdir(parent: parent, name: name, mode: mode, caller: caller(context))) }
    }

    func unlink(parent: UInt64, name: [UInt8]) throws { try logged("unlink in node \(parent)", node: parent) { try volume.unlink(parent: parent, name: name) } }
    func rmdir(parent: UInt64, name: [UInt8]) throws { try logged("rmdir in node \(parent)", node: parent) { try volume.rmdir(parent: parent, name: name) } }

    func symlink(target: [UInt8], parent: UInt64, name: [UInt8], context: RequestContext) throws -> Entry {
        try logged("symlink in node \(parent)", node: parent) { entry(try volume.symlink(parent: parent, name: name, target: target, caller: caller(context))) }
    }

    func rename(parent: UInt64, name: [UInt8], newParent: UInt64, newName: [UInt8], flags: UInt32, context: RequestContext) throws {
        let mode: RenameMode
        switch flags & ~Sys.renameWhiteout {
        case 0: mode = .replace
        case Sys.renameNoReplace: mode = .noReplace
        case Sys.renameExchange where flags & Sys.renameWhiteout == 0: mode = .exchange
        default: throw StoreError.invalidArgument
        }
        try logged("rename in node \(parent)", node: parent) {
            if flags & Sys.renameWhiteout != 0 {
                try volume.renameLeavingWhiteout(parent: parent, name: name, newParent: newParent, newName: newName, mode: mode,
                                                 caller: caller(context))
            } else {
                try volume.rename(parent: parent, name: name, newParent: newParent, newName: newName, mode: mode)
            }
        }
    }

    func link(_ node: UInt64, newParent: UInt64, newName: [UInt8]) throws -> Entry {
        try logged("link of node \(node)", node: node) { entry(try volume.link(node, newParent: newParent, newName: newName)) }
    }

    func open(_ node: UInt64, flags: Int32, dropSetID: Bool) throws -> OpenReply {
        let handle = try logged("open of node \(node)", node: node) { try volume.open(node, flags: flags, dropSetID: dropSetID) }
        return OpenReply(handle: handle, keepCache: true)
    }

    func create(parent: UInt64, name: [UInt8], mode: UInt32, flags: Int32, context: RequestContext) throws -> (Entry, OpenReply) {
        let (node, attributes, handle) = try logged("create in node \(parent)", node: parent) {
            try volume.create(parent: parent, name: name, mode: mode, caller: caller(context))
        }
        return (Entry(node: node, attributes: Self.convert(attributes)), OpenReply(handle: handle, keepCache: true))
    }

    func read(_ node: UInt64, handle: UInt64, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        try logged("read of node \(node) at \(offset)", node: node) { try volume.read(handle: handle, offset: offset, into: buffer) }
    }

    func write(_ node: UInt64, handle: UInt64, offset: UInt64, data: UnsafeRawBufferPointer, dropSetID: Bool,
               bypassesPageCache: Bool) throws -> (written: Int, pagesMayBeOlder: Bool) {
        let older = try logged("write to node \(node) at \(offset)", node: node) {
            try volume.write(handle: handle, offset: offset, data: data, dropSetID: dropSetID, bypassesPageCache: bypassesPageCache)
        }
        return (data.count, older)
    }

    func flush(_ node: UInt64, handle: UInt64) throws { try logged("flush of node \(node)", node: node) { try volume.flush(handle: handle) } }
    func release(_ node: UInt64, handle: UInt64) throws { try logged("release of node \(node)", node: node) { try volume.release(handle: handle) } }
    func fsync(_ node: UInt64, handle: UInt64, dataOnly: Bool) throws {
        try logged("fsync of node \(node)", node: node) { try volume.fsync(handle: handle, dataOnly: dataOnly) }
    }

    func fallocate(_ node: UInt64, handle: UInt64, mode: Int32, offset: UInt64, length: UInt64) throws {
        guard let operation = RangeOperation(fallocateMode: mode) else { throw StoreError.notSupported }
        try logged("fallocate of node \(node)", node: node) { try volume.fallocate(handle: handle, operation, offset: offset, length: length) }
    }

    func seek(_ node: UInt64, handle: UInt64, from offset: UInt64, data: Bool) throws -> UInt64 {
        try logged("lseek of node \(node)", node: node) { try volume.seek(handle: handle, from: offset, data: data) }
    }

    func opendir(_ node: UInt64) throws -> UInt64 { try logged("opendir of node \(node)", node: node) { try volume.openDirectory(node) } }

    func readdir(_ node: UInt64, handle: UInt64, offset: Int, limit: Int) throws -> ArraySlice<DirectoryItem> {
        let entries = try volume.readDirectory(handle: handle, from: offset).prefix(limit)
        return ArraySlice(entries.map { DirectoryItem(name: $0.name, inode: $0.inode, typeBits: $0.typeBits, lookupKey: $0.backingName) })
    }

    func lookup(parent: UInt64, listed item: DirectoryItem) throws -> Entry {
        let listed = DirectoryEntry(name: item.name, inode: item.inode, typeBits: item.typeBits, backingName: item.lookupKey)
        return try logged("lookup in node \(parent)", node: parent) { entry(try volume.lookup(parent: parent, listed: listed)) }
    }

    func releasedir(_ node: UInt64, handle: UInt64) { volume.releaseDirectory(handle: handle) }
    func fsyncdir(_ node: UInt64, handle: UInt64, dataOnly: Bool) throws {
        try logged("fsyncdir of node \(node)", node: node) { try volume.fsyncDirectory(node) }
    }

    func statfs(_ node: UInt64) throws -> VolumeStatistics {
        let s = try volume.statfs()
        return VolumeStatistics(blockSize: s.blockSize, blocks: s.blocks, blocksFree: s.blocksFree,
                                blocksAvailable: s.blocksAvailable, files: s.files, filesFree: s.filesFree, nameMax: s.nameMax)
    }

    func setxattr(_ node: UInt64, name: [UInt8], value: [UInt8], flags: Int32) throws {
        let mode: Volume.XattrMode = switch flags {
        case 0: .any
        case 1: .create
        case 2: .replace
        default: throw StoreError.invalidArgument
        }
        try logged("setxattr of node \(node)", node: node) { try volume.setxattr(node, name: name, value: value, mode: mode) }
    }

    func getxattr(_ node: UInt64, name: [UInt8]) throws -> [UInt8]? {
        try logged("getxattr of node \(node)", node: node) { try volume.getxattr(node, name: name) }
    }

    func listxattr(_ node: UInt64, context: RequestContext) throws -> [[UInt8]] {
        try logged("listxattr of node \(node)", node: node) {
            try volume.listxattr(node, includeTrusted: CallerCapabilities.hasSysAdmin(context))
        }
    }
    func removexattr(_ node: UInt64, name: [UInt8]) throws {
        try logged("removexattr of node \(node)", node: node) { try volume.removexattr(node, name: name) }
    }

    func ioctl(_ node: UInt64, command: UInt32, input: [UInt8], outputSize: Int, context: RequestContext) throws -> IoctlReply {
        try control.handle(node: node, command: command, input: input, outputSize: outputSize, context: context)
    }
}
