#ifndef WALSHIP_CLINUX_SHIM_H
#define WALSHIP_CLINUX_SHIM_H
/* Linux calls the Glibc module does not import: the filesystem type of an open file, zeroing
   a range of one while keeping its blocks allocated, and an anonymous file in memory. All
   return -1 and set errno when they fail. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <sys/vfs.h>
#include <sys/mman.h>

static inline long walship_filesystem_type(int fd) {
    struct statfs s;
    return fstatfs(fd, &s) == 0 ? (long)s.f_type : -1;
}

static inline int walship_zero_range(int fd, long long offset, long long length) {
    return fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

/* A file with no name, in memory (memfd), closed on exec; it is gone when closed. */
static inline int walship_anonymous_file(const char *label) {
    return memfd_create(label, MFD_CLOEXEC);
}
#endif
