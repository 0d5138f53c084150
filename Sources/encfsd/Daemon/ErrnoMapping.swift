import EncCore
import FuseBridge
import EncCrypto
import EncKeys
import EncFormat
#if canImport(Glibc)
import Glibc
#endif

/// The one place where errors of the core's layers (store, keys, format) become errno values.
extension EncryptedFileSystem {
    /// Concrete casts before the protocol's: the store's errors are nearly all there are, and
    /// a cast to an existential protocol costs a conformance lookup per failed request.
    func errnoValue(of error: any Error) -> Int32 {
        if let e = error as? StoreError { return e.errnoValue }
        if let e = error as? FormatError { return e.errnoValue }
        if let e = error as? KeyError { return e.errnoValue }
        return (error as? any ErrnoConvertible)?.errnoValue ?? EIO
    }

    /// What an integrity failure says, for the log; nil for every other error. Concrete casts
    /// first, for the reason above.
    static func integrityFailure(of error: any Error) -> String? {
        if let e = error as? StoreError { return e.integrityFailure }
        if let e = error as? FormatError { return e.integrityFailure }
        return (error as? any IntegrityFailureDescribing)?.integrityFailure
    }
}

extension StoreError: ErrnoConvertible {
    public var errnoValue: Int32 {
        switch self {
        case .notFound: ENOENT
        case .exists: EEXIST
        case .notEmpty: ENOTEMPTY
        case .notDirectory: ENOTDIR
        case .isDirectory: EISDIR
        case .noKey: ENOKEY
        case .crossPolicy: EXDEV
        case .nameTooLong: ENAMETOOLONG
        case .invalidArgument: EINVAL
        case .notPermitted: EPERM
        case .accessDenied: EACCES
        case .tooManyLinks: EMLINK
        case .keyRejected: EKEYREJECTED
        case .quotaExceeded: EDQUOT
        case .notSupported: EOPNOTSUPP
        case .busy: EBUSY
        case .fileTooLarge: EFBIG
        case .integrity, .unusableObject: EIO
        case .system(let code): code
        }
    }
}

extension KeyError: ErrnoConvertible {
    public var errnoValue: Int32 {
        switch self {
        case .noKey: ENOKEY
        case .quotaExceeded: EDQUOT
        case .rejected: EKEYREJECTED
        case .invalidArgument: EINVAL
        case .system(let code): code
        }
    }
}

extension FormatError: ErrnoConvertible {
    public var errnoValue: Int32 {
        switch self {
        case .integrity: EIO
        case .invalidName: EINVAL
        case .nameTooLong: ENAMETOOLONG
        }
    }
}

extension MasterKey.Invalid: ErrnoConvertible {
    public var errnoValue: Int32 { EINVAL }
}
