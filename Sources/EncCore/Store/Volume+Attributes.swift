import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

extension Volume {
    public func setattr(_ id: UInt64, _ changes: AttributeChanges) throws -> Attributes {
        let node = try node(id)
        try checkAttributeChange(node, changes)
        if let size = changes.size {
            guard node.type == .regular else { throw node.isDirectory ? StoreError.isDirectory : StoreError.invalidArgument }
            let key = try key(for: node, .contents).key
            let headerKey = changes.dropSetID ? try self.key(for: node, .header).key : nil
            try node.state.withLock { state in
                let file = try contents(node, state, key: key, writable: true)
                try file.resize(to: size)
                try commitTruncate(node, file, &state, droppingSetIDWith: headerKey)
                // A file opened just for this truncate leaves no shadow behind.
                if state.file == nil && file.usedJournal && !state.header.flags.contains(.pendingWrite) {
                    Journal.remove(journalFD: journalFD.descriptor, objectID: state.header.objectID)
                }
            }
        }
        // A change of nothing that drops set-ID bits: the kernel's kill before a fallocate, or
        // chown(f, -1, -1), which on Linux drops them too.
        let onlyDropsSetID = changes.dropSetID && changes.isEmpty && node.type == .regular
        if changes.mode != nil || changes.uid != nil || changes.gid != nil || onlyDropsSetID {
            // A chown's dropped set-ID bits go in the header write the chown makes anyway.
            let dropsSetID = changes.dropSetID && (changes.uid != nil || changes.gid != nil || onlyDropsSetID)
            try mutateHeader(node, key: try key(for: node, .header).key, sync: false) { header in
                if let mode = changes.mode { header.mode = mode & 0o7777 }
                if let uid = changes.uid { header.uid = uid }
                if let gid = changes.gid { header.gid = gid }
                if dropsSetID { header.mode = Self.modeDroppingSetID(header.mode) }
            }
            if let mode = changes.mode { try followModeInAccessACL(node, mode: mode) }
        }
        if node.type == .regular && (changes.size != nil || changes.uid != nil || changes.gid != nil || onlyDropsSetID) {
            try dropCapability(node)
        }
        if changes.isEmpty {
            // chown(path, -1, -1) and the like change nothing but ctime, as on ext4; a no-op
            // chown of the backing object gives it exactly that.
            try withObjectFD(node, .path) { try $0.touchChangeTime() }
        }
        if changes.accessTime != nil || changes.modificationTime != nil {
            func spec(_ change: AttributeChanges.TimeChange?) -> timespec {
                switch change {
                case nil: Sys.omitTime
                case .now: Sys.nowTime
                case .set(let t): timespec(tv_sec: Int(t.seconds), tv_nsec: Int(t.nanoseconds))
                }
            }
            if changes.modificationTime != nil {
                // Writes buffered before the times are set are committed first: committed later,
                // their extents would move the backing mtime past the one set here.
                try node.state.withLock { state in
                    if let file = state.file { try commit(file, &state) }
                    state.file?.forgetModificationTime()
                }
            }
            if changes.accessTime != nil, keepsInodeMetadata {
                // The backing atime takes the time set, exactly (before 1970 too, and "now" as the
                // instant the mtime and ctime get); an atime the header kept from an access gives
                // way to it. Set last, so no header write moves the ctime after it.
                node.state.withLock { $0.accessedAt = nil }
                try mutateHeader(node, key: try key(for: node, .header).key, sync: false) { $0.accessTime = 0 }
            }
            try withObjectFD(node, .path) { try $0.setTimes((spec(changes.accessTime), spec(changes.modificationTime))) }
        }
        return try attributes(node)
    }
}

// MARK: - dropping privileges (FUSE_HANDLE_KILLPRIV_V2)

extension Volume {
    /// The mode once a write, truncate or chown has dropped the set-ID bits, by the kernel's
    /// rule for them (`setattr_should_drop_suidgid`): set-user-ID always; set-group-ID only with
    /// group execute, since without it the bit marks mandatory locking and stays. Whether the
    /// caller's CAP_FSETID keeps them is the kernel's decision, made before it asks.
    static func modeDroppingSetID(_ mode: UInt32) -> UInt32 {
        var dropped = mode & ~UInt32(S_ISUID)
        if mode & UInt32(S_IXGRP) != 0 { dropped &= ~UInt32(S_ISGID) }
        return dropped
    }

    /// Commits a truncate (setattr or O_TRUNC open), dropping the set-ID bits when `headerKey` is
    /// given, with one header write either way: the commit's, when the truncate changed the file,
    /// or a header rewrite of its own when it did not (truncating to the size the file had) and
    /// there are bits to drop. Nothing is added when there are none.
    func commitTruncate(_ node: Node, _ file: ExtentFile, _ state: inout NodeState, droppingSetIDWith headerKey: MasterKey?) throws {
        let dropped = Self.modeDroppingSetID(state.header.mode)
        guard let headerKey, dropped != state.header.mode else {
            try commit(file, &state)
            return
        }
        if file.hasUncommittedChanges {
            state.header.mode = dropped
            try commit(file, &state)
        } else {
            try commit(file, &state)
            try mutateHeaderLocked(node, &state, key: headerKey, sync: false) { $0.mode = dropped }
        }
    }
}
