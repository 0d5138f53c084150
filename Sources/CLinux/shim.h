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

static inline int encfsd_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
                                   unsigned int flags) {
    return (int)syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
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
