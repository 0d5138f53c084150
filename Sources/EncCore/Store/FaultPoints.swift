import Locking
import Foundation
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// Named points in the flush and recovery protocols where a test can make the process die, to
/// show that a crash at each step leaves something recovery understands (DESIGN.md lists them).
///
/// Armed from the environment: `ENCFSD_FAULT_POINT=<name>` (die the first time it is reached) or
/// `<name>@<n>` (the n-th time). Disarmed, reaching a point costs one load of an immutable global.
public enum FaultPoint: String, CaseIterable, Sendable {
    // A flush with no in-place overwrite (appends into new extents, holes, metadata only).
    case appendExtentsWritten = "append-extents-written"
    case appendHeaderWritten = "append-header-written"
    // A journaled flush.
    case shadowWritten = "shadow-written"
    case pendingFlagSet = "pending-flag-set"
    case extentsApplied = "extents-applied"
    case finalHeaderWritten = "final-header-written"
    case shadowRemoved = "shadow-removed"
    // Recovery of a journaled flush.
    case recoveryExtentsApplied = "recovery-extents-applied"
    case recoveryHeaderWritten = "recovery-header-written"
    // Namespace operations.
    case createHeaderWritten = "create-header-written"
    case renameBindingAdded = "rename-binding-added"
    case renameDone = "rename-done"
    // A rekey (Volume+Rekey.swift).
    case rekeyHeaderConverted = "rekey-header-converted"
    case rekeyBatchCommitted = "rekey-batch-committed"
    case rekeyNameMoved = "rekey-name-moved"
    // An exchange done as three renames (a backing without RENAME_EXCHANGE; ExchangeRecord).
    case exchangeRecorded = "exchange-recorded"
    case exchangeFirstMoved = "exchange-first-moved"
    case exchangeSecondMoved = "exchange-second-moved"
    // An xattr side object commit (Volume+XattrSide.swift): the new generation durable, then
    // the header naming it.
    case xattrSideObjectWritten = "xattr-side-object-written"
    case xattrSideHeaderCommitted = "xattr-side-header-committed"
}

/// Test hooks exist only in builds made with `ENCFSD_TEST_HOOKS` (debug builds, which the tests
/// run; Package.swift defines it for the debug configuration only): a release binary has no
/// environment switch that kills it or turns its journal off.
public enum FaultPoints {
    #if ENCFSD_TEST_HOOKS
    private struct Armed: Sendable {
        let point: FaultPoint
        let remaining: Int
    }

    private static let armed: Armed? = {
        guard let spec = ProcessInfo.processInfo.environment["ENCFSD_FAULT_POINT"], !spec.isEmpty else { return nil }
        let parts = spec.split(separator: "@")
        guard let point = FaultPoint(rawValue: String(parts[0])) else {
            Diagnostics.report("unknown fault point \(spec); known: \(FaultPoint.allCases.map(\.rawValue))")
            return nil
        }
        return Armed(point: point, remaining: parts.count > 1 ? Int(parts[1]) ?? 1 : 1)
    }()

    private static let hits = Lock(0)

    /// Dies here (SIGKILL: no cleanup, no flush, as a crash) if this point is armed.
    @inline(__always)
    public static func reach(_ point: FaultPoint) {
        guard let armed, armed.point == point else { return }
        if hits.withLock({ $0 += 1; return $0 }) >= armed.remaining {
            Diagnostics.report("fault point \(point.rawValue) reached: dying")
            kill(getpid(), SIGKILL)
        }
    }
    #else
    @inline(__always)
    public static func reach(_ point: FaultPoint) {}
    #endif
}

/// Points inside an operation where a test runs a closure of its own, to make another thread's
/// step happen exactly there (`TestHooks.pause`).
enum TestPause: Hashable, Sendable {
    /// A rename has resolved both names and not yet acted on them.
    case renameResolved
}

enum TestHooks {
    #if ENCFSD_TEST_HOOKS
    /// The closures tests have put at pause points.
    static let pauses = Lock<[TestPause: @Sendable () -> Void]>([:])

    static func pause(_ point: TestPause) {
        if let body = pauses.withLock({ $0[point] }) { body() }
    }

    /// ENCFSD_UNSAFE_NO_JOURNAL=1 writes in place without the journal or its fsyncs, to measure
    /// what crash safety costs. A crash mid-commit can then tear a file.
    static let journalingDisabled = ProcessInfo.processInfo.environment["ENCFSD_UNSAFE_NO_JOURNAL"] == "1"
    #else
    static let journalingDisabled = false

    @inline(__always)
    static func pause(_ point: TestPause) {}
    #endif
}
