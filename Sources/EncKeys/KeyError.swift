import EncCrypto

/// Failures of the key layer: the key table and the kernel keyring. Mapped to errno by the daemon
/// in one place, with the store's errors.
public enum KeyError: Error, Equatable, Sendable {
    /// No such key, or no claim of this user on it (ENOKEY).
    case noKey
    /// The user holds as many keys as the quota allows (EDQUOT).
    case quotaExceeded
    /// Not a key encfsd can use: the wrong keyring type, or a description it did not write (EKEYREJECTED).
    case rejected
    /// A payload of the wrong size (EINVAL).
    case invalidArgument
    /// A keyutils call failed with this errno.
    case system(Int32)
}
