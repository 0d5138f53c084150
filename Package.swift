// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "encfsd",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "encfsd", targets: ["encfsd"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // One door per C library: each system-library target is imported by exactly one file.
        .systemLibrary(name: "CFuse3", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        .systemLibrary(name: "COpenSSL", pkgConfig: "libcrypto", providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CKeyutils", pkgConfig: "libkeyutils", providers: [.apt(["libkeyutils-dev"])]),
        .systemLibrary(name: "CLinux"),
        // The core in layers, each a target, so a lower layer cannot import a higher one:
        // crypto (the OpenSSL door) <- keys (master keys, the key table, the keyutils door)
        // <- format (codecs of every on-disk and ioctl structure; no I/O) <- store (EncCore).
        // Locking is below them all: the one lock type shared state uses (Lock.swift says why).
        .target(name: "Locking", dependencies: ["CLinux"]),
        .target(name: "EncCrypto", dependencies: ["COpenSSL", "Locking"]),
        .target(name: "EncKeys", dependencies: ["EncCrypto", "Locking", "CKeyutils", "CLinux"],
                swiftSettings: [.define("ENCFSD_TEST_HOOKS", .when(configuration: .debug))]),
        .target(name: "EncFormat", dependencies: ["EncCrypto", "EncKeys"]),
        // Test hooks (fault points, the no-journal switch) compile into debug builds only.
        .target(name: "EncCore", dependencies: ["EncCrypto", "EncKeys", "EncFormat", "Locking", "CLinux"],
                swiftSettings: [.define("ENCFSD_TEST_HOOKS", .when(configuration: .debug))]),
        .target(name: "FuseBridge", dependencies: ["CFuse3", "Locking"]),
        .executableTarget(
            name: "encfsd",
            dependencies: [
                "EncCore", "EncFormat", "EncKeys", "EncCrypto", "FuseBridge", "Locking",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        .testTarget(name: "EncCoreTests", dependencies: ["EncCore", "EncFormat", "EncKeys", "EncCrypto", "Locking"]),
    ],
    swiftLanguageModes: [.v6]
)
