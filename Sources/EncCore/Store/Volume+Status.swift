import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// What `encfsd status` reports of a live volume, and the plaintext path of a node for the
/// daemon's log. Read-only: each figure is a snapshot taken under the lock that guards it, one
/// lock at a time (table, then each node, as `commitIdleFiles` does), never across I/O.
extension Volume {
    public struct Activity: Equatable, Sendable {
        /// Open file handles (descriptors the kernel holds open on regular files).
        public var openFiles = 0
        /// Open directory handles (listings in progress).
        public var openDirectories = 0
        /// Plaintext bytes written but not yet committed (whole extents buffered).
        public var bufferedBytes = 0
        /// Shadows in `.journal`: transactions in progress, or kept by open files that used one.
        public var journalEntries = 0
        public var journalBytes = 0
    }

    public func activity() -> Activity {
        var result = Activity()
        handles.withLock { table in
            for handle in table.byID.values {
                switch handle {
                case .file: result.openFiles += 1
                case .directory: result.openDirectories += 1
                }
            }
        }
        for node in table.withLock({ Array($0.byID.values) }) {
            result.bufferedBytes += node.state.withLock { $0.file?.bufferedBytes ?? 0 }
        }
        for entry in (try? journalFD.descriptor.listDirectory()) ?? [] where !entry.isDirectory {
            guard let st = try? journalFD.descriptor.fstatAt(entry.name), st.st_mode & S_IFMT == S_IFREG else { continue }
            result.journalEntries += 1
            result.journalBytes += Int(st.st_size)
        }
        return result
    }

    /// Every policy the daemon knows: the root's and those of the directories and files the kernel
    /// has looked up (a policy of an unvisited directory is unknown until it is visited).
    public func knownPolicies() -> Set<KeyIdentifier> {
        var policies: Set<KeyIdentifier> = [config.rootIdentifier]
        for node in table.withLock({ Array($0.byID.values) }) {
            policies.insert(node.state.withLock { $0.header.policy })
        }
        return policies
    }

    /// The node's plaintext path from the mount's root, through the names the kernel looked it up
    /// by; nil when it is not known (a node reached only through a locked, no-key view is shown by
    /// its encoded name, which is still what a user sees in the mount).
    public func plaintextPath(of id: UInt64) -> String? {
        if id == Self.rootID { return "/" }
        var components: [String] = []
        var current = id
        // A bound on the walk: a stale dentry can never make it loop forever.
        for _ in 0..<4096 {
            if current == Self.rootID { return "/" + components.reversed().joined(separator: "/") }
            guard let node = table.withLock({ $0.byID[current] }),
                  let dentry = node.state.withLock({ $0.dentries.first }) else { return nil }
            components.append(String(decoding: dentry.name, as: UTF8.self))
            current = dentry.parent
        }
        return nil
    }
}
