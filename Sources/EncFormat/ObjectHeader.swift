import EncCrypto
import EncKeys

/// One name an object is known by: a directory entry in a given parent.
///
/// The header lists the entries that may refer to it, so a backing file moved or swapped under
/// another name (or into another directory) fails authentication at lookup instead of serving
/// the wrong file's contents under that name.
public struct Binding: Equatable, Sendable {
    /// SHA-256("encfsd-binding" || parent directory ID || backing entry name), first 16 bytes.
    public var digest: [UInt8]
    /// The full encrypted name when the backing entry name is a hashed long name (FORMAT.md);
    /// empty for names short enough to be stored in the backing name itself.
    public var longName: [UInt8]

    public init(digest: [UInt8], longName: [UInt8] = []) {
        self.digest = digest
        self.longName = longName
    }

    public static func digest(parentID: [UInt8], backingName: [UInt8]) -> [UInt8] {
        Array(OpenSSL.sha256(Array("encfsd-binding".utf8), parentID, backingName).prefix(16))
    }
}

/// The authenticated metadata at the front of every backing object (FORMAT.md, "Object header").
public struct ObjectHeader: Equatable, Sendable {
    public struct Flags: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// A flush transaction is in flight; the object must be recovered before it is served.
        public static let pendingWrite = Flags(rawValue: 1 << 0)
        /// The object's extents are sealed in key groups (FORMAT.md 5.3): set when the object is
        /// made, in a store with the `extent-key-groups` feature, and never changed, because it
        /// decides every stored extent's IV.
        public static let keyGroups = Flags(rawValue: 1 << 1)
        package static let known: Flags = [.pendingWrite, .keyGroups]
    }

    /// v3: the inode flags of `FS_IOC_GETFLAGS`/`SETFLAGS`, stored with Linux's own bit values so
    /// the ioctl needs no translation. The kernel does not enforce them for FUSE; the daemon does.
    public struct InodeFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let sync = InodeFlags(rawValue: 0x8)
        public static let immutable = InodeFlags(rawValue: 0x10)
        public static let appendOnly = InodeFlags(rawValue: 0x20)
        public static let noDump = InodeFlags(rawValue: 0x40)
        public static let noAccessTime = InodeFlags(rawValue: 0x80)
        /// Directories only.
        public static let directorySync = InodeFlags(rawValue: 0x10000)
        public static let storable: InodeFlags = [.sync, .immutable, .appendOnly, .noDump, .noAccessTime, .directorySync]
    }

    public static let magic: [UInt8] = Array("EFS1".utf8)
    /// Header versions this build reads and writes (FORMAT.md 4.3 and 15). An object keeps its
    /// version when rewritten unless its store's version is newer: a v1 store stays readable by
    /// v1 builds until the user upgrades it.
    public static let versions: ClosedRange<UInt16> = 1...3
    public static let newestVersion: UInt16 = 3
    package static let macBytes = 32
    package static let checksumBytes = 8

    /// Bytes of the fixed part of a body in `version`.
    package static func fixedBytes(version: UInt16) -> Int {
        switch version {
        case 1: 112
        case 2: 144
        default: 176
        }
    }
    package static let smallestFixedBytes = 112

    public var version: UInt16
    public var sequence: UInt64 = 0
    public var flags: Flags = []
    public var type: ObjectType
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var extentSize: UInt32
    public var rdev: UInt64 = 0
    public var size: UInt64 = 0
    public var objectID: [UInt8]
    /// The policy of the object's contents (and, for a directory, of its children).
    public var policy: KeyIdentifier
    /// The policy whose key authenticates this header: that of the directory the object was
    /// created in. It equals `policy` except for a directory given its own policy (`encfsd
    /// policy set`), which can happen before that policy's key is present, as in fscrypt.
    public var macPolicy: KeyIdentifier
    public var holes = HoleMap()
    public var bindings: [Binding] = []
    /// v2: the store epoch (a per-mount counter, `EpochRecord`) in which this version was written.
    /// It is the evidence that decides whether a damaged other slot may be a write torn by an
    /// unclean shutdown (and the older slot served) or damage (EIO). v1 slots read as 0.
    public var epoch: UInt64 = 0
    /// v2: the key that still seals the extents in `legacyRanges` (and for a directory, the names
    /// not yet moved to `policy`) while a rekey moves the object from it to `policy`.
    public var previousPolicy: KeyIdentifier?
    /// v2: extent indices still sealed under `previousPolicy`; every other stored extent is sealed
    /// under `policy`. Naming the key here costs no read per extent: the header is read anyway.
    public var legacyRanges = ExtentRangeSet()
    /// v2: creation time, nanoseconds since the Unix epoch (0: unknown, as in every v1 object).
    public var birthTime: UInt64 = 0
    /// v3: `FS_IOC_SETFLAGS` flags.
    public var inodeFlags: InodeFlags = []
    /// v3: the plaintext atime in nanoseconds since the Unix epoch, kept here so updating it never
    /// moves the plaintext ctime (which is the backing file's). 0: not kept, the backing file's
    /// atime is the plaintext atime (every v1 and v2 object).
    public var accessTime: UInt64 = 0
    /// v3: the generation of the object's xattr side object, 0 when it has none. The header is
    /// authenticated, so this pins the side object's version: a stale or swapped one reads EIO.
    public var xattrGeneration: UInt64 = 0
    /// v3: the plaintext ctime kept across an atime-only header write, which moves the backing
    /// ctime although nothing changed; valid only while the backing object's atime equals its
    /// ctime (that write ends with a futimens setting the atime to now, which gives both the same
    /// instant; any later change moves the ctime alone). 0: the backing ctime is the plaintext one.
    public var changeTime: UInt64 = 0

    public init(type: ObjectType, mode: UInt32, uid: UInt32, gid: UInt32, extentSize: UInt32,
                objectID: [UInt8], policy: KeyIdentifier, macPolicy: KeyIdentifier? = nil,
                version: UInt16 = ObjectHeader.newestVersion) {
        precondition(Self.versions.contains(version))
        self.version = version
        self.type = type
        self.mode = mode & 0o7777
        self.uid = uid
        self.gid = gid
        self.extentSize = extentSize
        self.objectID = objectID
        self.policy = policy
        self.macPolicy = macPolicy ?? policy
    }

    public var geometry: ExtentGeometry { ExtentGeometry(extentSize: Int(extentSize), keyGroups: flags.contains(.keyGroups)) }

    /// Bytes one more binding would add, to refuse a link before the header overflows.
    public static func bindingBytes(_ b: Binding) -> Int { 18 + b.longName.count }

    public var encodedBodyCount: Int {
        Self.fixedBytes(version: version) + (holes.ranges.count + legacyRanges.ranges.count) * 16
            + bindings.reduce(0) { $0 + Self.bindingBytes($1) }
    }

    /// The key that sealed stored extent `index` (FORMAT.md 15.3).
    public func sealingPolicy(ofExtent index: UInt64) -> KeyIdentifier {
        if let previousPolicy, legacyRanges.contains(index) { return previousPolicy }
        return policy
    }

    public func fits(extraBytes: Int = 0) -> Bool {
        encodedBodyCount + extraBytes + Self.macBytes + Self.checksumBytes <= ExtentGeometry.headerSlotBytes
    }

    package func encodeBody() -> [UInt8] {
        // An older slot has no room for what only a newer version can say; writing it there
        // would drop it.
        precondition(version >= 2 || (previousPolicy == nil && legacyRanges.isEmpty))
        precondition(version >= 3 || (inodeFlags.isEmpty && accessTime == 0 && xattrGeneration == 0 && changeTime == 0))
        var w = ByteWriter(capacity: ExtentGeometry.headerSlotBytes)
        w.raw(Self.magic)
        w.u16(version)
        w.u16(UInt16(encodedBodyCount))
        w.u64(sequence)
        w.u32(flags.rawValue)
        w.u8(type.rawValue)
        w.zeros(3)
        w.u32(mode)
        w.u32(uid)
        w.u32(gid)
        w.u32(extentSize)
        w.u64(rdev)
        w.u64(size)
        w.raw(objectID)
        w.raw(policy.bytes)
        w.raw(macPolicy.bytes)
        w.u16(UInt16(holes.ranges.count))
        w.u16(UInt16(bindings.count))
        if version >= 2 {
            w.u16(UInt16(legacyRanges.ranges.count))
            w.zeros(2)
            w.u64(epoch)
            w.raw(previousPolicy?.bytes ?? [UInt8](repeating: 0, count: 16))
            w.u64(birthTime)
            if version >= 3 {
                w.u32(inodeFlags.rawValue)
                w.zeros(4)
                w.u64(accessTime)
                w.u64(xattrGeneration)
                w.u64(changeTime)
            }
        } else {
            w.zeros(4)
        }
        for r in holes.ranges + legacyRanges.ranges {
            w.u64(r.lowerBound)
            w.u64(r.upperBound - r.lowerBound)
        }
        for b in bindings {
            w.raw(b.digest)
            w.u16(UInt16(b.longName.count))
            w.raw(b.longName)
        }
        return w.bytes
    }

    /// How a slot body that passed its checksum can still be unusable.
    package enum DecodeFailure: Error, Equatable {
        /// Written by a newer format version, or with flags this version does not know: refused,
        /// never guessed at or silently replaced by the older slot.
        case unsupported(version: UInt16, sequence: UInt64)
        case malformed
    }

    /// Parses a body whose checksum has been verified, enforcing every rule of FORMAT.md 4.3 to
    /// 4.5: reserved bytes zero, ranges canonical and inside the file, fields that do not apply
    /// to the object's type zero.
    package static func decodeBody(_ body: ArraySlice<UInt8>) -> Result<ObjectHeader, DecodeFailure> {
        var r = ByteReader(body)
        guard r.expect(magic), let version = r.u16(), let length = r.u16(), Int(length) == body.count,
              let sequence = r.u64(), let rawFlags = r.u32()
        else { return .failure(.malformed) }
        let flags = Flags(rawValue: rawFlags)
        guard versions.contains(version), Flags.known.isSuperset(of: flags) else {
            return .failure(.unsupported(version: version, sequence: sequence))
        }
        guard let typeByte = r.u8(), let type = ObjectType(rawValue: typeByte), r.zeros(3),
              let mode = r.u32(), mode & ~0o7777 == 0, let uid = r.u32(), let gid = r.u32(),
              let extentSize = r.u32(), let rdev = r.u64(), let size = r.u64(),
              let objectID = r.raw(16), let policyBytes = r.raw(16), let policy = KeyIdentifier(bytes: policyBytes),
              let macPolicyBytes = r.raw(16), let macPolicy = KeyIdentifier(bytes: macPolicyBytes),
              let holeCount = r.u16(), let bindingCount = r.u16()
        else { return .failure(.malformed) }
        var legacyCount: UInt16 = 0, epoch: UInt64 = 0, birthTime: UInt64 = 0
        var previousPolicy: KeyIdentifier?
        var inodeFlags: InodeFlags = [], accessTime: UInt64 = 0, xattrGeneration: UInt64 = 0, changeTime: UInt64 = 0
        if version >= 2 {
            guard let count = r.u16(), r.zeros(2), let e = r.u64(), let previous = r.raw(16), let born = r.u64()
            else { return .failure(.malformed) }
            (legacyCount, epoch, birthTime) = (count, e, born)
            if previous.contains(where: { $0 != 0 }) {
                guard let id = KeyIdentifier(bytes: previous), id != policy else { return .failure(.malformed) }
                previousPolicy = id
            }
            // Legacy ranges name the key of stored extents: without a previous key, or on a
            // directory (which has no extents), they cannot mean anything.
            guard legacyCount == 0 || (previousPolicy != nil && type != .directory) else { return .failure(.malformed) }
            if version >= 3 {
                guard let rawInodeFlags = r.u32(), r.zeros(4), let atime = r.u64(), let generation = r.u64(),
                      let kept = r.u64()
                else { return .failure(.malformed) }
                let stored = InodeFlags(rawValue: rawInodeFlags)
                guard InodeFlags.storable.isSuperset(of: stored), type == .directory || !stored.contains(.directorySync)
                else { return .failure(.malformed) }
                (inodeFlags, accessTime, xattrGeneration, changeTime) = (stored, atime, generation, kept)
            }
        } else {
            guard r.zeros(4) else { return .failure(.malformed) }
        }
        let isDevice = type == .characterDevice || type == .blockDevice
        // Key groups decide extents' IVs: only a version 3 object with extents has them (FORMAT.md 16.4).
        guard !flags.contains(.keyGroups) || (version >= 3 && type != .directory) else { return .failure(.malformed) }
        if type == .directory {
            guard extentSize == 0, size == 0, holeCount == 0 else { return .failure(.malformed) }
        } else {
            guard ExtentGeometry.isValid(extentSize: Int(extentSize)), size <= maximumSize else { return .failure(.malformed) }
        }
        guard isDevice || rdev == 0, type == .directory || policy == macPolicy || !carriesContents(type)
        else { return .failure(.malformed) }
        var header = ObjectHeader(type: type, mode: mode, uid: uid, gid: gid, extentSize: extentSize,
                                  objectID: objectID, policy: policy, macPolicy: macPolicy, version: version)
        header.sequence = sequence
        header.epoch = epoch
        header.birthTime = birthTime
        header.inodeFlags = inodeFlags
        header.accessTime = accessTime
        header.xattrGeneration = xattrGeneration
        header.changeTime = changeTime
        header.previousPolicy = previousPolicy
        header.flags = flags
        header.rdev = rdev
        header.size = size
        let extentCount = type == .directory ? 0 : header.geometry.extentCount(size: size)
        guard let holes = readRanges(&r, count: holeCount, extentCount: extentCount),
              let legacy = readRanges(&r, count: legacyCount, extentCount: extentCount),
              // A hole stores nothing, so no key can have sealed it.
              !holes.contains(where: { h in legacy.contains { $0.overlaps(h) } })
        else { return .failure(.malformed) }
        header.holes = HoleMap(ranges: holes)
        header.legacyRanges = ExtentRangeSet(ranges: legacy)
        for _ in 0..<bindingCount {
            guard let digest = r.raw(16), let nameCount = r.u16(), let name = r.raw(Int(nameCount)),
                  name.isEmpty || NameCodec.isValidLongCiphertext(name) else { return .failure(.malformed) }
            header.bindings.append(Binding(digest: digest, longName: name))
        }
        guard r.position == body.endIndex else { return .failure(.malformed) }
        return .success(header)
    }

    /// Canonical ranges (sorted, disjoint, non-adjacent, inside the file), or nil.
    private static func readRanges(_ r: inout ByteReader, count: UInt16, extentCount: UInt64) -> [Range<UInt64>]? {
        var previousEnd: UInt64?
        var ranges: [Range<UInt64>] = []
        for _ in 0..<count {
            guard let start = r.u64(), let length = r.u64(), length > 0, start <= extentCount, length <= extentCount - start,
                  previousEnd.map({ start > $0 }) ?? true else { return nil }
            ranges.append(start..<(start + length))
            previousEnd = start + length
        }
        return ranges
    }

    /// Objects with encrypted contents are authenticated under their own policy; only
    /// directories (policy roots) and content-less objects moved across policies differ.
    package static func carriesContents(_ type: ObjectType) -> Bool {
        type == .regular || type == .symlink
    }

    /// Largest plaintext size: extent indices and backing offsets stay well inside Int64.
    public static let maximumSize: UInt64 = 1 << 50
}
