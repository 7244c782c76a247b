"""Linux inotify on one directory, as a non-blocking file descriptor (ctypes, no extra package).

The file-backed GPIO lines (:class:`hal.gpio.lines.SimLines`) use it to offer edge
waiting like a real line request does: the simulator replaces a line's ``value``
file atomically (rename into the line's directory), which the kernel reports here,
so the driver waits on a file descriptor instead of polling the file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_DELETE = 0x00000200
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
#: what counts as "the value may have changed": written in place, renamed in, removed
VALUE_CHANGES = IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc


class DirectoryWatch:
    """Readable :attr:`fd` whenever a file in ``directory`` was written, renamed in or removed.

    Raises :class:`OSError` if inotify is unavailable or the directory cannot be
    watched. :meth:`drain` reads every pending event without blocking and returns
    how many bytes were pending (0: nothing happened). :meth:`close` is idempotent.
    """

    def __init__(self, directory: str | os.PathLike[str], mask: int = VALUE_CHANGES) -> None:
        lib = _lib()
        fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        wd = lib.inotify_add_watch(fd, os.fsencode(os.fspath(directory)), mask)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        self.fd: int | None = fd

    def drain(self) -> int:
        total = 0
        while self.fd is not None:
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                break
            if not chunk:
                break
            total += len(chunk)
        return total

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
