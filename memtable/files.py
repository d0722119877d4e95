"""Reading the small files memtable and policyd read whole (.cf files,
texthash tables, domain pattern files, whitelists).

One place that refuses what is not a regular file before reading from it:
a FIFO or a device would block open() or read() without bound, where the
caller wants a clear error.  Each caller names its own size bound.
"""

from __future__ import annotations

import errno
import os
import stat


def read_regular_file(path: str, limit: int) -> tuple[bytes, os.stat_result]:
    """At most ``limit + 1`` bytes of ``path`` (the caller tells "too large"
    by the length) and its stat.  OSError when it cannot be read or is not
    a regular file (strerror says which)."""
    # O_NONBLOCK: opening a FIFO for reading would wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)
