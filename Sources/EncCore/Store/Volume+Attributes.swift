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
            try node.state.withLock { state in
                let file = try contents(node, state, key: key, writable: true)
                try file.resize(to: size)
                try commit(file, &state)
                // A file opened just for this truncate leaves no shadow behind.
                if state.file == nil && file.usedJournal && !state.header.flags.contains(.pendingWrite) {
                    Journal.remove(journalFD: journalFD.descriptor, objectID: state.header.objectID)
                }
            }
        }
        if changes.mode != nil || changes.uid != nil || changes.gid != nil {
            try mutateHeader(node, key: try key(for: node, .header).key, sync: false) { header in
                if let mode = changes.mode { header.mode = mode & 0o7777 }
                if let uid = changes.uid { header.uid = uid }
                if let gid = changes.gid { header.gid = gid }
            }
            if let mode = changes.mode { try followModeInAccessACL(node, mode: mode) }
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
