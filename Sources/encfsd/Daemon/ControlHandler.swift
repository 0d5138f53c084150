import EncCore
import FuseBridge
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Answers the control ioctls: encfsd's own and the fscrypt ones that fit through FUSE.
/// Every argument is validated completely before anything changes: a malformed or hostile
/// argument gets EINVAL (ENOTTY for an unknown command) and changes nothing.
struct ControlHandler: Sendable {
    let volume: Volume
    let keyService: KeyService
    /// The session's request counters, for `encfsd status` (round trips per operation).
    let requestCounts: RequestCounts
    /// When the mount came up (the handler is made as the file system is), for `encfsd status`.
    let started = UInt64(time(nil))

    func handle(node: UInt64, command: UInt32, input: [UInt8], outputSize: Int, context: RequestContext) throws -> IoctlReply {
        switch command {
        case ControlProtocol.addKey:
            guard outputSize == ControlProtocol.AddKeyArgument.byteCount,
                  let argument = ControlProtocol.AddKeyArgument.decode(input) else { throw StoreError.invalidArgument }
            // Raw bytes through FUSE would linger in libfuse's request buffers: keys come by
            // keyring serial only, read straight into locked memory.
            guard argument.source == .keyring, argument.raw.isEmpty, argument.keyringSerial > 0 else {
                throw StoreError.invalidArgument
            }
            let identifier = try keyService.add(serial: argument.keyringSerial, context: context)
            Log.notice("key \(identifier) added by uid \(context.uid)")
            let reply = ControlProtocol.AddKeyArgument(source: .keyring, keyringSerial: argument.keyringSerial,
                                                       identifier: identifier.bytes)
            return IoctlReply(output: reply.encoded())

        case FscryptIoctl.removeKey, FscryptIoctl.removeKeyAllUsers:
            guard outputSize == FscryptIoctl.RemoveKeyArgument.byteCount,
                  var argument = FscryptIoctl.RemoveKeyArgument.decode(input) else { throw StoreError.invalidArgument }
            let allUsers = command == FscryptIoctl.removeKeyAllUsers
            argument.statusFlags = try keyService.remove(argument.identifier, allUsers: allUsers, context: context)
            Log.notice("key \(argument.identifier) removed by uid \(context.uid)\(allUsers ? " for all users" : "")"
                       + Self.removalOutcome(argument.statusFlags))
            return IoctlReply(output: argument.encoded())

        case FscryptIoctl.getKeyStatus:
            guard outputSize == FscryptIoctl.KeyStatusArgument.byteCount,
                  let argument = FscryptIoctl.KeyStatusArgument.decode(input) else { throw StoreError.invalidArgument }
            return IoctlReply(output: keyService.status(argument.identifier, context: context).encoded())

        case FscryptIoctl.getNonce:
            guard outputSize == 16 else { throw StoreError.invalidArgument }
            return IoctlReply(output: try volume.nonce(of: node))

        case FileAttrIoctl.getFlags, FileAttrIoctl.getFlags32:
            // Every encfsd object is encrypted: lsattr shows 'E' beside the flags it keeps.
            let flags = FileAttrIoctl.encryptFlag | (try volume.inodeFlags(of: node).rawValue)
            let bytes = withUnsafeBytes(of: UInt64(flags).littleEndian) { Array($0) }
            guard outputSize == 4 || outputSize == 8 else { throw StoreError.invalidArgument }
            return IoctlReply(output: Array(bytes.prefix(outputSize)))

        case FileAttrIoctl.setFlags, FileAttrIoctl.setFlags32:
            // The kernel's fileattr path sends an int (4 bytes) whichever form the caller used; the
            // upper half of a long must be zero (no flag lives there).
            guard input.count == 4 || input.count == 8 else { throw StoreError.invalidArgument }
            var value: UInt64 = 0
            for (i, byte) in input.enumerated() { value |= UInt64(byte) << (8 * UInt64(i)) }
            guard value <= UInt64(UInt32.max) else { throw StoreError.notSupported }
            try volume.setInodeFlags(node, UInt32(value), caller: flagsCaller(context))
            return IoctlReply()

        case FileAttrIoctl.getXattr:
            guard outputSize == FileAttrIoctl.FileAttributes.byteCount else { throw StoreError.invalidArgument }
            let xflags = FileAttrIoctl.xflags(of: try volume.inodeFlags(of: node).rawValue)
            return IoctlReply(output: FileAttrIoctl.FileAttributes(xflags: xflags).encoded())

        case FileAttrIoctl.setXattr:
            // Extent size hints and project IDs are not kept: only zero is accepted for them.
            guard let argument = FileAttrIoctl.FileAttributes.decode(input) else { throw StoreError.notSupported }
            guard let flags = FileAttrIoctl.flags(ofXflags: argument.xflags) else { throw StoreError.notSupported }
            // FS_DIRSYNC_FL has no xflag: it stays as it is.
            let kept = try volume.inodeFlags(of: node).intersection(.directorySync).rawValue
            try volume.setInodeFlags(node, flags | kept, caller: flagsCaller(context))
            return IoctlReply()

        case ControlProtocol.setPolicy:
            guard let argument = ControlProtocol.PolicyArgument.decode(input), argument.flags == 0 else {
                throw StoreError.invalidArgument
            }
            try volume.setPolicy(node, argument.identifier, caller: Caller(uid: context.uid, gid: context.gid))
            return IoctlReply()

        case ControlProtocol.getPolicy:
            guard outputSize == ControlProtocol.PolicyArgument.byteCount else { throw StoreError.invalidArgument }
            let (policy, own) = try volume.policy(of: node)
            return IoctlReply(output: ControlProtocol.PolicyArgument(identifier: policy, flags: own ? ControlProtocol.PolicyArgument.ownPolicy : 0).encoded())

        case ControlProtocol.rekeyStart:
            guard let argument = ControlProtocol.PolicyArgument.decode(input),
                  argument.flags & ~ControlProtocol.retirePassphrase == 0 else { throw StoreError.invalidArgument }
            try volume.startRekey(node, to: argument.identifier, caller: Caller(uid: context.uid, gid: context.gid),
                                  retirePassphrase: argument.flags & ControlProtocol.retirePassphrase != 0)
            volume.resumeRekeys()
            Log.notice("rekey to \(argument.identifier) started by uid \(context.uid)")
            return IoctlReply()

        case ControlProtocol.rekeyStatus:
            guard outputSize == ControlProtocol.RekeyStatusArgument.byteCount else { throw StoreError.invalidArgument }
            var reply = ControlProtocol.RekeyStatusArgument()
            if let tree = try volume.rekeyStatus(of: node) {
                let p = tree.progress
                reply.state = p.finished ? .finished : .running
                reply.from = tree.from
                reply.to = tree.to
                (reply.objectsDone, reply.objectsTotal, reply.bytesDone, reply.bytesTotal) = (p.objectsDone, p.objectsTotal, p.bytesDone, p.bytesTotal)
                (reply.objectsLocked, reply.bytesRewritten, reply.elapsedNanoseconds) = (p.objectsLocked, p.bytesRewritten, p.elapsedNanoseconds)
            }
            return IoctlReply(output: reply.encoded())

        case ControlProtocol.getStatus:
            guard outputSize == ControlProtocol.StatusArgument.byteCount else { throw StoreError.invalidArgument }
            return IoctlReply(output: status(context).encoded())

        default:
            throw StoreError.system(ENOTTY)
        }
    }

    /// The daemon's state for `encfsd status`; key states are as the caller sees them (its own
    /// claim shows as added_by_self), as FS_IOC_GET_ENCRYPTION_KEY_STATUS reports them.
    private func status(_ context: RequestContext) -> ControlProtocol.StatusArgument {
        var reply = ControlProtocol.StatusArgument()
        let activity = volume.activity()
        reply.pid = UInt32(getpid())
        reply.formatVersion = UInt32(volume.config.version)
        reply.started = started
        reply.openFiles = UInt64(activity.openFiles)
        reply.openDirectories = UInt64(activity.openDirectories)
        reply.bufferedBytes = UInt64(activity.bufferedBytes)
        reply.journalEntries = UInt64(activity.journalEntries)
        reply.journalBytes = UInt64(activity.journalBytes)
        reply.report(volume.capabilities)
        reply.requests = requestCounts.answered
        reply.forgetRequests = requestCounts.forgets
        let root = volume.config.rootIdentifier
        let others = volume.knownPolicies().union(volume.keys.identifiers()).subtracting([root]).sorted { $0.hex < $1.hex }
        reply.policies = ([root] + others).map { identifier in
            let key = keyService.status(identifier, context: context)
            return .init(identifier: identifier, status: key.status, statusFlags: key.statusFlags, userCount: key.userCount,
                         flags: identifier == root ? ControlProtocol.StatusArgument.rootPolicy : 0)
        }
        return reply
    }

    private func flagsCaller(_ context: RequestContext) -> FlagsCaller {
        FlagsCaller(uid: context.uid, mayChangeImmutable: CallerCapabilities.has(.linuxImmutable, context),
                    ownsEverything: CallerCapabilities.has(.fileOwner, context))
    }

    private static func removalOutcome(_ flags: UInt32) -> String {
        if flags & FscryptIoctl.RemoveKeyArgument.otherUsers != 0 { return "; other users still hold it" }
        if flags & FscryptIoctl.RemoveKeyArgument.filesBusy != 0 { return "; files still open: incompletely removed" }
        return ""
    }
}
