#ifndef ENCFSD_CFUSE3_SHIM_H
#define ENCFSD_CFUSE3_SHIM_H
// 3.12 is the first API with fuse_loop_cfg_*; everything encfsd calls exists in libfuse 3.12+.
#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/ioctl.h>
#include <linux/fs.h>

// Visible to Swift without _GNU_SOURCE: the open flag that marks a request from a direct-I/O
// descriptor, and lseek's whence values for data and holes.
static const int encfsd_O_DIRECT = 040000;
static const int encfsd_SEEK_DATA = 3;
static const int encfsd_SEEK_HOLE = 4;

// fuse_session_loop_mt is a function or a macro depending on how libfuse was built; this
// inline resolves to whichever the installed header declares.
static inline int encfsd_fuse_session_loop_mt(struct fuse_session *se, struct fuse_loop_config *config) {
    return fuse_session_loop_mt(se, config);
}
#endif
