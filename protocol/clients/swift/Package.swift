// swift-tools-version:5.5
// Not compiled or tested in this repository (no Swift toolchain on its CI):
// see README.md.
import PackageDescription

let package = Package(
    name: "WsgwClient",
    platforms: [.iOS(.v13), .macOS(.v10_15), .tvOS(.v13), .watchOS(.v6)],
    products: [
        .library(name: "WsgwClient", targets: ["WsgwClient"]),
    ],
    targets: [
        .target(name: "WsgwClient"),
    ]
)
