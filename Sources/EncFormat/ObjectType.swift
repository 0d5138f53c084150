import EncCrypto
import EncKeys

/// What a backing object represents. Everything but a directory is a backing regular file with a
/// header, so symlink targets of any length and special files need no privileges in the backing
/// directory and carry authenticated metadata like files do.
public enum ObjectType: UInt8, Sendable {
    case regular = 1
    case directory = 2
    case symlink = 3
    case fifo = 4
    case socket = 5
    case characterDevice = 6
    case blockDevice = 7

    /// The S_IFMT bits of `st_mode`.
    public var formatBits: UInt32 {
        switch self {
        case .regular: 0o100000
        case .directory: 0o040000
        case .symlink: 0o120000
        case .fifo: 0o010000
        case .socket: 0o140000
        case .characterDevice: 0o020000
        case .blockDevice: 0o060000
        }
    }

    public init?(formatBits: UInt32) {
        switch formatBits & 0o170000 {
        case 0o100000: self = .regular
        case 0o040000: self = .directory
        case 0o120000: self = .symlink
        case 0o010000: self = .fifo
        case 0o140000: self = .socket
        case 0o020000: self = .characterDevice
        case 0o060000: self = .blockDevice
        default: return nil
        }
    }
}
