"""The receiver's partial files and the held-chunk records that let a
restarted node resume: what is found damaged, and what an upgrade forgets."""

import contextlib
import errno
import hashlib
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from dorothy.dorothyd import storage, tuning
from dorothy.dorothyd.storage import (
    CHECK_LEN, DIRECT_MIN_FILE, TREE, PartialFiles, chunk_check, partial_stamp, settled_partial_stamp,
)
from dorothy.dorothyd.store import Store
from dorothy.protocol.paths import MAX_PATH_BYTES
from dorothy.protocol.transfer import WriteChunk

from conftest import add_transfer

CHUNK = 1 << 16


def partial_files(root, sizes: list[int], paths: list[str] | None = None) -> PartialFiles:
    """Transfer "t" under `root`, its files named by index unless `paths`."""
    return PartialFiles(root, "t", paths or [str(n) for n in range(len(sizes))], sizes)


def write(partial: PartialFiles, file: int, index: int, data: bytes) -> bytes:
    return partial.write_batch([WriteChunk(file=file, index=index, offset=index * CHUNK, data=data)])[0]


def test_verify_finds_exactly_the_damaged_missing_and_short_chunks(tmp_path):
    sizes = [3 * CHUNK, CHUNK]
    chunks = [os.urandom(CHUNK) for _ in range(4)]
    partial = partial_files(tmp_path, sizes)
    layout = [(0, 0, 0, CHUNK), (1, 0, CHUNK, CHUNK), (2, 0, 2 * CHUNK, CHUNK), (3, 1, 0, CHUNK)]
    held = {slot: write(partial, file, offset // CHUNK, chunks[slot]) for slot, file, offset, _ in layout}
    partial.flush()
    partial.close()
    with open(partial.tree / "0", "r+b") as f:  # one flipped bit in the second chunk
        f.seek(CHUNK + 1000)
        byte = f.read(1)[0]
        f.seek(CHUNK + 1000)
        f.write(bytes([byte ^ 0x10]))
    os.truncate(partial.tree / "1", CHUNK - 1)  # the last chunk cut short
    reopened = partial_files(tmp_path, sizes)
    try:
        assert reopened.verify(held, layout) == [1, 3]
    finally:
        reopened.close()


def open_descriptors() -> list[str]:
    """What this process's descriptors point at (the one listing them is gone by then)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            pass
    return found


REPORTS, LEAVES, MAY_CLEAR = storage.Syncfs.REPORTS, storage.Syncfs.LEAVES, storage.Syncfs.MAY_CLEAR


@pytest.mark.parametrize(
    "system, release, behaviour",
    [
        ("Linux", "6.18.44-fc-v657", REPORTS),
        ("Linux", "5.8.0", REPORTS),
        ("Linux", "5.15.0-91-generic", REPORTS),
        ("Linux", "10.1", REPORTS),
        ("Linux", "5.7.19", LEAVES),
        ("Linux", "5.4.0-150-generic", LEAVES),
        ("Linux", "4.18.0-513.el8.x86_64", LEAVES),  # RHEL 8
        ("Linux", "4.13.0", LEAVES),
        ("Linux", "4.12.14", MAY_CLEAR),
        ("Linux", "3.10.0-1160.el7.x86_64", MAY_CLEAR),  # RHEL 7
        ("Linux", "", MAY_CLEAR),
        ("Linux", "unknown", MAY_CLEAR),
        ("Linux", "\uff15.\uff11\uff10", MAY_CLEAR),  # fullwidth digits: int() takes them, a kernel never has them
        ("Linux", "\u00b2.8", MAY_CLEAR),
        ("Linux", "6+", MAY_CLEAR),  # unknown is untrusted: slower, never wrong
        ("Darwin", "23.1.0", MAY_CLEAR),
    ],
)
def test_syncfs_is_trusted_only_where_it_reports_writeback_errors(system, release, behaviour):
    assert storage.syncfs_behaviour(system, release) is behaviour


# How a flush makes its files durable, by what syncfs does with writeback
# errors: an fdatasync of each file through descriptors of its own; past a
# few files, or when one was closed since it was written, one syncfs;
# where syncfs is not trusted, an fdatasync of each file as well, through
# a descriptor held since its writes, after the syncfs where that leaves
# errors for it to see, else without it. (files, files kept open, syncfs)
FLUSH_KINDS = {
    "fdatasync-each": (2, 128, REPORTS),
    "fdatasync-each-up-to-the-threshold": (8, 128, REPORTS),
    "syncfs-past-the-threshold": (9, 128, REPORTS),
    "syncfs": (20, 128, REPORTS),
    "syncfs-after-an-eviction": (5, 2, REPORTS),
    "fdatasync-each-old-kernel": (2, 128, LEAVES),
    "syncfs-then-check-each": (20, 128, LEAVES),
    "syncfs-then-check-each-evicted": (20, 4, LEAVES),
    "check-each-without-syncfs": (20, 4, MAY_CLEAR),
}


def flush_kind(monkeypatch, kind: str) -> int:
    files, open_files, behaviour = FLUSH_KINDS[kind]
    monkeypatch.setattr(storage, "SYNCFS", behaviour)
    monkeypatch.setattr(storage, "MAX_OPEN_FILES", open_files)
    return files


def descriptors_below(path) -> int:
    return sum(1 for target in open_descriptors() if target.startswith(f"{path}/"))


@pytest.mark.parametrize("kind", FLUSH_KINDS)
def test_a_flusher_holds_its_own_descriptors(tmp_path, monkeypatch, kind):
    # A flush runs in its own thread while later writes evict and reopen
    # files, or after the partial files are closed: it must not touch theirs.
    files = flush_kind(monkeypatch, kind)
    before = len(os.listdir("/proc/self/fd"))
    partial = partial_files(tmp_path, [CHUNK] * files, [f"case/d{n % 3}/f{n}" for n in range(files)])
    for index in range(files):
        write(partial, index, 0, os.urandom(CHUNK))
    flush = partial.flusher()
    partial.close()
    flush()  # no EBADF
    assert len(os.listdir("/proc/self/fd")) == before  # and no duplicate left open


class SyncCalls:
    """The fdatasync and syncfs calls the storage makes, by path; fails the
    fdatasync of `failing` with EIO, and counts files opened meanwhile."""

    def __init__(self, monkeypatch, failing: str | None = None):
        self.synced, self.syncfs, self.opened = [], [], 0
        real_fdatasync, real_syncfs, real_open = os.fdatasync, storage._syncfs, os.open

        def fdatasync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            self.synced.append(path)
            if path == failing:
                raise OSError(errno.EIO, "Input/output error")
            real_fdatasync(fd)

        def syncfs(fd):
            self.syncfs.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_syncfs(fd)

        def counted_open(*args, **kwargs):
            self.opened += 1
            return real_open(*args, **kwargs)

        monkeypatch.setattr(storage.os, "fdatasync", fdatasync)
        monkeypatch.setattr(storage, "_syncfs", syncfs)
        monkeypatch.setattr(storage.os, "open", counted_open)


@pytest.mark.parametrize("kind", FLUSH_KINDS)
def test_a_flush_syncs_every_file_written_since_the_last_without_reopening_any(tmp_path, monkeypatch, kind):
    files = flush_kind(monkeypatch, kind)
    partial = partial_files(tmp_path, [CHUNK] * (files + 1), [f"case/d{n % 3}/f{n}" for n in range(files + 1)])
    write(partial, files, 0, os.urandom(CHUNK))
    partial.flush()  # the file written before: not this flush's to sync
    for index in range(files):
        write(partial, index, 0, os.urandom(CHUNK))
    calls = SyncCalls(monkeypatch)
    partial.flush()
    partial.close()
    written = sorted(os.fspath(partial.tree / f"case/d{n % 3}/f{n}") for n in range(files))
    tree = [os.fspath(partial.tree)]
    expected = {
        "fdatasync-each": (written, []),
        "fdatasync-each-up-to-the-threshold": (written, []),
        "syncfs-past-the-threshold": ([], tree),
        "syncfs": ([], tree),
        "syncfs-after-an-eviction": ([], tree),
        "fdatasync-each-old-kernel": (written, []),
        "syncfs-then-check-each": (written, tree),
        "syncfs-then-check-each-evicted": (written, tree),
        "check-each-without-syncfs": (written, []),
    }[kind]
    assert (sorted(calls.synced), calls.syncfs) == expected
    assert calls.opened == 0  # a file reopened may no longer report a writeback error


def test_a_file_closed_and_reopened_since_its_write_is_not_left_to_the_new_descriptor(tmp_path, monkeypatch):
    # Its error may have left the cache with it: syncfs (trusted) covers it.
    monkeypatch.setattr(storage, "SYNCFS", REPORTS)
    monkeypatch.setattr(storage, "MAX_OPEN_FILES", 2)
    partial = partial_files(tmp_path, [CHUNK, 0, 0])
    write(partial, 0, 0, os.urandom(CHUNK))
    for other in (1, 2):  # opening two others evicts the dirty file
        partial.file_sha256(other)
    write(partial, 0, 0, os.urandom(CHUNK))  # open again, the only dirty file
    calls = SyncCalls(monkeypatch)
    partial.flush()
    assert (calls.synced, calls.syncfs) == ([], [os.fspath(partial.tree)])
    write(partial, 0, 0, os.urandom(CHUNK))  # and again, with no eviction since the flush
    partial.flush()
    partial.close()
    assert (calls.synced, calls.syncfs) == ([os.fspath(partial.tree / "0")], [os.fspath(partial.tree)])


def closes_failing_on(monkeypatch, failing):
    """os.close in storage closes, then fails for the descriptors in `failing`, as NFS may."""
    real_close = os.close

    def close(fd):
        real_close(fd)
        if fd in failing:
            raise OSError(errno.EIO, f"Input/output error closing {fd}")

    monkeypatch.setattr(storage.os, "close", close)


def test_closing_descriptors_goes_on_past_one_that_fails_and_reports_the_first(tmp_path, monkeypatch):
    fds = [os.open(tmp_path / name, os.O_CREAT | os.O_RDWR, 0o600) for name in "abc"]
    closes_failing_on(monkeypatch, {fds[0], fds[2]})
    with pytest.raises(OSError, match=f"closing {fds[0]}$"):
        storage._close_all(fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_partial_files_whose_close_failed_never_close_a_descriptor_twice(tmp_path, monkeypatch):
    # The receiver closes them again on its way out: by then the numbers
    # may belong to files another transfer opened.
    flush_kind(monkeypatch, "syncfs-then-check-each-evicted")
    partial = partial_files(tmp_path, [CHUNK] * 10, [f"case/f{n}" for n in range(10)])
    for index in range(10):
        write(partial, index, 0, os.urandom(CHUNK))
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, gone by now
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{partial.directory}/"):
                ours.add(int(fd))
    closes_failing_on(monkeypatch, ours)
    with pytest.raises(OSError):
        partial.close()
    monkeypatch.undo()
    others = [os.open(tmp_path / f"other{n}", os.O_CREAT | os.O_RDWR, 0o600) for n in range(len(ours))]
    try:
        partial.close()
        for fd in others:
            os.fstat(fd)  # still open
    finally:
        storage._close_all(others)


def test_a_flush_that_will_never_run_can_let_its_descriptors_go(tmp_path, monkeypatch):
    flush_kind(monkeypatch, "syncfs-then-check-each-evicted")
    before = len(os.listdir("/proc/self/fd"))
    partial = partial_files(tmp_path, [CHUNK] * 10, [f"case/f{n}" for n in range(10)])
    for index in range(10):
        write(partial, index, 0, os.urandom(CHUNK))
    partial.flusher().discard()
    partial.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_where_syncfs_is_trusted_no_file_is_held_past_its_eviction(tmp_path, monkeypatch):
    flush_kind(monkeypatch, "syncfs-after-an-eviction")  # 2 files kept open
    partial = partial_files(tmp_path, [CHUNK] * 20, [f"f{n}" for n in range(20)])
    for index in range(20):
        write(partial, index, 0, os.urandom(CHUNK))
        assert descriptors_below(partial.tree) <= 2
    assert not partial.flush_due
    partial.close()


@pytest.mark.parametrize("behaviour", [LEAVES, MAY_CLEAR])
def test_a_writeback_error_found_by_the_check_fails_the_flush(tmp_path, monkeypatch, behaviour):
    flush_kind(monkeypatch, "syncfs-then-check-each-evicted")
    monkeypatch.setattr(storage, "SYNCFS", behaviour)
    before = len(os.listdir("/proc/self/fd"))
    partial = partial_files(tmp_path, [CHUNK] * 20, [f"case/f{n}" for n in range(20)])
    for index in range(20):
        write(partial, index, 0, os.urandom(CHUNK))
    calls = SyncCalls(monkeypatch, failing=os.fspath(partial.tree / "case/f1"))  # evicted long ago
    flush = partial.flusher()
    with pytest.raises(OSError) as failed:
        flush()
    assert failed.value.errno == errno.EIO
    partial.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_flusher_that_cannot_get_its_descriptors_keeps_every_file_for_the_next(tmp_path, monkeypatch):
    flush_kind(monkeypatch, "syncfs-then-check-each")
    partial = partial_files(tmp_path, [CHUNK] * 20, [f"f{n}" for n in range(20)])
    for index in range(20):
        write(partial, index, 0, os.urandom(CHUNK))
    before = len(os.listdir("/proc/self/fd"))
    real_dup, dups = os.dup, []

    def dup(fd):
        if len(dups) == 5:
            raise OSError(errno.EMFILE, "Too many open files")
        dups.append(fd)
        return real_dup(fd)

    monkeypatch.setattr(storage.os, "dup", dup)
    with pytest.raises(OSError):
        partial.flusher()
    assert len(os.listdir("/proc/self/fd")) == before
    monkeypatch.setattr(storage.os, "dup", real_dup)
    calls = SyncCalls(monkeypatch)
    partial.flush()
    partial.close()
    assert sorted(calls.synced) == sorted(os.fspath(partial.tree / f"f{n}") for n in range(20))


def test_a_closed_set_of_partial_files_cannot_be_flushed(tmp_path):
    partial = partial_files(tmp_path, [CHUNK])
    partial.close()
    with pytest.raises(OSError) as closed:
        partial.flusher()
    assert closed.value.errno == errno.EBADF


def test_evicted_files_waiting_for_their_check_make_a_flush_due(tmp_path, monkeypatch):
    flush_kind(monkeypatch, "syncfs-then-check-each-evicted")  # 4 files kept open
    monkeypatch.setattr(storage, "MAX_HELD_FOR_CHECK", 3)
    partial = partial_files(tmp_path, [CHUNK] * 8 + [0] * 8, [f"case/f{n}" for n in range(16)])
    partial.create_empty()  # empty files have nothing to check: never held
    assert not partial.flush_due
    for index in range(6):
        write(partial, index, 0, os.urandom(CHUNK))
    assert not partial.flush_due  # 2 evicted so far
    write(partial, 6, 0, os.urandom(CHUNK))
    assert partial.flush_due
    partial.flush()
    assert not partial.flush_due
    partial.close()


@pytest.mark.parametrize("size", [CHUNK, DIRECT_MIN_FILE], ids=["buffered", "direct"])
def test_files_held_for_a_check_that_never_came_are_closed_with_the_rest(tmp_path, monkeypatch, size):
    # A connection that ends before its next flush records none of those
    # chunks as held: their descriptors go, and the daemon keeps none.
    flush_kind(monkeypatch, "syncfs-then-check-each-evicted")
    before = len(os.listdir("/proc/self/fd"))
    partial = partial_files(tmp_path, [size] * 10, [f"case/f{n}" for n in range(10)])
    for index in range(10):
        write(partial, index, 0, os.urandom(CHUNK))
    assert descriptors_below(partial.tree) <= 2 * 4 + 6 + 1  # open (and direct), held, the directory
    partial.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_directories_of_partial_files_are_kept_open_a_few_at_a_time_and_closed_with_them(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    count = 3 * storage.MAX_OPEN_DIRS
    partial = partial_files(tmp_path, [10] * count, [f"case/d{n}/f" for n in range(count)])
    for index in range(count):
        write(partial, index, 0, b"x" * 10)
    tree = os.fspath(partial.tree)
    directories = [p for p in open_descriptors() if p.startswith(f"{tree}/") and os.path.isdir(p)]
    assert 0 < len(directories) <= storage.MAX_OPEN_DIRS
    partial.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_directory_that_cannot_be_made_leaves_no_descriptor_open(tmp_path, monkeypatch):
    # A full disk fails mkdir; the sender retries, and every attempt must
    # not cost the daemon a descriptor.
    partial = partial_files(tmp_path, [10], ["case/deeper/f"])
    real_mkdir = os.mkdir

    def mkdir(name, mode, *, dir_fd):
        if name == "deeper":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_mkdir(name, mode, dir_fd=dir_fd)

    monkeypatch.setattr(storage.os, "mkdir", mkdir)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="No space left"):
        write(partial, 0, 0, b"x" * 10)
    assert len(os.listdir("/proc/self/fd")) == before
    partial.close()


@pytest.mark.parametrize("planted", ["directory", "file"])
def test_a_symbolic_link_planted_in_the_partial_tree_is_refused_not_followed(tmp_path, planted):
    outside = tmp_path / "outside"
    outside.mkdir()
    partial = partial_files(tmp_path / "partial", [10], ["case/f"])
    if planted == "directory":
        (partial.tree / "case").symlink_to(outside)
    else:
        (partial.tree / "case").mkdir()
        (partial.tree / "case" / "f").symlink_to(outside / "f")
    with pytest.raises(OSError):
        write(partial, 0, 0, b"x" * 10)
    partial.close()
    assert list(outside.iterdir()) == []


def test_a_stamp_sees_files_whose_path_is_longer_than_path_max_below_home(tmp_path):
    # A legal manifest path has up to 4,096 bytes; below HOME/partial/<id>/
    # the whole path is longer than the kernel takes in one piece.
    path = "/".join(["d" * 250] * 16 + ["f" * 80])
    assert len(path) == MAX_PATH_BYTES
    partial = partial_files(tmp_path, [10], [path])
    write(partial, 0, 0, b"x" * 10)
    partial.close()
    stamp = partial_stamp(partial.directory)
    assert stamp is not None and settled_partial_stamp(partial.directory) == stamp
    reopened = partial_files(tmp_path, [10], [path])
    write(reopened, 0, 0, b"y" * 10)
    reopened.close()
    assert partial_stamp(partial.directory) not in (None, stamp)


def test_published_files_are_hashed_again_whatever_the_length_of_their_path(tmp_path):
    # After a crash between publication and the receipt, the next offer
    # hashes the published copy: the longest legal path must not make that
    # fail for good (ENAMETOOLONG through an absolute path).
    paths = ["/".join(["d" * 250] * 16 + ["f" * 80]), "top.bin"]
    contents = [os.urandom(100), b""]
    partial = partial_files(tmp_path / "partial", [100, 0], paths)
    partial.create_empty()
    write(partial, 0, 0, contents[0])
    partial.flush()
    final = partial.publish(tmp_path / "inbox" / "alpha", "t")
    assert storage.hash_published(final, paths) == [hashlib.sha256(c).digest() for c in contents]


def test_partial_files_an_earlier_build_kept_by_index_go_when_the_transfer_is_opened(tmp_path):
    # Their chunks are fetched again into the tree; kept, they would only
    # take as much room again as the transfer.
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "0").write_bytes(b"x" * CHUNK)
    partial = partial_files(tmp_path, [CHUNK], ["0"])
    assert os.listdir(tmp_path / "t") == [TREE]
    partial.close()


def test_a_directory_of_the_tree_gone_before_publication_fails_it(tmp_path):
    # Publication makes the names durable; it must not make up a directory
    # (and publish a set without its files) where one has gone missing.
    paths = ["case/a/f", "case/b/g"]
    partial = partial_files(tmp_path / "partial", [10, 10], paths)
    for index in range(2):
        write(partial, index, 0, b"x" * 10)
    partial.flush()
    shutil.rmtree(partial.tree / "case" / "b")
    with pytest.raises(FileNotFoundError):
        partial.publish(tmp_path / "inbox" / "alpha", "t")
    assert not (tmp_path / "inbox" / "alpha" / "t").exists()


@pytest.mark.parametrize(
    "directories, behaviour",
    [(2, REPORTS), (20, REPORTS), (20, LEAVES), (20, MAY_CLEAR)],
    ids=["fsync-each", "syncfs", "syncfs-then-fsync-each", "fsync-each-old-kernel"],
)
def test_every_published_name_is_durable_before_the_transfer_appears(tmp_path, monkeypatch, directories, behaviour):
    # The inbox name must not survive a power cut that loses a file inside
    # it: each directory of the tree fsync'd, or (past a few, where syncfs
    # reports writeback errors) the filesystem synced once, before the
    # tree's rename into the inbox.
    monkeypatch.setattr(storage, "SYNCFS", behaviour)
    paths = [f"case/d{i % directories:02d}/f{i}" for i in range(2 * directories)]
    partial = partial_files(tmp_path / "partial", [CHUNK] * len(paths), paths)
    contents = [os.urandom(CHUNK) for _ in paths]
    for index, data in enumerate(contents):
        write(partial, index, 0, data)
    partial.flush()
    tree = os.fspath(partial.tree)
    events = []
    real_rename, real_fsync, real_syncfs = os.rename, os.fsync, storage._syncfs

    def rename(src, dst):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        real_rename(src, dst)

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def syncfs(fd):
        events.append(("syncfs",))
        real_syncfs(fd)

    monkeypatch.setattr(storage.os, "rename", rename)
    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage, "_syncfs", syncfs)
    final = partial.publish(tmp_path / "inbox" / "alpha", "t")
    assert [e for e in events if e[0] == "rename"] == [("rename", tree, os.fspath(final))]  # one rename for all
    appeared = events.index(("rename", tree, os.fspath(final)))
    if directories > storage.SYNCFS_THRESHOLD and behaviour is not MAY_CLEAR:
        assert ("syncfs",) in events[:appeared]
    else:
        assert ("syncfs",) not in events
    if directories <= storage.SYNCFS_THRESHOLD or behaviour is not REPORTS:  # each directory, after a syncfs or not
        for directory in {tree, f"{tree}/case"} | {f"{tree}/case/d{i:02d}" for i in range(directories)}:
            assert ("fsync", directory) in events[:appeared], directory
    assert ("fsync", os.fspath(final.parent)) in events[appeared:]
    assert {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("f*")} == dict(zip(paths, contents))
    assert not partial.directory.exists()


def test_a_transfer_found_published_after_a_crash_has_its_inbox_name_made_durable(tmp_path, monkeypatch):
    # The crash may have come between the rename into the inbox and the
    # fsync of the inbox: the name must be durable before a receipt rests on it.
    inbox = tmp_path / "inbox" / "alpha"
    partial = partial_files(tmp_path / "partial", [CHUNK], ["evidence.bin"])
    write(partial, 0, 0, os.urandom(CHUNK))
    partial.flush()
    final = partial.publish(inbox, "t")
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    storage.hash_published(final, ["evidence.bin"])  # what the next offer does first
    assert synced == [os.fspath(inbox)]
    assert partial_files(tmp_path / "partial", [CHUNK], ["evidence.bin"]).publish(inbox, "t") == final
    assert synced == [os.fspath(inbox)] * 2


def test_an_inbox_folder_a_crashed_attempt_made_is_made_durable_before_use(tmp_path, monkeypatch):
    # mkdir inbox/alpha, then a crash before the fsync of inbox/: the folder
    # exists at the next attempt, but its entry may not survive a power cut.
    inbox = tmp_path / "inbox"
    (inbox / "alpha").mkdir(parents=True)
    partial = partial_files(tmp_path / "partial", [CHUNK], ["evidence.bin"])
    write(partial, 0, 0, os.urandom(CHUNK))
    partial.flush()
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    partial.publish(inbox / "alpha", "t")
    assert os.fspath(inbox) in synced


def test_a_failed_disk_write_fails_its_batch(tmp_path, monkeypatch):
    # Large chunks are written in a thread of their own (O_DIRECT, beside
    # the hashing): its error must reach the caller, not stay in that thread.
    partial = partial_files(tmp_path, [DIRECT_MIN_FILE])

    def failing_pwrite(fd, data, offset):
        raise OSError(errno.EIO, "I/O error (test)")

    monkeypatch.setattr(storage.os, "pwrite", failing_pwrite)
    try:
        with pytest.raises(OSError) as raised:
            partial.write_batch([WriteChunk(file=0, index=0, offset=0, data=os.urandom(DIRECT_MIN_FILE))])
        assert raised.value.errno == errno.EIO
    finally:
        partial.close()


def test_a_batch_that_fails_while_its_chunk_is_written_waits_for_that_write(tmp_path, monkeypatch):
    # Else close() could meet the write still running on its descriptor.
    # (Where the file system refuses O_DIRECT, as tmpfs does, the write is
    # made before the hashing, in the caller's thread, and this holds too.)
    partial = partial_files(tmp_path, [DIRECT_MIN_FILE])
    caller, hashing_failed, finished = threading.current_thread(), threading.Event(), []
    real_pwrite = os.pwrite

    def slow_pwrite(fd, data, offset):
        if threading.current_thread() is not caller:  # the direct writer's thread
            assert hashing_failed.wait(timeout=30), "the chunk was not hashed while it was written"
        written = real_pwrite(fd, data, offset)
        finished.append(written)
        return written

    def failing_check(data):
        hashing_failed.set()
        raise MemoryError("check failed (test)")

    monkeypatch.setattr(storage.os, "pwrite", slow_pwrite)
    monkeypatch.setattr(storage, "chunk_check", failing_check)
    try:
        with pytest.raises(MemoryError):
            partial.write_batch([WriteChunk(file=0, index=0, offset=0, data=os.urandom(DIRECT_MIN_FILE))])
        assert finished == [DIRECT_MIN_FILE]
    finally:
        partial.close()


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=4096), st.data())
def test_the_check_changes_with_any_byte_of_the_chunk(data, draw):
    position = draw.draw(st.integers(0, len(data) - 1))
    damaged = bytearray(data)
    damaged[position] ^= draw.draw(st.integers(1, 255))
    assert len(chunk_check(data)) == CHECK_LEN
    assert chunk_check(damaged) != chunk_check(data)
    assert chunk_check(memoryview(bytes(damaged))) == chunk_check(damaged)


def test_an_earlier_state_db_forgets_its_crc_rows_and_keeps_its_transfers(tmp_path):
    path = tmp_path / "state.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE chunks (transfer_id TEXT, slot INTEGER, crc INTEGER, PRIMARY KEY (transfer_id, slot))")
    db.execute("INSERT INTO chunks VALUES ('t', 0, 12345)")
    for transfer_id, state in (("t", "waiting"), ("d", "done")):
        db.execute(
            "INSERT INTO transfers (id, direction, peer, peer_node_key, state, manifest, manifest_hash, bytes_total,"
            " bytes_done, created, updated) VALUES (?, 'in', 'alpha', 'k', ?, x'', x'', 10, 7, 'c', 'u')",
            (transfer_id, state),
        )
    db.commit()
    db.close()
    store = Store(path)
    try:
        assert store.get("t")["state"] == "waiting"
        assert store.chunks("t") == {}  # fetched again instead of checked against a CRC
        assert store.get("t")["bytes_done"] == 0  # and its progress says so
        assert store.get("d")["bytes_done"] == 7  # a finished transfer is untouched
        store.add_chunks("t", [(0, b"c" * CHECK_LEN)], 5, "now")
        assert store.chunks("t") == {0: b"c" * CHECK_LEN}
    finally:
        store.close()
    with pytest.raises(sqlite3.OperationalError):
        sqlite3.connect(path).execute("SELECT * FROM chunks")


def _rows(count: int, start: int = 0) -> list:
    return [(f"d/{n:06d}.bin", None, n, 0) for n in range(start, start + count)]


TRANSFER_ROW = dict(
    id="ab" * 16, direction="in", peer="alpha", peer_node_key="k", state="active",
    manifest=b"m", manifest_hash=b"h" * 32, now="now",
)


async def test_a_large_transfer_is_added_in_steps_with_the_event_loop_free_between(make_node):
    node = make_node("bravo")
    files = _rows(25_000)
    seen = set()

    async def watch_the_steps():  # another connection's task, running whenever it can
        while node.store.get(TRANSFER_ROW["id"]) is None:
            seen.add(node.store._db.execute("SELECT count(*) FROM files").fetchone()[0])
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_the_steps)
        await node.add_file_rows(TRANSFER_ROW["id"], files)
        node.store.add_transfer_row(bytes_total=sum(f[2] for f in files), **TRANSFER_ROW)
    assert any(0 < n < len(files) for n in seen)  # it ran while the rows were being added
    assert [tuple(f)[1:5] for f in node.store.files(TRANSFER_ROW["id"])] == [f[:3] + (0,) for f in files]
    assert node.store.get(TRANSFER_ROW["id"])["bytes_total"] == sum(f[2] for f in files)


def test_rows_of_a_transfer_a_crash_left_half_added_are_gone_at_the_next_start(tmp_path):
    store = Store(tmp_path / "state.db")
    add_transfer(store, files=_rows(3), **{**TRANSFER_ROW, "id": "cd" * 16})
    store.add_files(TRANSFER_ROW["id"], 0, _rows(10))  # the crash came before its transfer row
    store.close()
    store = Store(tmp_path / "state.db")
    try:
        assert store.files(TRANSFER_ROW["id"]) == []
        assert len(store.files("cd" * 16)) == 3  # complete transfers keep theirs
        add_transfer(store, files=_rows(2), **TRANSFER_ROW)  # adding it again works
        assert len(store.files(TRANSFER_ROW["id"])) == 2
    finally:
        store.close()


def test_adding_rows_to_an_existing_transfer_is_refused_and_removes_nothing(tmp_path):
    store = Store(tmp_path / "state.db")
    try:
        add_transfer(store, files=_rows(3), **TRANSFER_ROW)
        with pytest.raises(sqlite3.IntegrityError):
            store.add_files(TRANSFER_ROW["id"], 0, _rows(5))
        assert len(store.files(TRANSFER_ROW["id"])) == 3
    finally:
        store.close()


OTHER_ROW = dict(TRANSFER_ROW, id="cd" * 16)


@contextlib.contextmanager
def two_transfers(directory, *, files: int):
    """A state db holding TRANSFER_ROW and OTHER_ROW, each with `files` file rows."""
    store = Store(directory / "state.db")
    try:
        for row in (TRANSFER_ROW, OTHER_ROW):
            add_transfer(store, files=_rows(files), **row)
        yield store
    finally:
        store.close()


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, 39), st.binary(min_size=32, max_size=32), max_size=40), st.data())
def test_saving_file_hashes_sets_exactly_the_files_named(tmp_path_factory, digests, draw):
    """Hashes are saved by runs of consecutive files, in whatever order and
    with whatever gaps they come: each file gets its own, the other
    transfer's rows and the files not named keep theirs."""
    with two_transfers(tmp_path_factory.mktemp("db"), files=40) as store:
        earlier = draw.draw(st.dictionaries(st.integers(0, 39), st.binary(min_size=32, max_size=32)))
        store.save_sent(TRANSFER_ROW["id"], earlier, 0, "now")
        store.set_file_sha256(TRANSFER_ROW["id"], digests)
        expected = [digests.get(n, earlier.get(n)) for n in range(40)]
        assert [f.sha256 for f in store.files(TRANSFER_ROW["id"])] == expected
        assert [f.sha256 for f in store.files(OTHER_ROW["id"])] == [None] * 40


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.binary(min_size=CHECK_LEN, max_size=CHECK_LEN)), max_size=60), st.data())
def test_held_chunks_are_recorded_exactly_as_given(tmp_path_factory, chunks, draw):
    """Held chunks are recorded by runs of consecutive slots, in whatever
    order, with gaps and repeats (the last check of a slot wins, as it
    would row by row); another transfer's chunks are left alone."""
    with two_transfers(tmp_path_factory.mktemp("db"), files=1) as store:
        earlier = draw.draw(st.dictionaries(st.integers(0, 60), st.binary(min_size=CHECK_LEN, max_size=CHECK_LEN)))
        store.add_chunks(TRANSFER_ROW["id"], list(earlier.items()), 1, "now")
        store.add_chunks(OTHER_ROW["id"], [(5, b"o" * CHECK_LEN)], 1, "now")
        store.add_chunks(TRANSFER_ROW["id"], chunks, 2, "now")
        assert store.chunks(TRANSFER_ROW["id"]) == {**earlier, **dict(chunks)}
        assert store.chunks(OTHER_ROW["id"]) == {5: b"o" * CHECK_LEN}
        assert store.get(TRANSFER_ROW["id"])["bytes_done"] == 2


def test_hashes_of_different_lengths_are_refused_and_nothing_is_saved(tmp_path):
    store = Store(tmp_path / "state.db")
    try:
        add_transfer(store, files=_rows(3), **TRANSFER_ROW)
        with pytest.raises(ValueError, match="same, non-zero length"):
            store.set_file_sha256(TRANSFER_ROW["id"], {0: b"a" * 32, 1: b"b" * 31, 2: b"c" * 32})
        assert [f.sha256 for f in store.files(TRANSFER_ROW["id"])] == [None] * 3
    finally:
        store.close()


async def test_file_hashes_are_set_in_steps_with_the_event_loop_free_between(make_node):
    node = make_node("bravo")
    files = _rows(25_000)
    add_transfer(node.store, files=files, **TRANSFER_ROW)
    digests = [n.to_bytes(32, "big") for n in range(len(files))]
    seen = set()

    async def watch_the_steps():
        while (done := node.store._db.execute("SELECT count(sha256) FROM files").fetchone()[0]) < len(files):
            seen.add(done)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_the_steps)
        await node.set_file_sha256(TRANSFER_ROW["id"], digests)
    assert any(0 < n < len(files) for n in seen)  # it ran while the hashes were being set
    assert [f.sha256 for f in node.store.files(TRANSFER_ROW["id"])] == digests


async def test_returning_memory_at_a_connection_end_never_raises(monkeypatch, caplog):
    """It runs in the `finally` of every peer connection: if no worker thread
    can be started, the connection still ends cleanly and the daemon goes on."""
    async def no_thread(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(tuning.trio.to_thread, "run_sync", no_thread)
    await tuning.release_free_memory_at_end()
    assert "could not return free memory to the system: can't start new thread" in caplog.text


INFINITY = resource.RLIM_INFINITY


@pytest.mark.parametrize(
    "soft, hard, raised_to, warned",
    [
        (1024, 524288, 65536, False),
        (1024, 4096, 4096, False),
        (1024, INFINITY, 65536, False),
        (100000, INFINITY, None, False),
        (INFINITY, INFINITY, None, False),
        (1024, 1024, None, True),  # nothing to raise: the operator is told
        (256, 1024, 1024, True),
    ],
)
def test_the_daemon_raises_its_soft_limit_on_open_files_never_lowers_it(monkeypatch, caplog, soft, hard, raised_to, warned):
    # A receiver may hold hundreds of descriptors per transfer; services
    # often start with a soft limit of 1024 under a far higher hard one.
    set_to = []
    monkeypatch.setattr(tuning.resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(tuning.resource, "setrlimit", lambda which, limits: set_to.append(limits))
    tuning.raise_descriptor_limit()
    assert set_to == ([] if raised_to is None else [(raised_to, hard)])
    assert ("Too many open files" in caplog.text) is warned


@pytest.mark.parametrize("refusal", [ValueError("not allowed"), OSError(errno.EPERM, "Operation not permitted")])
def test_a_limit_that_cannot_be_raised_is_reported_and_the_daemon_goes_on(monkeypatch, caplog, refusal):
    def refuse(which, limits):
        raise refusal

    monkeypatch.setattr(tuning.resource, "getrlimit", lambda which: (1024, 524288))
    monkeypatch.setattr(tuning.resource, "setrlimit", refuse)
    tuning.raise_descriptor_limit()
    assert "could not raise the limit of 1024 open files to 65536" in caplog.text
    assert "only 1024 files may be open at once" in caplog.text


def test_a_daemon_process_ends_up_with_the_raised_limit():
    script = (
        "import resource\n"
        "from dorothy.dorothyd import tuning\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "tuning.apply()\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    soft, hard = map(int, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split())
    assert soft == (tuning.DESCRIPTORS_WANTED if hard == INFINITY else min(hard, tuning.DESCRIPTORS_WANTED)) > 256


def test_a_same_size_overwrite_right_after_a_settled_stamp_changes_the_stamp(tmp_path):
    """A kept hash state is reused only while its stamp holds; a rewrite in
    the same file-time tick as the last write must not go unnoticed."""
    (tmp_path / "0").write_bytes(b"a" * 4096)
    stamp = settled_partial_stamp(tmp_path)
    assert stamp is not None and partial_stamp(tmp_path) == stamp  # nothing changed: reusable
    with open(tmp_path / "0", "r+b") as f:
        f.write(b"b")
    assert partial_stamp(tmp_path) != stamp


def test_a_stamp_of_a_missing_directory_is_never_taken(tmp_path):
    assert settled_partial_stamp(tmp_path / "gone") is None and partial_stamp(tmp_path / "gone") is None


def test_no_stamp_is_kept_when_a_file_time_is_ahead_of_the_clock(tmp_path):
    """Waiting for the clock to pass a time set in the future (by hand, or
    by a file server whose clock is ahead) could hold a connection's end
    for as long; the state is not kept instead."""
    (tmp_path / "0").write_bytes(b"a")
    ahead = time.time_ns() + 2_000_000_000
    os.utime(tmp_path / "0", ns=(ahead, ahead))
    assert settled_partial_stamp(tmp_path) is None  # at once: without the rule, a digest after 2 s
