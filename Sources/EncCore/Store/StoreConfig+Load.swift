import EncFormat
import Foundation
import EncCrypto
import EncKeys
#if canImport(Glibc)
import Glibc
#endif

/// Reading `encfsd.conf` is store I/O: it goes through the store boundary (never a link, never a
/// FIFO); decoding it is the format layer's.
extension StoreConfig {
    public static func load(storePath: String) throws(Problem) -> StoreConfig {
        let root: FileDescriptor
        do {
            root = try Sys.openStoreRoot(storePath)
        } catch {
            throw .missing(storePath)
        }
        return try load(storeFD: root, shownAs: storePath)
    }

    /// Reads the configuration through the store boundary (never a link, never a FIFO).
    public static func load(storeFD: borrowing FileDescriptor, shownAs storePath: String = "store") throws(Problem) -> StoreConfig {
        let data: Data
        do {
            data = Data(try storeFD.readEntry(Array(fileName.utf8), limit: maximumBytes))
        } catch StoreError.system(ENOENT) {
            throw .missing(storePath)
        } catch {
            throw .unreadable("\(fileName): \(error)")
        }
        return try decode(data)
    }
}
