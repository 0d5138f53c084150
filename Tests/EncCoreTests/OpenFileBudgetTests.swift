import Foundation
import Testing
@testable import EncCore

/// The open-file budget waits for releases the kernel has not delivered yet (RELEASE is sent in
/// the background after close returns), and refuses only a budget that stays full.
@Suite struct OpenFileBudgetTests {
    @Test func aFullBudgetWaitsForARelease() throws {
        let budget = OpenFileBudget(limit: 1)
        try budget.acquire()
        let released = DispatchSemaphore(value: 0)
        DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(50)) {
            budget.release()
            released.signal()
        }
        try budget.acquire(patience: .seconds(5))
        #expect(released.wait(timeout: .now() + 5) == .success)
        let start = ContinuousClock.now
        #expect(throws: StoreError.system(EMFILE)) { try budget.acquire(patience: .milliseconds(50)) }
        #expect(ContinuousClock.now - start >= .milliseconds(50))
        budget.release()
        try budget.acquire(patience: .zero)
    }
}
