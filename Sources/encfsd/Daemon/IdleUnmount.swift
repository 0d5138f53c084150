import EncCore
import Foundation
import FuseBridge
import EncCrypto
import EncKeys
import EncFormat

/// `--idle`: unmounts once the mount has gone `limit` with no open file or directory and no
/// request. The unmount is the ordinary one (`fusermount3 -u`, as `encfsd umount` does), so the
/// daemon then ends exactly as after an external unmount: every open file already committed,
/// the session loop returning. If the mount is busy (a shell's working directory inside it), the
/// attempt fails harmlessly and the quiet period starts again. Every request counts, `encfsd
/// status` (an ioctl) included: something polling the mount keeps it mounted, as a user would.
enum IdleUnmount {
    static func start(after limit: Duration, session: FuseSession, volume: Volume, mountpoint: String) {
        // Checked a few times per period, at most once a second: the unmount comes at most a
        // quarter period late, and an idle daemon wakes rarely.
        let tick = min(1.0, Double(limit.components.seconds) / 4 + Double(limit.components.attoseconds) / 4e18)
        Thread.detachNewThread {
            var seen = session.requestCount
            var quietSince = ContinuousClock.now
            while true {
                Thread.sleep(forTimeInterval: tick)
                let count = session.requestCount, activity = volume.activity()
                if count != seen || activity.openFiles > 0 || activity.openDirectories > 0 {
                    seen = count
                    quietSince = .now
                    continue
                }
                guard ContinuousClock.now - quietSince >= limit else { continue }
                Log.notice("idle for \(limit): unmounting \(mountpoint)")
                if unmount(mountpoint) { return }
                Log.info("idle unmount of \(mountpoint) failed (busy?); trying again after another idle period")
                seen = session.requestCount
                quietSince = .now
            }
        }
    }

    private static func unmount(_ mountpoint: String) -> Bool {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/fusermount3")
        process.arguments = ["-u", mountpoint]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return false }
        process.waitUntilExit()
        return process.terminationStatus == 0
    }
}
