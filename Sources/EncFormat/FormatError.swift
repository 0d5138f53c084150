import EncCrypto
import EncKeys

/// Failures of the codecs: bytes that do not decode or authenticate, names that cannot be encoded.
public enum FormatError: Error, Equatable, Sendable {
    /// Stored bytes failed authentication or are structurally impossible (EIO). The string names
    /// what failed, for the log and fsck.
    case integrity(String)
    /// A name the format cannot hold: empty, `.`/`..`, or containing `/` or NUL (EINVAL).
    case invalidName
    case nameTooLong
}

/// An error that may mean stored data cannot be trusted; the daemon logs those by what failed.
public protocol IntegrityFailureDescribing: Error {
    /// What failed, when the error is an integrity failure; nil otherwise.
    var integrityFailure: String? { get }
}

extension FormatError: IntegrityFailureDescribing {
    public var integrityFailure: String? {
        if case .integrity(let why) = self { return why }
        return nil
    }
}
