import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// `encfsd fsck`: walks a store that is not mounted and checks every object (header, name,
/// binding, every extent, pending journals). With `repair`, completes interrupted writes from
/// their journals, removes encfsd's own leftover temporaries, and moves whatever cannot be
/// recovered into `.quarantine/`, never deleting data.
public final class StoreChecker {
    public struct Finding: Sendable, CustomStringConvertible {
        public enum Severity: Sendable { case problem, repaired, notice }
        public var severity: Severity
        /// The plaintext path when known, else the backing path (relative to the store).
        public var path: String
        public var message: String
        public var description: String { "\(path): \(message)" }
    }

    public struct Summary: Sendable {
        public var directories = 0
        public var files = 0
        public var extentsVerified = 0
        public var bytesVerified: UInt64 = 0
        public var locked = 0
        /// Names and extents of a half-rekeyed tree sealed under a key not given: not checked.
        public var notChecked = 0
        public var findings: [Finding] = []
        public var problemsLeft: Int { findings.filter { $0.severity == .problem }.count }
        public var repaired: Int { findings.filter { $0.severity == .repaired }.count }
    }

    let storePath: String
    let keys: KeyTable
    let repair: Bool
    let progress: (Int) -> Void
    private(set) var summary = Summary()
    private var visited = 0
    private var storeFD: SharedDescriptor!
    private var journalFD: SharedDescriptor!
    /// Probed only for a repair (a check writes nothing); decides how quarantine renames.
    private var capabilities = BackingCapabilities.local
    /// The daemon's judgement of damaged slots (and, with --repair, this run's epoch).
    private var slots: HeaderSlots!
    private var config: StoreConfig!
    /// `.xattrs`, when the store has it, and the side object files the headers read name.
    private var sideDirectory: SharedDescriptor?
    private var sideObjectsNamed: Set<[UInt8]> = []
    /// Some header could not be read: a side object no header names may then be that object's.
    private var headerUnread = false

    public init(storePath: String, keys: KeyTable, repair: Bool, progress: @escaping (Int) -> Void = { _ in }) {
        self.storePath = storePath
        self.keys = keys
        self.repair = repair
        self.progress = progress
    }

    /// Counts the objects a check will visit, for a progress bar.
    /// Walks through the store boundary like the check itself: a planted link to a directory
    /// elsewhere is neither counted nor entered.
    public static func countObjects(storePath: String) -> Int {
        func count(in dir: borrowing FileDescriptor) -> Int {
            guard let entries = try? dir.listDirectory() else { return 0 }
            return entries.reduce(0) { total, entry in
                guard NameCodec.isEntryName(entry.name) else { return total }
                guard entry.isDirectory, let sub = try? dir.openEntry(entry.name, .directory, .path) else { return total + 1 }
                return total + 1 + count(in: sub)
            }
        }
        guard let root = try? Sys.openStoreRoot(storePath) else { return 0 }
        return count(in: root)
    }

    public func run() throws -> Summary {
        storeFD = SharedDescriptor(try Sys.openStoreRoot(storePath))
        let config = try StoreConfig.load(storeFD: storeFD.descriptor, shownAs: storePath)
        self.config = config
        if repair {
            journalFD = SharedDescriptor(try Volume.openJournal(storeFD: storeFD.descriptor))
        } else {
            // A check writes nothing: a missing journal is reported, not made.
            do {
                journalFD = SharedDescriptor(try storeFD.descriptor.openEntry(Journal.directoryName, .directory, .path))
            } catch StoreError.system(ENOENT) {
                note(.problem, ".journal", "missing (--repair makes it)")
                journalFD = SharedDescriptor(try storeFD.descriptor.openEntry([0x2e], .directory, .path))
            }
        }
        if repair {
            capabilities = try BackingCapabilities.probe(storeFD: storeFD.descriptor)
            try ExchangeRecord.recoverAll(journalFD: journalFD.descriptor, storeFD: storeFD.descriptor)
        }
        let reading: EpochRecord.Reading
        if repair {
            // A repair writes headers: it is an epoch of its own, closed cleanly once its writes are
            // durable, so an unclean end it found stays on record (`lastUncleanEpoch`).
            let opened = try EpochRecord.open(storeFD: storeFD.descriptor, storeVersion: config.version)
            slots = HeaderSlots(epoch: opened.epoch, evidence: opened.evidence, storeVersion: UInt16(config.version))
            reading = opened.reading
        } else {
            reading = try EpochRecord.read(storeFD: storeFD.descriptor)
            slots = .reading(evidence: reading.evidence(storeVersion: config.version), storeVersion: config.version)
        }
        if reading.damaged {
            note(.problem, EpochRecord.fileName, "damaged: the daemon passes over no damaged header slot as a torn write until a clean unmount rewrites it")
        } else if reading.missing && config.version >= 2 {
            note(.problem, EpochRecord.fileName, "missing from a version \(config.version) store: damaged header slots cannot be judged")
        }
        defer {
            if repair, let fd = try? storeFD.descriptor.listingDescriptor(), (try? fd.syncfs()) != nil {
                try? EpochRecord.close(storeFD: storeFD.descriptor, epoch: slots.epoch, evidence: slots.evidence)
            }
        }
        let rootHeader: ObjectHeader
        do {
            let root = try storeFD.descriptor.openEntry(directoryHeaderName, .regularFile, .readOnly)
            rootHeader = try header(of: root, path: "/") { SharedDescriptor(try self.storeFD.descriptor.openPrivateFile(directoryHeaderName)) }
        } catch {
            note(.problem, "/", "root header: \(error)")
            return summary
        }
        if rootHeader.version > config.version {
            note(.problem, "/", "root header is format version \(rootHeader.version), newer than encfsd.conf's \(config.version) "
                 + "(a configuration edited down): the daemon refuses the store")
        }
        if rootHeader.policy != config.rootIdentifier {
            note(.problem, "/", "root policy \(rootHeader.policy) differs from encfsd.conf's \(config.rootPolicy)")
        }
        do {
            sideDirectory = try XattrSideStore.directory(storeFD: storeFD.descriptor, create: false)
        } catch {
            note(.problem, ".xattrs", "\(error): every xattr side object reads EIO")
            headerUnread = true
        }
        checkSideObject(of: rootHeader, path: "/")
        try walk(directoryFD: storeFD.descriptor, header: rootHeader, plainPath: "", backingPath: "")
        checkJournal()
        checkSideObjectGarbage()
        return summary
    }

    private func note(_ severity: Finding.Severity, _ path: String, _ message: String) {
        summary.findings.append(Finding(severity: severity, path: path, message: message))
    }

    /// The header of an object, verified when its key is available. Every damaged slot is a
    /// finding, whether the daemon would pass over it (a write torn by an unclean shutdown) or
    /// refuse the object; --repair rewrites it from the intact slot through `writable`.
    private func header(of fd: borrowing FileDescriptor, path: String, writable: () throws -> SharedDescriptor) throws -> ObjectHeader {
        // Chosen as if every damage were a torn write, to find the intact slot; whether the daemon
        // would serve it is judged below on the store's real evidence.
        let permissive = HeaderSlots.reading(evidence: TornWriteEvidence(lastUncleanEpoch: .max), storeVersion: config.version)
        let unverified = try permissive.choice(fd: fd, key: nil)
        let key = keys.key(for: unverified.header.macPolicy)
        let choice = try key.map { try permissive.choice(fd: fd, key: $0) } ?? unverified
        guard let torn = choice.tornSlot else { return choice.header }
        let served = slots.evidence.tornWritePossible(sinceEpoch: choice.header.epoch)
        let what = "header slot \(torn) is damaged; " + (served
            ? "the daemon serves the other slot (sequence \(choice.header.sequence)) as the state before a write torn by an unclean shutdown"
            : "no unclean shutdown since the other slot was written explains it, so the daemon refuses the object (EIO)")
        guard repair, let key else {
            note(.problem, path, what + (key == nil ? " (not verified: its key is not loaded)" : "; --repair rewrites it from the intact slot"))
            return choice.header
        }
        let target = try writable()
        let rewritten = try slots.rewriteDamaged(fd: target.descriptor, header: choice.header, key: key)
        note(.repaired, path, what + "; rewrote it from the intact slot (sequence \(choice.header.sequence))")
        return rewritten
    }

    /// Reports a problem with an object; with --repair, moves the object aside (then it counts as
    /// repaired, since nothing broken is left in the namespace and nothing was deleted).
    private func unrecoverable(in directoryFD: borrowing FileDescriptor, name: [UInt8], path: String, _ why: String) {
        if repair, let moved = quarantine(in: directoryFD, name: name, path: path) {
            note(.repaired, path, "\(why); moved to .quarantine/\(moved) (nothing deleted)")
        } else {
            note(.problem, path, why)
        }
    }

    private func walk(directoryFD: borrowing FileDescriptor, header: ObjectHeader, plainPath: String, backingPath: String) throws {
        summary.directories += 1
        let nameKey = keys.key(for: header.policy)
        if nameKey == nil { summary.locked += 1 }
        for entry in try directoryFD.listDirectory() {
            let name = String(decoding: entry.name, as: UTF8.self)
            let backing = backingPath + "/" + name
            if entry.name == directoryHeaderName || (backingPath.isEmpty && (name == StoreConfig.fileName || name == StoreLock.fileName || name == EpochRecord.fileName || name == ".journal" || name == ".quarantine"
                || entry.name == XattrSideStore.directoryName)) {
                continue
            }
            if Leftovers.isLeftoverName(entry.name) && entry.isDirectory {
                if repair {
                    do {
                        try removeLeftover(in: directoryFD, name: entry.name)
                        note(.repaired, backing, "removed an unfinished mkdir or rmdir left by a crash")
                    } catch {
                        note(.problem, backing, "an unfinished mkdir or rmdir could not be removed: \(error)")
                    }
                } else if let fd = try? directoryFD.openEntry(entry.name, .directory, .path),
                          (try? Leftovers.isRemovable(fd)) == true {
                    note(.notice, backing, "unfinished mkdir or rmdir left by a crash (harmless; --repair removes it)")
                } else {
                    note(.problem, backing, "named as encfsd's own leftover but \(Leftovers.foreign.integrityFailure!)")
                }
                continue
            }
            if entry.name.starts(with: Leftovers.newFilePrefix) && !entry.isDirectory {
                if repair, (try? directoryFD.unlinkAt(entry.name)) != nil {
                    note(.repaired, backing, "removed an unfinished create left by a crash")
                } else {
                    note(.notice, backing, "unfinished create left by a crash (harmless; --repair removes it)")
                }
                continue
            }
            if ExchangeRecord.isTemporaryName(entry.name) {
                note(.problem, backing, "an object of an exchange that could not be completed (see .journal/xc-*)")
                continue
            }
            guard NameCodec.isEntryName(entry.name) else {
                note(.notice, backing, "not an encfsd entry; ignored")
                continue
            }
            visited += 1
            progress(visited)
            try checkEntry(entry, in: directoryFD, parent: header, nameKey: nameKey, plainPath: plainPath, backing: backing)
        }
    }

    private func checkEntry(_ entry: Sys.RawEntry, in directoryFD: borrowing FileDescriptor, parent: ObjectHeader, nameKey: MasterKey?,
                            plainPath: String, backing: String) throws {
        let isDirectory = entry.isDirectory
        let fd: SharedDescriptor
        let headerFD: SharedDescriptor
        do {
            // Through the store boundary: a planted link, FIFO or device is a finding (and, with
            // --repair, moved aside), never opened or followed.
            fd = SharedDescriptor(try directoryFD.openEntry(entry.name, isDirectory ? .directory : .regularFile,
                                                            isDirectory ? .path : (repair ? .readWrite : .readOnly)))
            headerFD = isDirectory ? SharedDescriptor(try Volume.openDirectoryHeader(fd.descriptor)) : fd
        } catch {
            unrecoverable(in: directoryFD, name: entry.name, path: backing, "\(error)")
            return
        }
        var header: ObjectHeader
        do {
            header = try self.header(of: headerFD.descriptor, path: backing) {
                isDirectory ? SharedDescriptor(try fd.descriptor.openPrivateFile(directoryHeaderName)) : fd
            }
        } catch {
            // A short name decrypts without the header, so the finding can name the file.
            let shown = nameKey.flatMap { key in
                NameCodec.ciphertext(ofShortBackingName: entry.name).flatMap {
                    try? NameCodec.decrypt(ciphertext: $0, directoryID: parent.objectID, key: key)
                }
            }.map { plainPath + "/" + String(decoding: $0, as: UTF8.self) + " (backing \(backing))" } ?? backing
            unrecoverable(in: directoryFD, name: entry.name, path: shown, "header: \(error)")
            headerUnread = true
            return
        }
        // The name: decrypt it, and require the object to be bound to it.
        var display = backing
        // In a directory being rekeyed, names not moved yet are under its previous key.
        let legacyNameKey = parent.previousPolicy.flatMap { keys.key(for: $0) }
        if nameKey != nil || legacyNameKey != nil {
            let opened = [nameKey, legacyNameKey].compactMap { $0 }.lazy.compactMap { key in
                try? NameResolver.plaintext(of: entry.name, directoryID: parent.objectID, key: key) { header.bindings }
            }.first
            if let plain = opened {
                display = plainPath + "/" + String(decoding: plain, as: UTF8.self)
            } else if let previous = parent.previousPolicy, nameKey == nil || legacyNameKey == nil {
                summary.notChecked += 1
                note(.notice, backing, "name not checked: a half-rekeyed directory (\(previous) -> \(parent.policy)) and "
                     + "only one of its keys given")
            } else {
                note(.problem, backing, "name: name failed authentication")
            }
            if keys.key(for: header.macPolicy) != nil
                && !NameResolver.isBound(header.bindings, parentID: parent.objectID, backingName: entry.name) {
                note(.problem, display, "not bound to this name: moved or swapped in the backing store")
            }
        }
        checkSideObject(of: header, path: display)
        if isDirectory {
            guard header.type == .directory else { return note(.problem, display, "a backing directory whose header is not a directory's") }
            try walk(directoryFD: fd.descriptor, header: header, plainPath: display, backingPath: backing)
            return
        }
        summary.files += 1
        guard header.type != .directory else { return note(.problem, display, "a backing file whose header is a directory's") }
        guard let key = keys.key(for: header.policy) else {
            if header.previousPolicy != nil {
                summary.notChecked += 1
                note(.notice, display, "contents not checked: half-rekeyed to \(header.policy), whose key was not given")
            }
            return
        }
        if header.flags.contains(.pendingWrite) {
            guard repair else { return note(.problem, display, "an interrupted write awaits recovery (--repair, or open it on a mount)") }
            do {
                header = try slots.completeInterruptedWrite(fd: fd.descriptor, journalFD: journalFD.descriptor, pending: header, key: key)
                note(.repaired, display, "completed an interrupted write from its journal")
            } catch {
                unrecoverable(in: directoryFD, name: entry.name, path: display, "interrupted write cannot be recovered: \(error)")
                return
            }
        }
        verifyExtents(fd: fd, header: header, key: key, path: display)
    }

    /// The side object the header names: there, a plain file of one link, and opening under the
    /// object's ID and generation with its key (or, half way through a rekey, the previous one).
    private func checkSideObject(of header: ObjectHeader, path: String) {
        guard header.xattrGeneration != 0 else { return }
        sideObjectsNamed.insert(XattrSideObject.fileName(objectID: header.objectID, generation: header.xattrGeneration))
        let what = "xattr side object (generation \(header.xattrGeneration))"
        guard let sideDirectory else { return note(.problem, path, "\(what) is missing (no .xattrs): its xattrs read EIO") }
        let image: [UInt8]
        do {
            image = try XattrSideStore.read(directoryFD: sideDirectory.descriptor, objectID: header.objectID, generation: header.xattrGeneration)
        } catch {
            return note(.problem, path, "\(what): \(error): its xattrs read EIO")
        }
        let candidates = [keys.key(for: header.policy), header.previousPolicy.flatMap { keys.key(for: $0) }].compactMap { $0 }
        guard !candidates.isEmpty else { return }
        let opens = candidates.contains { (try? XattrSideObject.open(image, objectID: header.objectID, generation: header.xattrGeneration, key: $0)) != nil }
        if !opens { note(.problem, path, "\(what) failed authentication (altered, stale or another object's): its xattrs read EIO") }
    }

    /// Files of `.xattrs` no header names: generations a crash left behind (written but never
    /// committed, or committed over and not yet unlinked) and those of objects whose last name
    /// went in a crash. Nobody reads them; --repair removes them, unless some header could not be
    /// read (the file might be that object's).
    private func checkSideObjectGarbage() {
        guard let sideDirectory, let entries = try? sideDirectory.descriptor.listDirectory() else { return }
        for entry in entries where !sideObjectsNamed.contains(entry.name) {
            let shown = ".xattrs/" + String(decoding: entry.name, as: UTF8.self)
            guard XattrSideObject.parse(fileName: entry.name) != nil, !entry.isDirectory else {
                note(.notice, shown, "not an encfsd side object; ignored")
                continue
            }
            if repair && !headerUnread, (try? sideDirectory.descriptor.unlinkAt(entry.name)) != nil {
                note(.repaired, shown, "removed a side object generation no header names (left by a crash)")
            } else {
                note(.notice, shown, "a side object generation no header names, left by a crash (harmless; --repair removes it)")
            }
        }
    }

    /// Reads every stored extent, so each one's authentication is checked.
    private func verifyExtents(fd: SharedDescriptor, header: ObjectHeader, key: MasterKey, path: String) {
        // Extents a rekey has not rewritten yet are checked under the previous key, if given.
        let legacyKey = header.previousPolicy.flatMap { keys.key(for: $0) }
        let file = ExtentFile(backing: fd, journal: journalFD, key: key, legacyKey: legacyKey, header: header, slots: slots)
        let geometry = header.geometry
        var bad: [UInt64] = []
        var unchecked = 0
        for index in 0..<geometry.extentCount(size: header.size) where !header.holes.contains(index) {
            do {
                let bytes = try file.read(offset: geometry.extentStart(index), count: geometry.extentSize)
                summary.extentsVerified += 1
                summary.bytesVerified += UInt64(bytes.count)
            } catch StoreError.noKey {
                unchecked += 1
            } catch {
                bad.append(index)
            }
        }
        if unchecked > 0, let previous = header.previousPolicy {
            summary.notChecked += unchecked
            note(.notice, path, "\(unchecked) extent(s) still sealed under \(previous) (a rekey part way), whose key was not given: not checked")
        }
        if !bad.isEmpty {
            let shown = bad.prefix(8).map(String.init).joined(separator: ", ")
            note(.problem, path, "\(bad.count) extent(s) fail authentication (\(shown)\(bad.count > 8 ? ", ..." : "")); reads of them give EIO")
        }
    }

    /// Moves an object into `.quarantine/`; returns its name there, or nil (with a finding).
    private func quarantine(in directoryFD: borrowing FileDescriptor, name: [UInt8], path: String) -> String? {
        do {
            let quarantine = Array(".quarantine".utf8)
            do {
                try storeFD.descriptor.mkdirAt(quarantine, mode: 0o700)
            } catch StoreError.system(EEXIST) {}
            // Whatever already stands at the name must be a real directory: a planted symlink
            // would move the object, or anything else, outside the store.
            let target = try storeFD.descriptor.openEntry(quarantine, .directory, .path)
            let moved = Array("\(Int(Date().timeIntervalSince1970))-\(String(decoding: name, as: UTF8.self))".utf8)
            try directoryFD.renameNoReplace(name, target, moved, native: capabilities.has(.renameNoReplace))
            return String(decoding: moved, as: UTF8.self)
        } catch {
            note(.problem, path, "could not be quarantined: \(error)")
            return nil
        }
    }

    private func removeLeftover(in directoryFD: borrowing FileDescriptor, name: [UInt8]) throws {
        let fd = try directoryFD.openEntry(name, .directory, .path)
        guard try Leftovers.isRemovable(fd) else { throw Leftovers.foreign }
        try Leftovers.remove(fd, named: name, in: directoryFD)
    }

    /// Shadows whose object is gone are leftovers of files deleted mid-transaction.
    private func checkJournal() {
        guard let shadows = try? journalFD.descriptor.listDirectory() else { return }
        for shadow in shadows where !shadow.isDirectory {
            let size = (try? journalFD.descriptor.fstatAt(shadow.name).st_size) ?? 0
            if size == 0 && repair {
                try? journalFD.descriptor.unlinkAt(shadow.name)
            }
        }
    }
}
