import Foundation
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// An in-memory model of the backing directory, by inode: what a power loss could leave is
/// computed on it, then written out as a real directory for recovery to run on.
struct BackingModel: Hashable {
    var files: [UInt64: [UInt8]] = [:]
    var directories: [UInt64: [[UInt8]: UInt64]] = [:]
    var root: UInt64 = 0

    /// The model of an existing directory tree, with its real inode numbers.
    static func snapshot(of path: String) throws -> BackingModel {
        var model = BackingModel()
        var st = stat()
        guard lstat(path, &st) == 0 else { throw StoreError.system(errno) }
        model.root = UInt64(st.st_ino)
        try model.load(path, inode: model.root)
        return model
    }

    private mutating func load(_ path: String, inode: UInt64) throws {
        directories[inode] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: path) {
            let child = path + "/" + name
            var st = stat()
            guard lstat(child, &st) == 0 else { continue }
            directories[inode]![Array(name.utf8)] = UInt64(st.st_ino)
            if st.st_mode & S_IFMT == S_IFDIR {
                try load(child, inode: UInt64(st.st_ino))
            } else {
                files[UInt64(st.st_ino)] = Array(FileManager.default.contents(atPath: child) ?? Data())
            }
        }
    }

    mutating func apply(_ op: BackingOperation, tornAt: Int? = nil) {
        switch op {
        case .write(let inode, let offset, var bytes):
            if let tornAt { bytes = Array(bytes.prefix(tornAt)) }
            var content = files[inode] ?? []
            let end = Int(offset) + bytes.count
            if content.count < end { content += [UInt8](repeating: 0, count: end - content.count) }
            content.replaceSubrange(Int(offset)..<end, with: bytes)
            files[inode] = content
        case .truncate(let inode, let length):
            var content = files[inode] ?? []
            if content.count > Int(length) { content.removeLast(content.count - Int(length)) }
            else { content += [UInt8](repeating: 0, count: Int(length) - content.count) }
            files[inode] = content
        case .sync, .syncAll:
            break
        case .newInode(let inode):
            if files[inode] == nil { files[inode] = [] }
        case .create(let dir, let name, let inode), .link(let dir, let name, let inode):
            if files[inode] == nil { files[inode] = [] }
            directories[dir, default: [:]][name] = inode
        case .mkdir(let dir, let name, let inode):
            if directories[inode] == nil { directories[inode] = [:] }
            directories[dir, default: [:]][name] = inode
        case .rename(let from, let fromName, let to, let toName, let flags):
            guard let moving = directories[from]?[fromName] else { return }
            if flags == Sys.renameExchange {
                let other = directories[to]?[toName]
                directories[to, default: [:]][toName] = moving
                directories[from]![fromName] = other
            } else {
                directories[from]![fromName] = nil
                directories[to, default: [:]][toName] = moving
            }
        case .unlink(let dir, let name):
            directories[dir]?[name] = nil
        }
    }

    /// Writes the model out as a real directory tree at `path` (hard links preserved).
    func materialize(at path: String) throws {
        var written: [UInt64: String] = [:]
        try write(directory: root, at: path, written: &written)
    }

    private func write(directory inode: UInt64, at path: String, written: inout [UInt64: String]) throws {
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
        for (name, child) in directories[inode] ?? [:] {
            let childPath = path + "/" + String(decoding: name, as: UTF8.self)
            if directories[child] != nil {
                try write(directory: child, at: childPath, written: &written)
            } else if let first = written[child] {
                guard link(first, childPath) == 0 else { throw StoreError.system(errno) }
            } else {
                guard FileManager.default.createFile(atPath: childPath, contents: Data(files[child] ?? [])) else {
                    throw StoreError.system(EIO)
                }
                written[child] = childPath
            }
        }
    }
}
