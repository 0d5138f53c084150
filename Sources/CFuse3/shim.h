#ifndef ENCFSD_CFUSE3_SHIM_H
#define ENCFSD_CFUSE3_SHIM_H
// The 3.12 API level (Debian 12 ships 3.14); everything encfsd calls exists in libfuse 3.12+.
#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

// Visible to Swift without _GNU_SOURCE: the open flag that marks a request from a direct-I/O
// descriptor, and lseek's whence values for data and holes.
static const int encfsd_O_DIRECT = 040000;
static const int encfsd_SEEK_DATA = 3;
static const int encfsd_SEEK_HOLE = 4;

// The kernel's request protocol, as much of it as the daemon's request loop reads and writes
// itself (include/uapi/linux/fuse.h, protocol 7.39). Declared here because libfuse 3.14 keeps
// its copy private and Debian 12's linux/fuse.h predates FUSE_STATX; libfuse answers everything
// else.
struct encfsd_fuse_in_header {
    uint32_t len;
    uint32_t opcode;
    uint64_t unique;
    uint64_t nodeid;
    uint32_t uid;
    uint32_t gid;
    uint32_t pid;
    uint16_t total_extlen;
    uint16_t padding;
};

struct encfsd_fuse_out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

static const uint32_t encfsd_FUSE_FORGET = 2;
static const uint32_t encfsd_FUSE_BATCH_FORGET = 42;
static const uint32_t encfsd_FUSE_STATX = 52;

struct encfsd_fuse_statx_in {
    uint32_t getattr_flags;
    uint32_t reserved;
    uint64_t fh;
    uint32_t sx_flags;
    uint32_t sx_mask;
};

struct encfsd_fuse_sx_time {
    int64_t tv_sec;
    uint32_t tv_nsec;
    int32_t reserved;
};

struct encfsd_fuse_statx {
    uint32_t mask;
    uint32_t blksize;
    uint64_t attributes;
    uint32_t nlink;
    uint32_t uid;
    uint32_t gid;
    uint16_t mode;
    uint16_t spare0;
    uint64_t ino;
    uint64_t size;
    uint64_t blocks;
    uint64_t attributes_mask;
    struct encfsd_fuse_sx_time atime;
    struct encfsd_fuse_sx_time btime;
    struct encfsd_fuse_sx_time ctime;
    struct encfsd_fuse_sx_time mtime;
    uint32_t rdev_major;
    uint32_t rdev_minor;
    uint32_t dev_major;
    uint32_t dev_minor;
    uint64_t spare2[14];
};

// A whole FUSE_STATX reply, header and body in one write (the kernel takes a reply only whole).
struct encfsd_fuse_statx_reply {
    struct encfsd_fuse_out_header header;
    uint64_t attr_valid;
    uint32_t attr_valid_nsec;
    uint32_t flags;
    uint64_t spare[2];
    struct encfsd_fuse_statx stat;
};

_Static_assert(sizeof(struct encfsd_fuse_in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct encfsd_fuse_out_header) == 16, "fuse_out_header");
_Static_assert(sizeof(struct encfsd_fuse_statx_in) == 24, "fuse_statx_in");
_Static_assert(sizeof(struct encfsd_fuse_statx) == 256, "fuse_statx");
_Static_assert(sizeof(struct encfsd_fuse_statx_reply) == 16 + 288, "fuse_statx_out");

// FUSE_HANDLE_KILLPRIV_V2 (protocol 7.33), which libfuse 3.14 neither offers in `fuse_conn_info`
// nor passes on in the requests it decodes: the INIT flag, the request flags that carry the
// kernel's verdict, and the leading fields of the requests they sit in.
static const uint32_t encfsd_FUSE_SETATTR = 4;
static const uint32_t encfsd_FUSE_OPEN = 14;
static const uint32_t encfsd_FUSE_WRITE = 16;
static const uint32_t encfsd_FUSE_INIT = 26;
static const uint32_t encfsd_FUSE_HANDLE_KILLPRIV = 1u << 19;
static const uint32_t encfsd_FUSE_HANDLE_KILLPRIV_V2 = 1u << 28;
static const uint32_t encfsd_FUSE_WRITE_KILL_SUIDGID = 1u << 2;
static const uint32_t encfsd_FATTR_KILL_SUIDGID = 1u << 11;
// What a SETATTR carries besides the attributes it sets: the handle, the lock owner, and (under
// writeback_cache) the ctime the kernel kept.
static const uint32_t encfsd_FATTR_FH = 1u << 6;
static const uint32_t encfsd_FATTR_LOCKOWNER = 1u << 9;
static const uint32_t encfsd_FATTR_CTIME = 1u << 10;
static const uint32_t encfsd_FUSE_OPEN_KILL_SUIDGID = 1u << 0;

// The first four fields of fuse_init_in and of fuse_init_out are the same in every protocol
// version: `flags` is where both sides name what they support.
struct encfsd_fuse_init_prefix {
    uint32_t major;
    uint32_t minor;
    uint32_t max_readahead;
    uint32_t flags;
};

struct encfsd_fuse_write_in {
    uint64_t fh;
    uint64_t offset;
    uint32_t size;
    uint32_t write_flags;
    uint64_t lock_owner;
    uint32_t flags;
    uint32_t padding;
};

struct encfsd_fuse_open_in {
    uint32_t flags;
    uint32_t open_flags;
};

_Static_assert(sizeof(struct encfsd_fuse_init_prefix) == 16, "fuse_init prefix");
_Static_assert(sizeof(struct encfsd_fuse_write_in) == 40, "fuse_write_in");

// statx(2) mask bits (linux/stat.h): the basic stats GETATTR also gives, and the birth time.
static const uint32_t encfsd_STATX_BASIC_STATS = 0x07ff;
static const uint32_t encfsd_STATX_BTIME = 0x0800;

// The signal that wakes a request thread blocked reading /dev/fuse when the loop stops: a
// real-time signal nothing else in the process uses, caught by a handler that does nothing and
// installed without SA_RESTART, so the read returns EINTR. (SIGRTMIN is a function call in glibc,
// which Swift does not import.)
static void encfsd_wake_handler(int sig) { (void)sig; }
static inline int encfsd_install_wake_signal(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = encfsd_wake_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;
    int sig = SIGRTMIN;
    return sigaction(sig, &action, NULL) == 0 ? sig : -1;
}
#endif
