/// The one place the version lives: `encfsd --version`, the man page and the Debian package
/// (scripts/package-deb.sh reads it from here) all take it from this constant.
enum EncfsdVersion {
    static let string = "0.3.0"
}
