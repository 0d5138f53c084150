import EncCore
import FuseBridge
#if canImport(Glibc)
import Glibc
#endif

/// Answers the control ioctls. Every argument is validated before anything changes: a hostile
/// or malformed argument gets EINVAL (or ENOTTY for an unknown command) and changes nothing.
struct ControlHandler: Sendable {
    let volume: Volume

    func handle(node: UInt64, command: UInt32, input: [UInt8], outputSize: Int, context: RequestContext) throws -> IoctlReply {
        switch command {
        case ControlProtocol.addKey:
            return try addKey(input: input, outputSize: outputSize)
        default:
            throw StoreError.system(ENOTTY)
        }
    }

    private func addKey(input: [UInt8], outputSize: Int) throws -> IoctlReply {
        guard outputSize == ControlProtocol.AddKeyArgument.byteCount,
              var argument = ControlProtocol.AddKeyArgument.decode(input) else { throw StoreError.invalidArgument }
        defer { argument.raw.withUnsafeMutableBytes { OpenSSL.cleanse($0) } }
        guard argument.source == .raw else { throw StoreError.notSupported }
        let key = try argument.raw.withUnsafeBytes { try MasterKey(raw: $0) }
        volume.keys.add(key)
        var reply = ControlProtocol.AddKeyArgument(source: argument.source, identifier: key.identifier.bytes)
        reply.keyringSerial = argument.keyringSerial
        return IoctlReply(output: reply.encoded())
    }
}
