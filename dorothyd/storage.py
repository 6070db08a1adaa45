"""Where incoming chunks live until a transfer is complete, and how the
complete set is moved into the inbox.

Partial data sits in HOME/partial/<transfer id>/files/, each file under
its relative path from the manifest (validated and checked for collisions
before anything is written). At completion that tree is renamed into
HOME/inbox/<peer>/<transfer id> in one step, so a transfer is either absent
from the inbox or complete, and publishing 10,000 files is one rename, not
10,000. Directories are walked with O_NOFOLLOW handles, so no symlink can
redirect a write.
"""

import ctypes
import ctypes.util
import enum
import errno
import hashlib
import mmap
import os
import re
import shutil
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol import aegis
from .hashing import FileHasher

# At most this many partial files, and directories of them, stay open; the
# rest are reopened on demand.
MAX_OPEN_FILES = 128
MAX_OPEN_DIRS = 16
# The folder under HOME/partial/<id> that becomes HOME/inbox/<peer>/<id>.
TREE = "files"
# Past this many dirty files, one syncfs() is cheaper than an fsync each (a
# folder of 10,000 small files would otherwise pay 10,000 fsyncs); so it is
# past this many directories at publication.
SYNCFS_THRESHOLD = 8
# Where syncfs() is not trusted, each dirty file's descriptor stays open
# past its eviction until a flush has fdatasync'd it (see flusher); once
# this many wait, the receiver flushes after the batch being written, whose
# chunks it bounds too (receiving.MAX_QUEUED_CHUNKS).
MAX_HELD_FOR_CHECK = 256
# Whole chunks are written with O_DIRECT where the filesystem allows it. On
# this kind of machine buffered writes of a large file are throttled by
# dirty-page writeback (1 GiB of sequential pwrite: 212 MiB/s) while direct
# writes reach the disk's speed (dd oflag=direct: 962 MB/s), and the data
# has to reach the disk before the receipt anyway. O_DIRECT needs offsets,
# lengths and the buffer aligned to the logical block size; 4096 covers
# every common device.
DIRECT_ALIGN = 4096
# Smaller files are written through the page cache: their few writes gain
# nothing from O_DIRECT, and a second descriptor per file costs an open()
# each in a folder of 10,000.
DIRECT_MIN_FILE = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class Syncfs(enum.Enum):
    """What syncfs() does with a writeback error it meets."""

    REPORTS = "fails with it"  # Linux 5.8 and later (errseq per superblock)
    # Returns 0, and leaves it for an fsync of the file, through a
    # descriptor open when it happened, to report (4.13 to 5.7: errseq per file).
    LEAVES = "leaves it to each file's fsync"
    # Returns 0, and may clear it before any fsync sees it (older kernels,
    # or a system not known to be Linux).
    MAY_CLEAR = "may clear it"


def syncfs_behaviour(system: str, release: str) -> Syncfs:
    """Only where syncfs() fails with a writeback error is it trusted to
    make many files durable at once; elsewhere a file lost to a disk error
    would go into a signed receipt as durable, so each file and directory
    is fsync'd as well (after the syncfs, where that leaves errors for the
    fsync to see): a folder of small files is slower. (Before 4.13 a
    file's error is one flag that another process's sync may clear first,
    so a lost write can still go unnoticed there. A journal commit that
    fails within syncfs() is reported only since 5.17, but it also aborts
    the journal, which fails the state db commit that must follow before
    any chunk counts as held.)"""
    version = re.match(r"(\d+)\.(\d+)", release, re.ASCII)
    if system != "Linux" or version is None:
        return Syncfs.MAY_CLEAR
    release_number = (int(version[1]), int(version[2]))
    if release_number >= (5, 8):
        return Syncfs.REPORTS
    return Syncfs.LEAVES if release_number >= (4, 13) else Syncfs.MAY_CLEAR


SYNCFS = syncfs_behaviour(os.uname().sysname, os.uname().release)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _sync_filesystem_of(path: Path) -> None:
    fd = _open_dir(path)
    try:
        _syncfs(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The check stored per held chunk: an AEGIS-256 MAC under a fixed, public
# key and nonce, cut to CHECK_LEN bytes. It is no defence against tampering
# (the end-to-end SHA-256 is); like a CRC, it finds accidental damage to
# partial data at chunk granularity, but at AES-NI speed: 0.11 ms per MiB
# against 0.33 for zlib's CRC-32 (bench/micro.py), in the receiver's
# busiest thread.
CHECK_KEY = bytes(aegis.KEY_LEN)
CHECK_NONCE = b"dorothy held-chunk check".ljust(aegis.NONCE_LEN, b"\x00")
CHECK_LEN = 16


def chunk_check(data) -> bytes:
    return aegis.mac(data, CHECK_NONCE, CHECK_KEY)[:CHECK_LEN]


@dataclass
class FileHashes:
    """The SHA-256 of an incoming transfer's files as far as received: a
    running hash of each file's contiguous prefix, replaced by the digest
    once the file is complete (10,000 running hashes would hold 5 MiB)."""

    running: dict[int, FileHasher] = field(default_factory=dict)
    complete: dict[int, bytes] = field(default_factory=dict)
    stamp: bytes | None = None  # settled_partial_stamp of the files these hashes describe


# A change shows in the stamp only if it gives a file a time other than
# the one recorded. File times come from a clock that may tick only every
# few milliseconds (kernels before 6.13), so a stamp is taken once that
# clock has moved past the newest time in it; on file systems that keep
# whole seconds (ext3, FAT) no stamp is taken at all.
STAMP_SETTLE_NS = 20_000_000


def _scan(directory: Path) -> tuple[bytes, int, bool]:
    """(digest of the partial files' identities, sizes and times, the
    newest time, whether every time is a whole second)."""
    digest, newest, whole_seconds = hashlib.blake2b(digest_size=32), 0, True

    def add(name: str, st: os.stat_result) -> None:
        nonlocal newest, whole_seconds
        digest.update(repr((name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)).encode())
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
        whole_seconds = whole_seconds and st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0

    def walk(fd: int, name: str) -> None:
        """The directory `name`, open as `fd` (closed here). Descriptor-relative:
        below HOME, a legal manifest path can be longer than PATH_MAX."""
        try:
            add(name, os.fstat(fd))
            subdirectories = []
            with os.scandir(fd) as entries:  # an unchanged directory lists in the same order
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        subdirectories.append(entry.name)
                    else:
                        add(f"{name}/{entry.name}", entry.stat(follow_symlinks=False))
            for subdirectory in subdirectories:
                walk(_open_dir(subdirectory, fd), f"{name}/{subdirectory}")
        finally:
            os.close(fd)

    walk(_open_dir(directory), "")
    return digest.digest(), newest, whole_seconds


def partial_stamp(directory: Path) -> bytes | None:
    """What the partial files are now: changes when any is written,
    truncated, replaced, added or removed (ctime cannot be set back). None
    if the directory cannot be read."""
    try:
        return _scan(directory)[0]
    except OSError:
        return None


def settled_partial_stamp(directory: Path) -> bytes | None:
    """partial_stamp, to keep (blocking: up to STAMP_SETTLE_NS): None when
    a later change might not show in it."""
    try:
        digest, newest, whole_seconds = _scan(directory)
        if whole_seconds:
            return None
        wait = newest + STAMP_SETTLE_NS - time.time_ns()
        if wait > STAMP_SETTLE_NS:  # a time ahead of our clock (set by hand, or a server's): no telling
            return None
        if wait > 0:
            time.sleep(wait / 1e9)
            if _scan(directory)[0] != digest:  # something else writes here
                return None
    except OSError:
        return None
    return digest


class PartialFiles:
    """The on-disk side of one incoming transfer (blocking calls: run them
    in a worker thread). `hashes` continues those of an earlier connection,
    and must describe the held chunks as they are on disk now."""

    def __init__(
        self, partial_root: Path, transfer_id: str, paths: list[str], sizes: list[int], hashes: FileHashes | None = None
    ):
        self.directory = partial_root / transfer_id
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in os.listdir(self.directory):
            if name.isdigit():  # partial/<id>/<index>, as builds before the tree kept them: refetched into it
                os.unlink(self.directory / name)
        self.tree = self.directory / TREE
        self.tree.mkdir(mode=0o700, exist_ok=True)
        # Files are opened relative to their directory's descriptor: no path
        # to build and resolve again for each of 10,000 small files.
        self._dir_fd: int | None = _open_dir(self.tree)
        self._paths = paths  # validated manifest paths (protocol.paths)
        self._sizes = sizes
        # index -> (buffered fd, O_DIRECT fd or None)
        self._open: OrderedDict[int, tuple[int, int | None]] = OrderedDict()
        self._dirs: OrderedDict[tuple[str, ...], int] = OrderedDict()  # below the tree's root
        self._dirty: set[int] = set()
        self._held_for_check: list[int] = []  # descriptors of evicted dirty files (see flusher)
        self._dirty_closed = False  # a dirty file was closed since the last flusher
        self._aligned: mmap.mmap | None = None  # page-aligned staging buffer for O_DIRECT
        self._direct_writer: ThreadPoolExecutor | None = None  # see write_batch
        self.hashes = hashes or FileHashes()

    def _fds(self, index: int) -> tuple[int, int | None]:
        if self._dir_fd is None:  # never fall back to a path relative to the working directory
            raise OSError(errno.EBADF, f"the partial files of {self.directory.name} are closed")
        fds = self._open.pop(index, None)
        if fds is None:
            while len(self._open) >= MAX_OPEN_FILES:
                self._evict()
            *parents, name = self._paths[index].split("/")
            parent = self._parent_fd(tuple(parents))
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
            direct = None
            if self._sizes[index] >= DIRECT_MIN_FILE:
                try:
                    direct = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECT, dir_fd=parent)
                except OSError:
                    pass  # tmpfs and some others refuse O_DIRECT
            fds = (fd, direct)
        self._open[index] = fds
        return fds

    def _fd(self, index: int) -> int:
        return self._fds(index)[0]

    def _parent_fd(self, parents: tuple[str, ...]) -> int:
        """The directory below the tree's root that a file lies in, made
        if need be; files arrive in manifest order, so one or two stay open."""
        if not parents:
            return self._dir_fd
        fd = self._dirs.pop(parents, None)
        if fd is None:
            while len(self._dirs) >= MAX_OPEN_DIRS:
                os.close(self._dirs.popitem(last=False)[1])
            fd = _open_dirs(self._dir_fd, parents)
        self._dirs[parents] = fd
        return fd

    def _evict(self) -> None:
        # A dirty file stays in _dirty, and the next flush's syncfs covers
        # writes made through a closed descriptor (a file reopened later may
        # no longer report their error); where syncfs is not trusted, the
        # descriptor is held for that flush to check (flusher).
        index, (fd, direct) = self._open.popitem(last=False)
        try:
            if direct is not None:
                os.close(direct)
        finally:  # fd is held or closed, whatever closing direct did
            dirty = index in self._dirty
            self._dirty_closed |= dirty
            if dirty and SYNCFS is not Syncfs.REPORTS and self._sizes[index]:
                self._held_for_check.append(fd)
            else:
                os.close(fd)

    @property
    def flush_due(self) -> bool:
        """Whether so many evicted files wait for a flush to check them
        that one should start now."""
        return len(self._held_for_check) >= MAX_HELD_FOR_CHECK

    def _write_chunk(self, index: int, offset: int, data: bytes) -> Future | None:
        """Write a chunk: through the page cache at once, or, where it can
        go direct, in the direct writer's thread (the Future to wait for)."""
        fd, direct = self._fds(index)
        self._dirty.add(index)
        if direct is not None and offset % DIRECT_ALIGN == 0 and len(data) % DIRECT_ALIGN == 0:
            if self._direct_writer is None:
                self._direct_writer = ThreadPoolExecutor(1, thread_name_prefix="dorothyd-direct-write")
            return self._direct_writer.submit(self._write_direct, fd, direct, offset, data)
        _write_all(fd, memoryview(data), offset)
        return None

    def _write_direct(self, fd: int, direct: int, offset: int, data: bytes) -> None:
        if self._aligned is None or len(self._aligned) < len(data):
            self._aligned = mmap.mmap(-1, len(data))
        self._aligned[: len(data)] = data
        view = memoryview(self._aligned)[: len(data)]
        try:
            written = os.pwrite(direct, view, offset)
        finally:
            view.release()  # else a failed write's traceback pins the mmap
        if written < len(data):  # rare short write: finish it buffered
            _write_all(fd, memoryview(data)[written:], offset + written)

    def _feed(self, index: int, offset: int, data: bytes) -> None:
        running, complete = self.hashes.running, self.hashes.complete
        if index in complete:
            return
        hasher = running.setdefault(index, FileHasher())
        hasher.feed(offset, data)
        if hasher.offset == self._sizes[index]:
            complete[index] = running.pop(index).digest()

    def write_batch(self, actions) -> list[bytes]:
        """Write several WriteChunk actions (one worker-thread hop) and
        return their checks. A direct write waits for the disk (2-4 ms per
        2 MiB chunk here, against 2 ms to hash and check it), so it runs in
        a thread of its own while this one hashes the same chunk: 1 GiB of
        random data, five alternating runs, 330 -> 355 MiB/s median; the
        receiver's event loop had waited 1.35-1.44 s per GiB for this
        thread, 0.76-0.88 s after. One write at a time, done before the
        next chunk or the batch's end: a flush, an eviction or close() never
        meets a write still running."""
        checks = []
        for action in actions:
            writing = self._write_chunk(action.file, action.offset, action.data)
            try:
                self._feed(action.file, action.offset, action.data)
                checks.append(chunk_check(action.data))
            finally:
                if writing is not None:
                    writing.result()
        return checks

    def flush(self) -> None:
        """Make every write so far durable."""
        self.flusher()()

    def flusher(self):
        """A Flush that makes every write so far durable when called, and
        that may run in another thread while later writes go on: it works
        on duplicates of the descriptors it needs (or ones kept for it),
        which evicting or closing files cannot touch. Build it while no
        write is running.

        A few dirty files, all open since their writes, are fdatasync'd;
        else one syncfs does the writeback. Where syncfs is not trusted,
        each dirty file is fdatasync'd as well (after the syncfs, or without
        it where it may clear errors), through a descriptor open since it
        was written: Linux reports a writeback error to every descriptor
        open when it happened, while a file reopened later may have left
        the cache, and the error with it."""
        if self._dir_fd is None:
            raise OSError(errno.EBADF, f"the partial files of {self.directory.name} are closed")
        use_syncfs = len(self._dirty) > SYNCFS_THRESHOLD or self._dirty_closed
        check_each = not (use_syncfs and SYNCFS is Syncfs.REPORTS)
        sync_first = use_syncfs and SYNCFS is not Syncfs.MAY_CLEAR
        fds = []  # the root's first if sync_first, then the files to fdatasync
        try:
            if sync_first:
                fds.append(os.dup(self._dir_fd))
            if check_each:
                for index in self._dirty:
                    if index in self._open:
                        fds.append(os.dup(self._open[index][0]))
        except OSError:
            _close_all(fds)
            raise
        fds += self._held_for_check
        self._held_for_check, self._dirty, self._dirty_closed = [], set(), False
        return Flush(fds, sync_first=sync_first, check_each=check_each)

    def create_empty(self) -> None:
        for index, size in enumerate(self._sizes):
            if size == 0:
                self._fd(index)
                self._dirty.add(index)

    def verify(self, chunks: dict[int, bytes], slots: list[tuple[int, int, int, int]]) -> list[int]:
        """Re-read chunks recorded as held; return the slots whose bytes no
        longer match their check (damaged while we were down). `slots` lists
        (slot, file, offset, length) in order, so the running SHA-256 of
        each file is rebuilt on the way."""
        damaged = []
        for slot, index, offset, length in slots:
            try:
                data = os.pread(self._fd(index), length, offset)
            except OSError:
                data = b""
            if len(data) != length or chunk_check(data) != chunks[slot]:
                damaged.append(slot)
            else:
                self._feed(index, offset, data)
        return damaged

    def file_sha256(self, index: int) -> bytes:
        complete = self.hashes.complete
        if index not in complete:
            hasher = self.hashes.running.pop(index, None) or FileHasher()
            hasher.catch_up(self._fd(index), self._sizes[index])
            complete[index] = hasher.digest()
        return complete[index]

    def close(self) -> None:
        if self._direct_writer is not None:
            self._direct_writer.shutdown()  # idle: every write was waited for
            self._direct_writer = None
        # Every list is emptied before anything is closed: a close that
        # fails must not leave a number to close twice, perhaps another's.
        files, self._open = self._open, OrderedDict()
        held, self._held_for_check = self._held_for_check, []  # no flush will check them now
        dirs, self._dirs = self._dirs, OrderedDict()
        root, self._dir_fd = self._dir_fd, None
        fds = [fd for pair in files.values() for fd in pair if fd is not None] + held + list(dirs.values())
        _close_all(fds + ([root] if root is not None else []))
        if self._aligned is not None:
            try:
                self._aligned.close()
            except BufferError:
                pass  # still exported by a traceback; garbage collection frees it
            self._aligned = None

    def publish(self, inbox_peer_dir: Path, transfer_id: str) -> Path:
        """Atomically publish the complete set as inbox/<peer>/<id>: the
        tree is made durable, then renamed there."""
        directories = {tuple(path.split("/")[:-1]) for path in self._paths}
        self.close()
        final = inbox_peer_dir / transfer_id
        # Gone before the rename: the next offer after a crash past it does not come here.
        shutil.rmtree(_earlier_staging(inbox_peer_dir, transfer_id), ignore_errors=True)
        if not final.exists():  # else published before a crash, perhaps before its name was fsync'd
            _make_durable_dir(inbox_peer_dir)
            # Each directory fsync is a journal commit of its own: past a
            # few directories, one syncfs makes every name in the tree
            # durable. Where it is not trusted, each directory is fsync'd
            # as well (after it, finding little left to write, or instead of
            # it where it may clear errors); a journal commit that failed
            # fails the rename too.
            many = len(directories) > SYNCFS_THRESHOLD
            if many and SYNCFS is not Syncfs.MAY_CLEAR:
                _sync_filesystem_of(self.tree)
            if not (many and SYNCFS is Syncfs.REPORTS):
                _fsync_tree(self.tree, directories)
            os.rename(self.tree, final)
        fsync_dir(inbox_peer_dir)
        shutil.rmtree(self.directory, ignore_errors=True)
        return final


def discard_received(partial_root: Path, inbox_peer_dir: Path, transfer_id: str) -> None:
    """Remove what an incoming transfer that will never complete left on
    disk (blocking)."""
    shutil.rmtree(partial_root / transfer_id, ignore_errors=True)
    shutil.rmtree(_earlier_staging(inbox_peer_dir, transfer_id), ignore_errors=True)


def _earlier_staging(inbox_peer_dir: Path, transfer_id: str) -> Path:
    """Where builds before the partial tree assembled a transfer at
    publication: a crash there left part of it, hidden, in the inbox."""
    return inbox_peer_dir / f".{transfer_id}.incoming"


class Flush:
    """What PartialFiles.flusher returns: call it, in any thread, to make
    the writes durable, or discard it if it will never run; either way its
    descriptors are closed."""

    def __init__(self, fds: list[int], *, sync_first: bool, check_each: bool):
        self._fds = fds  # the tree's root first if sync_first, then the files to fdatasync
        self._sync_first = sync_first
        self._check_each = check_each

    def __call__(self) -> None:
        try:
            if self._sync_first:
                _syncfs(self._fds[0])
            if self._check_each:
                for fd in self._fds[1:] if self._sync_first else self._fds:
                    os.fdatasync(fd)
        finally:
            self.discard()

    def discard(self) -> None:
        fds, self._fds = self._fds, []
        _close_all(fds)


def _make_durable_dir(path: Path) -> None:
    """mkdir -p, fsyncing the parent of each directory made and of the
    first one found (an attempt a crash cut short may have made it without
    its entry reaching the disk), so a published transfer cannot lose a
    directory to a power cut after its receipt left."""
    if path.is_dir():
        fsync_dir(path.parent)
        return
    _make_durable_dir(path.parent)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    fsync_dir(path.parent)


def _close_all(fds: list[int]) -> None:
    """Close every one, even past a close that fails (then raised)."""
    failure = None
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _open_dirs(root_fd: int, parts: tuple[str, ...], *, sync_each: bool = False, create: bool = True) -> int:
    """Open the directory `parts` below `root_fd`, creating (0700) what is
    missing if `create`, without following symlinks; a descriptor of its
    own, even for no parts. With `sync_each`, each directory on the way is
    fsync'd before descending; the caller fsyncs the returned one."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                if create:
                    os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            if sync_each:
                os.fsync(fd)
            fd, parent = _open_dir(part, fd), fd
            os.close(parent)
    except BaseException:
        os.close(fd)  # a full disk fails mkdir: no descriptor may stay behind
        raise
    return fd


def _open_dir(name: Path | str, dir_fd: int | None = None) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _fsync_tree(tree: Path, directories: set[tuple[str, ...]]) -> None:
    """fsync the tree's root and every directory on the way to each of
    `directories`: every name in it is then durable (file data was made
    so as it was received)."""
    root_fd = _open_dir(tree)
    try:
        for parts in directories:
            fd = _open_dirs(root_fd, parts, sync_each=True, create=False)  # a missing one is lost data, not ours to make
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)


def hash_published(final: Path, paths: list[str]) -> list[bytes]:
    """SHA-256 of files already in the inbox (recovery after a crash between
    publishing and recording the receipt), once their transfer's name in the
    inbox is durable: the crash may have come before its fsync, and a
    receipt is about to rest on it."""
    fsync_dir(final.parent)
    digests = []
    root_fd = _open_dir(final)
    try:
        for path in paths:  # descriptor-relative, as written: a legal path below the inbox may exceed PATH_MAX
            *parents, name = path.split("/")
            parent = _open_dirs(root_fd, tuple(parents), create=False)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            finally:
                os.close(parent)
            try:
                hasher = FileHasher()
                hasher.catch_up(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            digests.append(hasher.digest())
    finally:
        os.close(root_fd)
    return digests


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
