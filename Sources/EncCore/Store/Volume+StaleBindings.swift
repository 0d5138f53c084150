import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// A name binding an object keeps after a rename or unlink moved it off that name. It holds a
/// reference to the node (a lookup, released once the binding is dealt with): a node dropped
/// meanwhile would have the binding's header write go through a copy of the header that is no
/// longer the inode's only one, under a newer node read from the disk.
struct StaleBinding {
    let node: Node
    let digest: [UInt8]
    /// The name the binding is for: checked in the backing directory before the drop.
    let location: Location
}

/// Dropping a binding must never reach the disk before the namespace change that made it stale:
/// were the header written and the backing rename (or unlink) lost to a power cut, the object
/// would sit at its old name without a binding for it, EIO, lost. A sync of the directories per
/// rename would order them, at a cost every `mv` pays; instead stale bindings wait here, and the
/// daemon's timer drops them about once a second, after one `syncfs` has made every rename
/// before it durable. A leftover binding meanwhile only keeps an old name valid for that object.
extension Volume {
    func bindingWentStale(_ digest: [UInt8], of node: Node, at location: Location) {
        retain(node)
        staleBindings.withLock { $0.append(StaleBinding(node: node, digest: digest, location: location)) }
    }

    /// Makes the namespace durable, then drops the bindings that went stale before it, except
    /// those that are current names again (renamed back meanwhile).
    public func dropStaleBindings() {
        droppingStaleBindings.withLock { _ in dropStaleBindingsSerialized() }
    }

    private func dropStaleBindingsSerialized() {
        let pending = staleBindings.withLock { list -> [StaleBinding] in
            defer { list.removeAll() }
            return list
        }
        guard !pending.isEmpty else { return }
        do {
            try syncFD.syncfs()
        } catch {
            Diagnostics.report("could not make renames durable to drop stale name bindings: \(error)")
            // Not known durable: keep them for the next round.
            staleBindings.withLock { $0.insert(contentsOf: pending, at: 0) }
            return
        }
        var retry: [StaleBinding] = []
        for stale in pending {
            do {
                if try !drop(stale) {
                    retry.append(stale)
                    continue
                }
            } catch StoreError.noKey {
                // Without the key the header cannot be resealed; the binding stays, harmlessly.
            } catch StoreError.notFound {
                // Unlinked since: no header is left to hold the binding.
            } catch {
                Diagnostics.report("could not drop a stale name binding of object \(stale.node.id): \(error)")
            }
            release(stale.node)
        }
        if !retry.isEmpty { staleBindings.withLock { $0.append(contentsOf: retry) } }
    }

    /// Drops one stale binding unless the name leads to the object again. The backing directory
    /// says so, not the node's locations (a cache of at most 8 names). The check and the header
    /// write are one hold of the node's lock, so a rename or link back to the name either finds
    /// the binding gone and writes it again, or is seen entering (`Volume.entering`).
    /// False: not decided this round (an operation is entering by the name).
    private func drop(_ stale: StaleBinding) throws -> Bool {
        let node = stale.node
        let key = try key(for: node, .header).key
        // Found before the node's lock is taken; a directory gone or moved away keeps the
        // binding (an extra one is harmless, a missing one is EIO).
        guard let dirFD = try? directoryFD(stale.location.parent) else { return true }
        return try node.state.withLock { state in
            guard state.bindingsBeingEntered[stale.digest] == nil else { return false }
            do {
                if UInt64(try dirFD.descriptor.fstatAt(stale.location.name).st_ino) == node.backingInode { return true }
            } catch StoreError.system(ENOENT) {
                // The name is gone: the binding is stale.
            } catch {
                return true
            }
            try mutateHeaderLocked(node, &state, key: key, sync: false, unseen: true) { header in
                header.bindings.removeAll { $0.digest == stale.digest }
            }
            return true
        }
    }
}

extension Volume {
    /// At the end of a mount: commits what is still buffered, drops stale bindings, makes every
    /// header write of this epoch durable (syncfs) and only then records the epoch as ended
    /// cleanly. Anything that fails leaves the epoch open, which is read as an unclean end: the
    /// safe side, since only an unclean end lets a damaged header slot be passed over.
    public func closeCleanly() {
        _ = commitIdleFiles(olderThan: .zero)
        dropStaleBindings()
        writePendingAccessTimes()
        let stillDirty = table.withLock { Array($0.byID.values) }.contains { node in
            node.state.withLock { $0.file?.hasUncommittedChanges ?? false }
        }
        guard !stillDirty else {
            Diagnostics.report("unmounted with uncommitted data: epoch \(slots.epoch) stays open (an unclean end)")
            return
        }
        do {
            // Through the descriptor opened before the epoch's first write, so a writeback error
            // from any time in the epoch fails this syncfs and the epoch stays open.
            try droppingStaleBindings.withLock { _ in try syncFD.syncfs() }
            try EpochRecord.close(storeFD: storeFD.descriptor, epoch: slots.epoch, evidence: slots.evidence)
        } catch {
            Diagnostics.report("could not record a clean unmount: \(error); the next mount treats this one as unclean")
        }
    }
}
