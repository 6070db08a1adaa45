"""Process-wide tuning for the daemon: the allocator, and the limit on open
descriptors (raise_descriptor_limit).

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
import resource

import trio

from .logs import log

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20
# Descriptors a daemon asks for: a receiver keeps up to 128 partial files
# open per transfer (and as many O_DIRECT ones), and where syncfs() is not
# trusted up to about 900 more until flushes check them (SPEC 5: about
# 1,170 per transfer in all): a few transfers at once pass the soft limit
# of 1024 that many systems start services with, under a far higher hard
# limit (systemd's: 524288).
DESCRIPTORS_WANTED = 1 << 16
# Below this many, say so: a few transfers of small files at once, on a
# kernel whose syncfs() is not trusted, may need more than 1,000.
DESCRIPTORS_LOW = 2048


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


_LIBC = _libc()


def apply() -> None:
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        _LIBC.mallopt(M_ARENA_MAX, 1)
    raise_descriptor_limit()


def raise_descriptor_limit() -> None:
    """Raise the soft limit on open descriptors towards DESCRIPTORS_WANTED,
    as far as the hard limit allows; never lower it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = DESCRIPTORS_WANTED if hard == resource.RLIM_INFINITY else min(hard, DESCRIPTORS_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the limit of %d open files to %d: %s", soft, wanted, exc)
    if soft != resource.RLIM_INFINITY and soft < DESCRIPTORS_LOW:
        log.warning(
            "only %d files may be open at once; receiving several transfers of small files together"
            " may fail with 'Too many open files': raise the hard limit (LimitNOFILE= for a systemd service)",
            soft,
        )


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
