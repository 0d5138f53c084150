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
    /// Rounds in which that check could not be made (its directory not found, say).
    var unchecked = 0
    /// Rounds after which a binding that cannot be checked is kept for good (harmless).
    static let checkAttempts = 10
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
    /// those whose names lead to their objects again (renamed or linked back meanwhile).
    /// - Parameter changingNow: a node whose own operation asks, before it has changed a name.
    public func dropStaleBindings() { dropStaleBindings(changingNow: nil) }

    func dropStaleBindings(changingNow: Node?) {
        droppingStaleBindings.withLock { _ in dropStaleBindingsSerialized(changingNow: changingNow) }
    }

    private func dropStaleBindingsSerialized(changingNow: Node?) {
        let pending = staleBindings.withLock { list -> [StaleBinding] in
            defer { list.removeAll() }
            return list
        }
        guard !pending.isEmpty else { return }
        // Taken before the syncfs: a name change that ends after this may have missed it.
        let changed = pending.map { stale in stale.node.state.withLock { $0.namesChanged } }
        do {
            try syncFD.syncfs()
        } catch {
            Diagnostics.report("could not make renames durable to drop stale name bindings: \(error)")
            // Not known durable: keep them for the next round.
            staleBindings.withLock { $0.insert(contentsOf: pending, at: 0) }
            return
        }
        var retry: [StaleBinding] = []
        for (stale, seen) in zip(pending, changed) {
            do {
                switch try drop(stale, namesChangedBefore: seen, changingNow: changingNow) {
                case .decided: break
                case .later:
                    retry.append(stale)
                    continue
                case .unchecked where stale.unchecked + 1 < StaleBinding.checkAttempts:
                    var again = stale
                    again.unchecked += 1
                    retry.append(again)
                    continue
                case .unchecked: break
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

    private enum DropOutcome {
        /// Dropped, or kept because its name leads to the object.
        case decided
        /// A change of the object's names ran during this round: next round.
        case later
        /// The name could not be checked: kept for now, tried again a few rounds.
        case unchecked
    }

    /// Drops one stale binding unless its name leads to the object again. The backing directory
    /// says so, not the node's locations (a cache of at most 8 names). Nothing that changes the
    /// object's names may run or have ended since `namesChangedBefore` was read, before the
    /// round's syncfs: a rename off the name after it is not durable yet, and a drop reaching
    /// the disk first would, after a power cut, leave the object at the name unbound (EIO). The
    /// check and the header write are one hold of the node's lock, which `changingNames` takes.
    private func drop(_ stale: StaleBinding, namesChangedBefore seen: UInt64, changingNow: Node?) throws -> DropOutcome {
        let node = stale.node
        let key = try key(for: node, .header).key
        // Found before the node's lock is taken.
        guard let dirFD = try? directoryFD(stale.location.parent) else { return .unchecked }
        return try node.state.withLock { state in
            let others = state.namesChanging - (node === changingNow ? 1 : 0)
            guard others == 0, state.namesChanged == seen else { return .later }
            do {
                if UInt64(try dirFD.descriptor.fstatAt(stale.location.name).st_ino) == node.backingInode { return .decided }
            } catch StoreError.system(ENOENT) {
                // The name is gone: the binding is stale.
            } catch {
                return .unchecked
            }
            try mutateHeaderLocked(node, &state, key: key, sync: false, unseen: true) { header in
                header.bindings.removeAll { $0.digest == stale.digest }
            }
            return .decided
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
