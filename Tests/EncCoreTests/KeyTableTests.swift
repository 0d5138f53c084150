import Foundation
import Testing
@testable import EncCore
@testable import EncCrypto
@testable import EncKeys
@testable import EncFormat

@Suite struct KeyTableTests {
    static func key(_ byte: UInt8) -> MasterKey { try! MasterKey(raw: [UInt8](repeating: byte, count: 32)) }

    @Test func claimsAndStatus() throws {
        let table = KeyTable(userQuota: 2)
        // Only by identifier: a reference kept here would count as an open file holding the key.
        let id = try table.add(Self.key(1), claim: .init(uid: 1000, serial: 0))
        try table.add(Self.key(1), claim: .init(uid: 1001, serial: 0))
        #expect(table.status(of: id, uid: 1000) == .present(userCount: 2, addedBySelf: true))
        #expect(table.status(of: id, uid: 0) == .present(userCount: 2, addedBySelf: false))
        #expect(throws: KeyError.noKey) { try table.remove(id, uid: 0, allUsers: false) }
        #expect(try table.remove(id, uid: 1000, allUsers: false) == .otherUsersRemain)
        #expect(try table.remove(id, uid: 1001, allUsers: false) == .removed)
        #expect(table.status(of: id, uid: 1001) == .absent)
    }

    @Test func quotaForNonRoot() throws {
        let table = KeyTable(userQuota: 2)
        try table.add(Self.key(1), claim: .init(uid: 1000, serial: 0))
        try table.add(Self.key(2), claim: .init(uid: 1000, serial: 0))
        #expect(throws: KeyError.quotaExceeded) { try table.add(Self.key(3), claim: .init(uid: 1000, serial: 0)) }
        try table.add(Self.key(3), claim: .init(uid: 0, serial: 0)) // root is not counted
    }

    @Test func softRemovalWipesWhenLastHolderLetsGo() throws {
        let wiped = WipeLog()
        let table = KeyTable { id in wiped.append(id) }
        var held: MasterKey? = Self.key(7)
        let id = held!.identifier
        try table.add(held!, claim: .init(uid: 0, serial: 0))
        #expect(try table.remove(id, uid: 0, allUsers: false) == .filesBusy)
        #expect(table.status(of: id, uid: 0) == .incompletelyRemoved)
        #expect(table.key(for: id) == nil && table.key(for: id, allowLingering: true) != nil)
        held = nil
        #expect(wiped.count == 1)
        // The last close completes the removal; removing again (as xfstests 580 does) still succeeds.
        #expect(table.status(of: id, uid: 0) == .absent)
        #expect(try table.remove(id, uid: 0, allUsers: false) == .removed)
        #expect(table.status(of: id, uid: 0) == .absent)
    }

    @Test func revocationsSkipEntriesStillClaimed() throws {
        let table = KeyTable()
        let id = try table.add(Self.key(3), claim: .init(uid: 0, serial: 41, revokeWhenWiped: true))
        try table.add(Self.key(4), claim: .init(uid: 0, serial: 42, revokeWhenWiped: true))
        #expect(try table.remove(id, uid: 0, allUsers: false) == .removed)
        #expect(table.takeRevocations(id).map(\.serial) == [41])
        #expect(table.takeRevocations(id).isEmpty) // handed out once
    }
}

final class WipeLog: @unchecked Sendable {
    private let lock = NSLock()
    private var ids: [KeyIdentifier] = []
    func append(_ id: KeyIdentifier) { lock.lock(); ids.append(id); lock.unlock() }
    var count: Int { lock.lock(); defer { lock.unlock() }; return ids.count }
}

