"""Process-wide allocator tuning for the daemon.

Chunks are 64 KiB to 4 MiB (2 MiB by default); glibc serves allocations above its mmap threshold
(128 KiB by default) with a fresh mmap and returns them with munmap, so each
chunk buffer page-faults all over again. Raising the thresholds keeps those
buffers in the heap and reused: pynacl's AEGIS-256 on 1 MiB went from 572
to 4,418 MiB/s on this kind of machine.

The price is that freed chunk buffers stay in the heap after a transfer,
where Python's own small objects (which come from separate arenas) cannot
use them; `release_free_memory` hands them back once a transfer's data has
passed, and again when a peer's connection ends: the ledger record of a
large folder is megabytes that would otherwise stay resident while the node
idles (10,000 files: 57 MiB idle afterwards instead of 46, and each further
transfer of such a folder peaked higher than the last, 60 -> 63.7 MiB over
eight).

All threads share one malloc arena. glibc gives worker threads arenas of
their own (up to 8 per core), and what a transfer freed in one stays
resident there while the next transfer's thread allocates in another: five
10,000-file transfers in a row crept from 64 to 71 MiB peak RSS at the
receiver; with one arena they stayed at 65, at the same speed (1 GiB,
five alternating runs: 312 against 296 MiB/s median, within the noise).
"""

import ctypes
import ctypes.util

import trio

from .logs import log

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


_LIBC = _libc()


def apply() -> None:
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        _LIBC.mallopt(M_ARENA_MAX, 1)


def release_free_memory() -> None:
    """Return free heap pages to the system (blocking: a few ms)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


async def release_free_memory_at_end() -> None:
    """release_free_memory when a peer's connection ends, off the event loop
    and best effort: it must never turn an ending into an error."""
    try:
        await trio.to_thread.run_sync(release_free_memory)
    except Exception as exc:  # no worker thread could be started, say
        log.warning("could not return free memory to the system: %s", exc)
