import EncCrypto
import EncKeys
import EncFormat
/// Every failure the store reports. The FUSE bridge maps these to errno in one place.
public enum StoreError: Error, Equatable, Sendable {
    case notFound
    case exists
    case notEmpty
    case notDirectory
    case isDirectory
    /// The object's master key is not loaded (ENOKEY).
    case noKey
    /// A link or rename would move an object under a different encryption policy (EXDEV).
    case crossPolicy
    case nameTooLong
    case invalidArgument
    case notPermitted
    case accessDenied
    case tooManyLinks
    case keyRejected
    case quotaExceeded
    case notSupported
    case busy
    /// A write, truncate or fallocate would take a file past its largest size (EFBIG; `SizeLimit`).
    case fileTooLarge
    /// Stored data failed authentication or is structurally impossible: tampering or media
    /// corruption (EIO). The string names what failed, for the log and fsck.
    case integrity(String)
    /// A backing entry the store may not use: `what` it is (a symbolic link, a FIFO, a file with
    /// other hard links...) where a regular file or directory of the store's own must be (EIO).
    /// Planted by whoever can write the store, or damage: reported like an integrity failure.
    case unusableObject(name: String, what: String)
    /// A backing-store system call failed with this errno.
    case system(Int32)
}

extension StoreError: IntegrityFailureDescribing {
    /// What failed, for the log, when this error means the store's contents cannot be trusted.
    public var integrityFailure: String? {
        switch self {
        case .integrity(let why): why
        case .unusableObject(let name, let what): "backing entry \(name) is \(what)"
        default: nil
        }
    }
}
