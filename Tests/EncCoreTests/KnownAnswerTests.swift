import Testing
@testable import EncCore

@Suite struct KnownAnswerTests {
    @Test func fscryptIdentifierOfTestKey() throws {
        let raw = (1...64).map { UInt8($0) }
        let key = try MasterKey(raw: raw)
        #expect(key.identifier.hex == "69b2f6edeee720cce0577937eb8a6751")
    }

    @Test func fscryptIdentifierOfSecondKey() throws {
        let raw = Array(String(repeating: "a", count: 32).utf8) + Array(String(repeating: "1", count: 32).utf8)
        #expect(try MasterKey(raw: raw).identifier.hex == "912ae510a458723a839a9fad701538ac")
    }
}
