import ArgumentParser

struct Encfsd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "encfsd",
        abstract: "A FUSE filesystem of transparently encrypted, authenticated, crash-safe files.",
        subcommands: [InitCommand.self, MountCommand.self, UmountCommand.self, KeyCommand.self, PolicyCommand.self,
                      NonceCommand.self, BenchCommand.self])
}

Encfsd.main()
