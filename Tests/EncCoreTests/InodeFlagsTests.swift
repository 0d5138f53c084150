import Synchronization
import Foundation
import Testing
@testable import EncCore
import EncKeys
import EncFormat

/// Inode flags and atimes below FUSE: the atime rule and options, the flag ioctls' encodings, what
/// the flags forbid at the store's API, and that a read with no atime due writes nothing.
@Suite struct InodeFlagsTests {
    static let key = try! MasterKey(raw: (1...64).map { UInt8($0) })
    let caller = Caller(uid: 0, gid: 0)
    let root = FlagsCaller(uid: 0, mayChangeImmutable: true, ownsEverything: true)

    @Test func atimeOptionsParseAsMountDoes() {
        var options = AccessTimeOptions()
        #expect(options.rule == .relative && options.directories)
        let applied = ["strictatime", "nodiratime", "lazytime"].map { options.apply($0) }
        #expect(applied == [true, true, true])
        #expect(options == AccessTimeOptions(rule: .always, directories: false, lazy: true))
        let later = ["noatime", "relatime", "nosuid", "atime_max=3"].map { option in (options.apply(option), options.rule) }
        #expect(later.map(\.0) == [true, true, false, false])
        #expect(later.map(\.1) == [.never, .relative, .relative, .relative])
    }

    @Test func relatimeMovesAnAtimeNotAfterTheMtimeOrCtimeOrADayOld() {
        let relative = AccessTimeOptions()
        let now: UInt64 = 2_000_000_000 * 1_000_000_000
        let hour: UInt64 = 3600 * 1_000_000_000
        #expect(relative.isDue(atime: now - hour, modified: now - hour, changed: 0, now: now, directory: false))
        #expect(relative.isDue(atime: now - hour, modified: 0, changed: now - 1, now: now, directory: false))
        #expect(!relative.isDue(atime: now - hour, modified: now - 2 * hour, changed: now - 2 * hour, now: now, directory: false))
        #expect(relative.isDue(atime: now - 25 * hour, modified: 0, changed: 0, now: now, directory: false))
        // An atime in the future is not old, as in the kernel's signed comparison.
        #expect(!relative.isDue(atime: now + hour, modified: 0, changed: 0, now: now, directory: false))
        #expect(!AccessTimeOptions(rule: .relative, directories: false).isDue(atime: 0, modified: now, changed: now, now: now, directory: true))
        #expect(AccessTimeOptions(rule: .always).isDue(atime: now + hour, modified: 0, changed: 0, now: now, directory: true))
        #expect(!AccessTimeOptions(rule: .never).isDue(atime: 0, modified: now, changed: now, now: now, directory: false))
    }

    @Test func flagIoctlEncodings() {
        #expect(FileAttrIoctl.getFlags == 0x8008_6601 && FileAttrIoctl.getFlags32 == 0x8004_6601)
        #expect(FileAttrIoctl.setFlags == 0x4008_6602 && FileAttrIoctl.setFlags32 == 0x4004_6602)
        #expect(FileAttrIoctl.getXattr == 0x801c_581f && FileAttrIoctl.setXattr == 0x401c_5820)
        let all = ObjectHeader.InodeFlags.storable.subtracting(.directorySync).rawValue
        #expect(FileAttrIoctl.xflags(of: all) == 0x20 | 0x8 | 0x10 | 0x80 | 0x40)
        #expect(FileAttrIoctl.flags(ofXflags: FileAttrIoctl.xflags(of: all)) == all)
        #expect(FileAttrIoctl.flags(ofXflags: 0x800) == nil) // FS_XFLAG_DAX: not kept
        let encoded = FileAttrIoctl.FileAttributes(xflags: 0x8).encoded()
        #expect(encoded.count == 28 && FileAttrIoctl.FileAttributes.decode(encoded) == FileAttrIoctl.FileAttributes(xflags: 0x8))
        var projected = encoded
        projected[12] = 1 // fsx_projid
        #expect(FileAttrIoctl.FileAttributes.decode(projected) == nil)
    }

    @Test func newObjectsInheritAsOnExt4() {
        let all: ObjectHeader.InodeFlags = [.sync, .immutable, .appendOnly, .noDump, .noAccessTime, .directorySync]
        #expect(Volume.inheritedFlags(all, type: .directory) == [.sync, .noDump, .noAccessTime, .directorySync])
        #expect(Volume.inheritedFlags(all, type: .regular) == [.sync, .noDump, .noAccessTime])
        #expect(Volume.inheritedFlags(all, type: .symlink) == [.noDump, .noAccessTime])
    }

    /// A store in a scratch directory, a volume on it and a file `f` with a few bytes.
    func withFile(accessTimes: AccessTimeOptions = AccessTimeOptions(),
                  _ body: (Volume, _ file: UInt64, _ backing: String) throws -> Void) throws {
        try withScratchStore("encfsd-inode-flags", key: Self.key, owner: caller) { store, keys in
            let volume = try Volume(storePath: store, keys: keys, accessTimes: accessTimes)
            let before = Set(try FileManager.default.contentsOfDirectory(atPath: store))
            let (file, _, handle) = try volume.create(parent: Volume.rootID, name: Array("f".utf8), mode: 0o644, caller: caller)
            try Array("contents".utf8).withUnsafeBytes { try volume.write(handle: handle, offset: 0, data: $0) }
            try volume.release(handle: handle)
            let backing = try #require(Set(try FileManager.default.contentsOfDirectory(atPath: store)).subtracting(before).first)
            try body(volume, file, store + "/" + backing)
            volume.closeCleanly()
        }
    }

    /// Every access that moves an atime tells the front end through `attributesMoved`. Taking the
    /// callback out of its Mutex must not wrap it again each time: a closure stored as
    /// `Mutex<((UInt64) -> Void)?>` and read with `withLock { $0 }` gained two reabstraction
    /// thunks per read, so after some hundred thousand reads of files the call went as many
    /// frames deep (a daemon spinning at full CPU in the descriptor-limit test, then out of stack).
    @Test func theAttributeCallbackStaysOneCallDeep() throws {
        try withFile(accessTimes: AccessTimeOptions(rule: .always)) { volume, file, _ in
            let depths = Mutex<[Int]>([])
            volume.attributesMoved.withLock {
                $0 = AttributesMovedObserver { _ in
                    let depth = Thread.callStackReturnAddresses.count
                    depths.withLock { $0.append(depth) }
                }
            }
            for _ in 0..<600 {
                let handle = try volume.open(file, flags: O_RDONLY)
                try volume.release(handle: handle)
            }
            let seen = depths.withLock { $0 }
            #expect(seen.count == 600)
            #expect(seen.first == seen.last)
        }
    }

    @Test func immutableAndAppendOnlyRefuseAtTheStore() throws {
        try withFile { volume, file, _ in
            try volume.setInodeFlags(file, 0x800 | 0x10, caller: root) // FS_ENCRYPT_FL is ignored
            #expect(try volume.inodeFlags(of: file) == [.immutable])
            var chmod = AttributeChanges()
            chmod.mode = 0o600
            #expect(throws: StoreError.notPermitted) { try volume.setattr(file, chmod) }
            #expect(throws: StoreError.notPermitted) { try volume.open(file, flags: O_RDWR) }
            #expect(throws: StoreError.notPermitted) { try volume.unlink(parent: Volume.rootID, name: Array("f".utf8)) }
            #expect(throws: StoreError.notPermitted) { try volume.setxattr(file, name: Array("user.a".utf8), value: [1], mode: .any) }
            // Other flags change only with immutable cleared; an unknown one is EOPNOTSUPP.
            #expect(throws: StoreError.notPermitted) { try volume.setInodeFlags(file, 0x10 | 0x40, caller: root) }
            #expect(throws: StoreError.notSupported) { try volume.setInodeFlags(file, 0x4, caller: root) }
            let notMine = FlagsCaller(uid: 1000, mayChangeImmutable: true, ownsEverything: false)
            #expect(throws: StoreError.notPermitted) { try volume.setInodeFlags(file, 0, caller: notMine) }
            let noCapability = FlagsCaller(uid: 0, mayChangeImmutable: false, ownsEverything: true)
            #expect(throws: StoreError.notPermitted) { try volume.setInodeFlags(file, 0, caller: noCapability) }
            try volume.setInodeFlags(file, 0x20, caller: root)
            #expect(throws: StoreError.notPermitted) { try volume.open(file, flags: O_WRONLY) }
            let appending = try volume.open(file, flags: O_WRONLY | O_APPEND)
            try Array("+".utf8).withUnsafeBytes { try volume.write(handle: appending, offset: 8, data: $0) }
            try volume.release(handle: appending)
            try volume.setInodeFlags(file, 0, caller: root)
            try volume.unlink(parent: Volume.rootID, name: Array("f".utf8))
        }
    }

    @Test func aReadWithNoAtimeDueWritesNothing() throws {
        try withFile { volume, file, backing in
            // Just written: the atime (the creation instant) is not after the mtime, so the first
            // read moves it, written at the close; the second read finds it after the mtime.
            let node = try volume.node(file)
            func read() throws {
                let handle = try volume.open(file, flags: O_RDONLY)
                _ = try volume.read(handle: handle, offset: 0, count: 100)
                try volume.release(handle: handle)
            }
            let created = try volume.getattr(file)
            let sequence = node.state.withLock { $0.header.sequence }
            try read()
            let first = try volume.getattr(file)
            #expect(node.state.withLock { $0.header.sequence } != sequence)
            #expect(first.accessTime != created.accessTime && first.changeTime == created.changeTime)
            let written = (node.state.withLock { $0.header.sequence }, try statPath(backing))
            try read()
            let after = try statPath(backing)
            #expect(node.state.withLock { $0.header.sequence } == written.0)
            #expect(after.st_ctim.tv_sec == written.1.st_ctim.tv_sec && after.st_ctim.tv_nsec == written.1.st_ctim.tv_nsec)
            #expect(try volume.getattr(file) == first)
        }
    }

    @Test func lazytimeWritesTheAtimeWhenTheObjectIsForgotten() throws {
        try withFile(accessTimes: AccessTimeOptions(rule: .always, lazy: true)) { volume, file, backing in
            let node = try volume.node(file)
            let sequence = node.state.withLock { $0.header.sequence }
            let handle = try volume.open(file, flags: O_RDONLY)
            try volume.release(handle: handle)
            let accessed = try volume.getattr(file).accessTime
            #expect(node.state.withLock { $0.header.sequence } == sequence) // not at the close
            volume.forget(file, count: 1)
            let (again, _) = try volume.lookup(parent: Volume.rootID, name: Array("f".utf8))
            #expect(try volume.node(again).state.withLock { $0.header.sequence } != sequence)
            #expect(try volume.getattr(again).accessTime == accessed)
        }
    }

    /// The kernel may forget an inode before the last release of an open file: that release is
    /// the last moment the atime can be written.
    @Test func lazytimeWritesTheAtimeAtAReleaseAfterTheForget() throws {
        try withFile(accessTimes: AccessTimeOptions(rule: .always, lazy: true)) { volume, file, backing in
            let handle = try volume.open(file, flags: O_RDONLY)
            let accessed = try volume.getattr(file).accessTime
            volume.forget(file, count: 1)
            try volume.release(handle: handle)
            let (again, _) = try volume.lookup(parent: Volume.rootID, name: Array("f".utf8))
            #expect(try volume.getattr(again).accessTime == accessed)
        }
    }
}
