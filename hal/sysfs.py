"""Small sysfs-style attribute reads, done inline on the event loop.

A sysfs attribute (hwmon ``temp1_input``, IIO ``in_voltage0_raw``, a GPIO value) is
a few bytes served from kernel memory: reading it takes microseconds, far less than a
hop to a worker thread and back (two loop wake-ups, a futex, a context switch), so
the drivers read them directly. Files that can block (a network filesystem, a FIFO)
do not belong here.
"""

from __future__ import annotations

import os

#: Attributes are at most a page; longer content is cut (it is not an attribute).
MAX_ATTR_BYTES = 4096


def read_attr(path: str | os.PathLike[str]) -> str:
    """The attribute's text without surrounding whitespace; :class:`OSError` as ``open`` raises it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, MAX_ATTR_BYTES)
    finally:
        os.close(fd)
    return data.decode("ascii", errors="replace").strip()
