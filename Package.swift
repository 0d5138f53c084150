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
        // Test hooks (fault points, the no-journal switch) compile into debug builds only.
        .target(name: "EncCore", dependencies: ["COpenSSL", "CKeyutils", "CLinux"],
                swiftSettings: [.define("ENCFSD_TEST_HOOKS", .when(configuration: .debug))]),
        .target(name: "FuseBridge", dependencies: ["CFuse3"]),
        .executableTarget(
            name: "encfsd",
            dependencies: [
                "EncCore", "FuseBridge",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        .testTarget(name: "EncCoreTests", dependencies: ["EncCore"]),
    ],
    swiftLanguageModes: [.v6]
)
