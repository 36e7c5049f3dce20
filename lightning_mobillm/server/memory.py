"""Keep a long-running server's memory near what it holds.

Torch's CPU tensors come from glibc's ``malloc``. A gRPC server runs frames on several worker threads, and
glibc gives threads arenas of their own, each of which keeps the memory of the large tensors freed in it
(decoded activations, autograd buffers) for its next allocation. With eight workers taking turns at one
compute place, the memory of eight steps stays resident although only one step runs at a time. Measured
here (eight sessions, real-size int8 frames of 1024 tokens x 30 taps x 576, three steps each, one step at a
time): 4.3 GB peak as glibc comes, 1.8 GB with two arenas and a trim after every step, ~14 s either way;
smaller mmap thresholds saved a little more but made steps ~1.7x slower (page faults on every large
tensor). So a server process caps its arenas at start (:func:`limit_arenas`) and returns free memory after
each step (:func:`release_free_memory`). On other C libraries both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # mallopt parameter numbers of glibc's malloc.h


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # only glibc has it


def limit_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for this process (call before the worker threads start allocating)."""
    libc = _glibc()
    ok = bool(libc is not None and libc.mallopt(_M_ARENA_MAX, int(arenas)))
    if not ok:
        log.info("malloc arenas not limited (not glibc)")
    return ok


def release_free_memory() -> None:
    """Give memory that ``free`` has kept back to the operating system (glibc's ``malloc_trim``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
