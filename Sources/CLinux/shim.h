#ifndef ENCFSD_CLINUX_SHIM_H
#define ENCFSD_CLINUX_SHIM_H
// Linux-only calls that Swift's Glibc module does not export. No feature macros here: defining
// _GNU_SOURCE would change libc's struct definitions and clash with other modules.
#include <sys/types.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <sys/ioctl.h>
#include <malloc.h>
#include <fcntl.h>

static const unsigned int encfsd_RENAME_NOREPLACE = 1;
static const unsigned int encfsd_RENAME_EXCHANGE = 2;
static const unsigned int encfsd_RENAME_WHITEOUT = 4;
static const int encfsd_O_TMPFILE = 020000000 | 0200000;
static const int encfsd_O_PATH = 010000000;
static const int encfsd_O_NOATIME = 01000000;

static inline int encfsd_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
                                   unsigned int flags) {
    return (int)syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
}

// openat2(2) (Linux 5.6): resolution confined to the directory, no symlink or magic link
// followed anywhere. The struct is declared here because Debian 12's headers predate it.
struct encfsd_open_how {
    unsigned long long flags;
    unsigned long long mode;
    unsigned long long resolve;
};
static const unsigned long long encfsd_RESOLVE_NO_MAGICLINKS = 0x02;
static const unsigned long long encfsd_RESOLVE_NO_SYMLINKS = 0x04;
static const unsigned long long encfsd_RESOLVE_BENEATH = 0x08;
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
static inline int encfsd_openat2(int dirfd, const char *path, int flags, unsigned int mode,
                                 unsigned long long resolve) {
    struct encfsd_open_how how = { (unsigned long long)(unsigned int)flags, mode, resolve };
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
}

// The kernel's file handle of an object (name_to_handle_at(2)): inode number *and* generation,
// so an inode number freed and reused names a different handle. `name` "" with AT_EMPTY_PATH
// (0x1000) asks about `dirfd` itself; otherwise the entry is not followed if it is a symlink.
#ifndef SYS_name_to_handle_at
#define SYS_name_to_handle_at 303
#endif
static inline int encfsd_file_handle(int dirfd, const char *name, int flags, unsigned char *out,
                                     unsigned int capacity, unsigned int *length, int *type) {
    struct { unsigned int handle_bytes; int handle_type; unsigned char f_handle[128]; } h;
    int mount_id;
    h.handle_bytes = sizeof h.f_handle;
    int rc = (int)syscall(SYS_name_to_handle_at, dirfd, name, &h, &mount_id, flags);
    if (rc < 0) return rc;
    if (h.handle_bytes > capacity) h.handle_bytes = capacity;
    for (unsigned int i = 0; i < h.handle_bytes; i++) out[i] = h.f_handle[i];
    *length = h.handle_bytes;
    *type = h.handle_type;
    return 0;
}
static const int encfsd_RESOLVE_NO_XDEV_FLAG = 0x01;

static inline int encfsd_syncfs(int fd) { return (int)syscall(SYS_syncfs, fd); }

// CPUs this process may run on (its affinity mask: a container's cpuset, taskset), -1 if unknown.
// sched_getaffinity(2) itself needs _GNU_SOURCE; the system call returns the bytes it filled.
static inline int encfsd_usable_cpus(void) {
    unsigned long mask[16] = {0};
    long filled = syscall(SYS_sched_getaffinity, 0, sizeof mask, mask);
    if (filled <= 0) return -1;
    int count = 0;
    for (long i = 0; i < filled / (long)sizeof mask[0]; i++) count += __builtin_popcountl(mask[i]);
    return count;
}

static inline int encfsd_fallocate(int fd, int mode, off_t offset, off_t len) {
    return (int)syscall(SYS_fallocate, fd, mode, offset, len);
}

// setfsuid/setfsgid change only the calling thread's filesystem (and key-permission) identity.
static inline int encfsd_setfsuid(unsigned int uid) { return (int)syscall(SYS_setfsuid, uid); }
static inline int encfsd_setfsgid(unsigned int gid) { return (int)syscall(SYS_setfsgid, gid); }

// glibc gives each thread that allocates its own malloc arena, which keeps freed extent buffers
// cached per thread: with many FUSE worker threads that multiplies resident memory.
static inline int encfsd_limit_malloc_arenas(int arenas) { return mallopt(M_ARENA_MAX, arenas); }
static inline int encfsd_malloc_trim(void) { return malloc_trim(0); }

// An open file description lock (F_OFD_SETLK, 37) on the whole file: held by the description,
// not the process, so it is never dropped by a close of another descriptor of the same file,
// and the kernel releases it when the last descriptor goes, also when the holder is killed.
static inline int encfsd_ofd_lock_whole(int fd, short type) {
    struct flock lock = { .l_type = type, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0, .l_pid = 0 };
    return fcntl(fd, 37, &lock);
}
static const short encfsd_F_WRLCK = F_WRLCK;

static inline int encfsd_ioctl(int fd, unsigned long request, void *argument) {
    return ioctl(fd, request, argument);
}
#endif
