import EncCore
import FuseBridge
#if canImport(Glibc)
import Glibc
#endif

/// The one place where store errors become errno values.
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

extension MasterKey.Invalid: ErrnoConvertible {
    public var errnoValue: Int32 { EINVAL }
}
