"""Give the heap's free memory back to the kernel after start-up (glibc ``malloc_trim``).

Start-up builds and throws away a lot of short-lived objects (config validation
schemas, driver construction, the store's migrations). CPython returns its arenas to
the C allocator, but glibc keeps freed heap pages mapped until told otherwise, so
they stay in the process's RSS for its whole life. One ``malloc_trim(0)`` once the
agent is up hands them back. Elsewhere (musl, macOS) it does nothing.

The objects that survive start-up (modules, config, drivers) live as long as the
process: :func:`trim_heap` moves them into the collector's permanent generation
(``gc.freeze``), so the periodic full collections no longer walk them (CPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def trim_heap() -> bool:
    """Collect garbage, freeze the survivors (``gc.freeze``), then ``malloc_trim(0)``.

    True if glibc released memory. Safe to call more than once (each call freezes
    what survived since).
    """
    gc.collect()
    gc.freeze()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
