#ifndef WALSHIP_CLINUX_SHIM_H
#define WALSHIP_CLINUX_SHIM_H
/* Linux calls the Glibc module does not import: the filesystem type of an open file, zeroing
   a range of one while keeping its blocks allocated, an anonymous file in memory, and pipe2. All
   return -1 and set errno when they fail. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <sys/vfs.h>
#include <sys/mman.h>
#include <unistd.h>

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
/* A pipe whose ends are non-blocking and closed on exec from the start (no window in which
   another thread's exec inherits them). */
static inline int walship_pipe_nonblocking(int fds[2]) {
    return pipe2(fds, O_CLOEXEC | O_NONBLOCK);
}
#endif
