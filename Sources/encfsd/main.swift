import ArgumentParser
import Foundation

struct Encfsd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "encfsd",
        abstract: "A FUSE filesystem of transparently encrypted, authenticated, crash-safe files.",
        version: EncfsdVersion.string,
        subcommands: [InitCommand.self, MountCommand.self, UmountCommand.self, KeyCommand.self, PolicyCommand.self, RekeyCommand.self, UpgradeCommand.self,
                      NonceCommand.self, StatusCommand.self, InfoCommand.self, FsckCommand.self, BenchCommand.self])
}

// Started by mount(8) (as mount.fuse.encfsd, or by mount.fuse3 as `encfsd STORE DIR -o ...`)?
let subcommandNames = Set(Encfsd.configuration.subcommands.map { $0.configuration.commandName ?? "" } + ["help"])
if MountHelper.isInvocation(CommandLine.arguments, subcommands: subcommandNames) { MountHelper.run(CommandLine.arguments) }

// fsck(8) reports usage errors with status 16; everything else uses ArgumentParser's codes.
do {
    var command = try Encfsd.parseAsRoot()
    try command.run()
} catch {
    if CommandLine.arguments.dropFirst().first == "fsck", Encfsd.exitCode(for: error) == .validationFailure {
        FileHandle.standardError.write(Data((Encfsd.fullMessage(for: error) + "\n").utf8))
        exit(16)
    }
    Encfsd.exit(withError: error)
}
