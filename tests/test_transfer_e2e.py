"""End to end over trio in-memory streams: the real sender and receiver code
of two in-process nodes, with the connection cut at every message boundary
in each direction, each run resuming to identical bytes."""

import contextlib
import errno
import gc
import hashlib
import os
import shutil
import sqlite3
import threading

import pytest
import trio
import trio.testing

from dorothy.dorothyd import audit, outbox, queueing, receiving, sources, storage
from dorothy.dorothyd.channel import accept, initiate
from dorothy.dorothyd.node import Running
from dorothy.dorothyd.queueing import cancel_transfer, queue_transfer
from dorothy.dorothyd.receiving import Incoming
from dorothy.dorothyd.sending import TransferAborted, deliver, notify_ended
from dorothy.dorothyd.sources import SourceChanged, SourceReader, SourceUnavailable
from dorothy.dorothyd.storage import TREE, PartialFiles
from dorothy.protocol.transfer import ReceiverMachine

from conftest import introduce
from hostile import LongestStep

CHUNK = 1 << 16


class CutAfter(trio.abc.HalfCloseableStream):
    """Passes `limit` send_all calls (one frame each), then cuts the link."""

    def __init__(self, inner, limit: int | None, log: list):
        self.inner, self.limit, self.log = inner, limit, log

    async def send_all(self, data):
        if self.limit is not None and len(self.log) >= self.limit:
            await self.inner.aclose()
            raise trio.BrokenResourceError("cut by test")
        self.log.append(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self):
        await self.inner.send_eof()

    async def aclose(self):
        await self.inner.aclose()


async def attempt(sender, receiver, transfer_id, *, cut_sender=None, cut_receiver=None, job=deliver):
    """One connection on which the sender runs `job` (deliver, or
    notify_ended): returns (frames sent by the sender, by the receiver, errors)."""
    a, b = trio.testing.memory_stream_pair()
    sent_s, sent_r, errors = [], [], []
    a, b = CutAfter(a, cut_sender, sent_s), CutAfter(b, cut_receiver, sent_r)
    peer_of_receiver = sender.trust.get(receiver.config.name)
    peer_of_sender = receiver.trust.get(sender.config.name)

    async def sending():
        try:
            channel = await initiate(a, sender.identity, receiver.node_key.dh_public, idle_timeout=30)
            row = sender.store.get(transfer_id)
            try:
                if job is deliver:
                    await deliver(sender, row, peer_of_receiver, Running(trio.CancelScope()), channel)
                else:
                    await job(sender, row, peer_of_receiver, channel)
            finally:
                await channel.close()
        except Exception as exc:  # noqa: BLE001 - the test inspects every outcome
            errors.append(exc)
            await trio.aclose_forcefully(a)

    async def receiving():
        try:
            channel = await accept(b, receiver.identity, lambda key: receiver.peer_for_static(key) is not None, idle_timeout=30)
            try:
                await Incoming(receiver, channel, peer_of_sender).run()
            finally:
                await channel.close()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
            await trio.aclose_forcefully(b)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sending)
        nursery.start_soon(receiving)
    return sent_s, sent_r, errors


def make_tree(root):
    files = {
        "case/a.bin": os.urandom(3 * CHUNK + CHUNK // 2),
        "case/empty": b"",
        "case/exact.bin": os.urandom(2 * CHUNK),
        "case/sub/ünï\ncode;name.txt": b"evidence\n" * 100,
        # many files of at most one chunk travel in batches
        **{f"case/many/{i:02d}.txt": os.urandom(i * 37) for i in range(8)},
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def chunk_frames(frames: list[int]) -> int:
    # Random chunk data does not compress, so chunk records are the only
    # frames of at least half a chunk (the text file compresses far below).
    return sum(1 for n in frames if n >= CHUNK // 2)


async def setup_pair(make_node, tmp_path):
    sender = make_node("alpha", chunk_size=CHUNK)
    receiver = make_node("bravo", chunk_size=CHUNK)
    introduce(sender, receiver)
    files = make_tree(tmp_path / "src")
    transfer_id = await queue_transfer(sender, "bravo", [str(tmp_path / "src" / "case")])
    return sender, receiver, files, transfer_id


def assert_delivered(sender, receiver, files, transfer_id):
    assert sender.store.get(transfer_id)["state"] == "done"
    assert receiver.store.get(transfer_id)["state"] == "done"
    inbox = receiver.home.inbox_dir / "alpha" / transfer_id
    assert {p.relative_to(inbox).as_posix(): p.read_bytes() for p in inbox.rglob("*") if p.is_file()} == files
    received = {f.path: f.sha256 for f in receiver.store.files(transfer_id)}
    assert received == {rel: hashlib.sha256(data).digest() for rel, data in files.items()}
    assert not (receiver.home.partial_dir / transfer_id).exists()
    assert receiver.store.chunks(transfer_id) == {}  # held-chunk rows go with the partial files
    for node in (sender, receiver):
        result = audit.verify_ledger(node.home.ledger_dir / "ledger.bin", node.node_key.sign_public)
        assert result.ok, result
    a = audit.read_records(sender.home.ledger_dir / "ledger.bin")
    b = audit.read_records(receiver.home.ledger_dir / "ledger.bin")
    assert audit.reconcile(a, b) == []


async def delivered_by_a_clean_attempt(sender, receiver, files, transfer_id):
    _, _, errors = await attempt(sender, receiver, transfer_id)
    assert errors == []
    assert_delivered(sender, receiver, files, transfer_id)


async def test_transfer_completes_in_one_connection(make_node, tmp_path):
    sender, receiver, files, transfer_id = await setup_pair(make_node, tmp_path)
    sent_s, _, errors = await attempt(sender, receiver, transfer_id)
    assert errors == []
    assert_delivered(sender, receiver, files, transfer_id)
    assert chunk_frames(sent_s) == 3 + 1 + 2  # every chunk of the two random files exactly once


async def test_a_file_of_one_chunk_travels_in_one_record_with_its_sha256(make_node, tmp_path, monkeypatch):
    sender, receiver, files, transfer_id = await setup_pair(make_node, tmp_path)
    seen = []
    receive = ReceiverMachine.receive

    def recording(machine, message):
        seen.append((type(message).__name__, getattr(message, "file", None), getattr(message, "sha256", None)))
        return receive(machine, message)

    monkeypatch.setattr(ReceiverMachine, "receive", recording)
    await delivered_by_a_clean_attempt(sender, receiver, files, transfer_id)
    for row in sender.store.files(transfer_id):
        records = [(kind, digest) for kind, file, digest in seen if file == row.idx]
        if 0 < row.size <= CHUNK:  # one chunk, and no file_done after it
            assert records == [("Chunk", row.sha256)], row.path
        else:  # chunks without a hash, then the file_done
            assert records == [("Chunk", None)] * -(-row.size // CHUNK) + [("FileDone", row.sha256)], row.path


async def test_transfers_queued_one_after_another_each_offer_their_own_manifest(make_node, tmp_path):
    # The node keeps the manifest it signed last for that transfer's first
    # delivery; the one queued before it must be read from the state db.
    sender, receiver, first_files, first = await setup_pair(make_node, tmp_path)
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "note.txt").write_bytes(b"queued second, delivered second")
    second = await queue_transfer(sender, "bravo", [str(tmp_path / "later" / "note.txt")])
    await delivered_by_a_clean_attempt(sender, receiver, first_files, first)
    await delivered_by_a_clean_attempt(sender, receiver, {"note.txt": b"queued second, delivered second"}, second)


@pytest.mark.parametrize(
    "files",
    [{"case/empty": b""}, {"case/a.bin": bytes(8 * CHUNK), "case/z-empty": b""}],
    ids=["only-an-empty-file", "8-chunks-then-an-empty-file"],
)
async def test_empty_files_at_the_end_of_a_transfer_arrive(make_node, tmp_path, files):
    # An empty file has no chunk of its own; as the last file its slot would
    # lie past the end of the have-map (here: 8 chunks, a whole byte).
    sender, receiver = make_node("alpha", chunk_size=CHUNK), make_node("bravo", chunk_size=CHUNK)
    introduce(sender, receiver)
    for rel, data in files.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(data)
    transfer_id = await queue_transfer(sender, "bravo", [str(tmp_path / "src" / "case")])
    await delivered_by_a_clean_attempt(sender, receiver, files, transfer_id)


async def count_frames(make_node, tmp_path):
    sender, receiver, _, transfer_id = await setup_pair(make_node, tmp_path / "probe")
    sent_s, sent_r, errors = await attempt(sender, receiver, transfer_id)
    assert errors == []
    return len(sent_s), len(sent_r)


@pytest.mark.parametrize("side", ["sender", "receiver"])
async def test_cut_at_every_message_boundary_resumes_to_identical_bytes(make_node, tmp_path, side):
    frames_s, frames_r = await count_frames(make_node, tmp_path)
    boundaries = frames_s if side == "sender" else frames_r
    for cut in range(boundaries):
        root = tmp_path / f"{side}-{cut}"
        root.mkdir()
        sender, receiver, files, transfer_id = await setup_pair(make_node, root)
        kwargs = {"cut_sender": cut} if side == "sender" else {"cut_receiver": cut}
        first_s, _, errors = await attempt(sender, receiver, transfer_id, **kwargs)
        second_s = []
        if errors:
            second_s, _, errors = await attempt(sender, receiver, transfer_id)
            assert errors == [], f"resume after cut at {side} frame {cut}: {errors}"
        else:
            # Only the closing record comes after the receipt: losing it
            # loses nothing.
            assert cut == boundaries - 1, f"cut at {side} frame {cut} went unnoticed"
        assert_delivered(sender, receiver, files, transfer_id)
        # Everything that arrived before the cut was kept: no chunk travels
        # twice (a cut exactly at a boundary leaves none half-sent).
        assert chunk_frames(first_s) + chunk_frames(second_s) == 6, f"cut at {side} frame {cut}"


async def test_a_source_that_changes_fails_the_transfer_at_both_ends(make_node, tmp_path):
    """The receiver holds part of it when the sender finds a source changed:
    the sender fails it for good and tells the receiver on a fresh
    connection, which then fails it too and keeps nothing."""
    sender, receiver, files, transfer_id = await setup_pair(make_node, tmp_path)
    last = sender.store.files(transfer_id)[-1]
    with open(os.fsdecode(last.source), "ab") as f:
        f.write(b" altered after it was queued")
    _, _, errors = await attempt(sender, receiver, transfer_id)
    changed = [leaf for leaf in map(outbox.first_leaf, errors) if isinstance(leaf, SourceChanged)]
    assert changed, errors
    assert len(receiver.store.chunks(transfer_id)) > 0  # it got what came before
    sender.running[transfer_id] = Running(trio.CancelScope())
    await outbox._classify(sender, sender.store.get(transfer_id), changed[0], changed[0])
    failed = sender.store.get(transfer_id)
    assert failed["state"] == "failed" and failed["notify_peer"] == 1
    # The receiver's close is what tells the sender the abort was acted on:
    # cut before it, and the notice stays due.
    _, _, errors = await attempt(sender, receiver, transfer_id, job=notify_ended, cut_receiver=2)
    assert errors and sender.store.get(transfer_id)["notify_peer"] == 1
    _, _, errors = await attempt(sender, receiver, transfer_id, job=notify_ended)
    assert errors == []
    assert sender.store.get(transfer_id)["notify_peer"] == 0
    got = receiver.store.get(transfer_id)
    assert got["state"] == "failed" and "changed after it was queued" in got["error"]
    assert not (receiver.home.partial_dir / transfer_id).exists()
    assert receiver.store.chunks(transfer_id) == {}
    assert not (receiver.home.inbox_dir / "alpha" / transfer_id).exists()


@pytest.mark.parametrize("ended_by", ["receiving-operator", "sending-operator"])
async def test_a_transfer_that_ends_for_good_leaves_no_copy_behind(make_node, tmp_path, ended_by):
    """Part of it arrived, under the manifest's names in the partial tree
    (and, after a crash during publication in a build before that tree,
    in a hidden staging folder in the inbox); once either operator
    cancels, none of it stays on the receiver."""
    sender, receiver, files, transfer_id = await setup_pair(make_node, tmp_path)
    await attempt(sender, receiver, transfer_id, cut_sender=4)
    assert any(p.is_file() for p in (receiver.home.partial_dir / transfer_id).rglob("*"))
    staging = receiver.home.inbox_dir / "alpha" / f".{transfer_id}.incoming"
    (staging / "case").mkdir(parents=True)
    (staging / "case" / "a.bin").write_bytes(files["case/a.bin"])
    if ended_by == "receiving-operator":
        await cancel_transfer(receiver, receiver.store.get(transfer_id))
    else:
        await cancel_transfer(sender, sender.store.get(transfer_id))
        _, _, errors = await attempt(sender, receiver, transfer_id, job=notify_ended)
        assert errors == []
    assert receiver.store.get(transfer_id)["state"] == "cancelled"
    assert not (receiver.home.partial_dir / transfer_id).exists()
    assert os.listdir(receiver.home.inbox_dir / "alpha") == []


def test_a_source_that_cannot_be_opened_for_now_is_not_a_changed_source(tmp_path, monkeypatch):
    """Too many open files or an I/O error may pass; a deleted file will not."""
    source = tmp_path / "a.bin"
    source.write_bytes(b"evidence")
    st, name = source.stat(), os.fsencode(source)
    real_open = os.open

    def too_many_open_files(path, *args, **kwargs):
        if path == name:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sources.os, "open", too_many_open_files)
    with pytest.raises(SourceUnavailable):
        SourceReader(name, st.st_size, st.st_mtime_ns, "a.bin")
    monkeypatch.undo()
    source.unlink()
    with pytest.raises(SourceChanged):
        SourceReader(name, st.st_size, st.st_mtime_ns, "a.bin")


async def test_an_unavailable_source_leaves_the_transfer_waiting_for_a_retry(make_node, tmp_path):
    sender, receiver, files, transfer_id = await setup_pair(make_node, tmp_path)
    sender.running[transfer_id] = Running(trio.CancelScope())
    cause = SourceUnavailable(errno.EIO, "'case/a.bin': cannot read: Input/output error")
    await outbox._classify(sender, sender.store.get(transfer_id), cause, cause)
    row = sender.store.get(transfer_id)
    assert row["state"] == "waiting" and row["notify_peer"] == 0
    assert row["error"] == "source unavailable, will retry: 'case/a.bin': cannot read: Input/output error"


async def test_a_cancel_while_a_cut_attempt_saves_its_chunks_leaves_nothing(make_node, tmp_path, monkeypatch):
    """The connection drops; while the receiver makes what arrived durable,
    its operator cancels. The attempt ends in an error, and the cancelled
    copy must go all the same: no partial files, no held-chunk rows."""
    sender, receiver, files, transfer_id = await setup_pair(make_node, tmp_path)
    save = Incoming._flush_quietly
    cancels = []

    async def flush_quietly_while_the_operator_cancels(self, partial, machine):
        if not cancels:
            cancels.append(await cancel_transfer(receiver, receiver.store.get(transfer_id)))
        await save(self, partial, machine)

    monkeypatch.setattr(Incoming, "_flush_quietly", flush_quietly_while_the_operator_cancels)
    await attempt(sender, receiver, transfer_id, cut_sender=4)
    assert cancels and receiver.store.get(transfer_id)["state"] == "cancelled"
    assert not (receiver.home.partial_dir / transfer_id).exists()
    assert receiver.store.chunks(transfer_id) == {}


class FirstFlushWaitsForAWrite:
    """Holds the first flush of a transfer until a write batch has run beside
    it (at most 10 s: a receiver that stopped writing for the flush fails the
    test), then runs it, or fails it with EIO. Records what is written
    beside it and what is recorded held, and when."""

    def __init__(self, monkeypatch, receiver, *, fail: bool):
        self.changed = threading.Condition()
        self.flushes = self.writes_beside = self.written = 0
        self.flushing = False
        self.written_before_first = None
        self.held: list[tuple[int, bool]] = []  # (chunks recorded held, while the first flush ran)
        flusher, write_batch, add_chunks = PartialFiles.flusher, PartialFiles.write_batch, receiver.store.add_chunks

        def held_first(partial):
            flush = flusher(partial)  # on the event loop, with no write running
            with self.changed:
                self.flushes += 1
                if self.flushes > 1:
                    return flush
                self.flushing, self.written_before_first = True, self.written

            def first():
                with self.changed:
                    self.changed.wait_for(lambda: self.writes_beside > 0, timeout=10)
                try:
                    if fail:
                        raise OSError(errno.EIO, "injected writeback failure")
                    flush()
                finally:
                    with self.changed:
                        self.flushing = False

            return first

        def counted_write_batch(partial, actions):
            with self.changed:
                self.written += len(actions)
                if self.flushing:
                    self.writes_beside += 1
                    self.changed.notify_all()
            return write_batch(partial, actions)

        def counted_add_chunks(transfer_id, chunks, *args, **kwargs):
            self.held.append((len(chunks), self.flushing))
            return add_chunks(transfer_id, chunks, *args, **kwargs)

        monkeypatch.setattr(receiving, "FLUSH_CHUNKS", 2)
        monkeypatch.setattr(PartialFiles, "flusher", held_first)
        monkeypatch.setattr(PartialFiles, "write_batch", counted_write_batch)
        monkeypatch.setattr(receiver.store, "add_chunks", counted_add_chunks)


async def one_file_pair(make_node, tmp_path, chunks: int):
    sender, receiver = make_node("alpha", chunk_size=CHUNK), make_node("bravo", chunk_size=CHUNK)
    introduce(sender, receiver)
    data = os.urandom(chunks * CHUNK)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "image.bin").write_bytes(data)
    transfer_id = await queue_transfer(sender, "bravo", [str(tmp_path / "src" / "image.bin")])
    return sender, receiver, {"image.bin": data}, transfer_id


async def test_writing_goes_on_while_a_flush_runs_and_its_chunks_are_held_only_after(make_node, tmp_path, monkeypatch):
    """A flush (for a folder of small files, a syncfs of tens of ms) runs in
    a thread of its own: received chunks are written meanwhile, and the
    chunks it covers, only those, are recorded as held once it returns."""
    sender, receiver, files, transfer_id = await one_file_pair(make_node, tmp_path, 40)
    probe = FirstFlushWaitsForAWrite(monkeypatch, receiver, fail=False)
    _, _, errors = await attempt(sender, receiver, transfer_id)
    assert errors == []
    assert probe.flushes > 1 and probe.writes_beside > 0
    assert probe.held[0] == (probe.written_before_first, False)  # not the chunks written beside it
    assert not any(during for _, during in probe.held)
    assert_delivered(sender, receiver, files, transfer_id)


async def test_after_a_failed_flush_nothing_more_of_the_attempt_is_held(make_node, tmp_path, monkeypatch):
    """After a failed fsync the kernel may mark pages clean that never reached
    the disk, among them writes that ran beside the flush, and a later fsync
    of the same file succeeds: the attempt records nothing more as held, and
    the next one fetches those chunks again."""
    sender, receiver, files, transfer_id = await one_file_pair(make_node, tmp_path, 40)
    probe = FirstFlushWaitsForAWrite(monkeypatch, receiver, fail=True)
    await attempt(sender, receiver, transfer_id)
    assert probe.writes_beside > 0 and probe.held == []
    assert receiver.store.get(transfer_id)["state"] == "waiting"
    assert "injected writeback failure" in receiver.store.get(transfer_id)["error"]
    assert receiver.store.chunks(transfer_id) == {}
    monkeypatch.undo()
    await delivered_by_a_clean_attempt(sender, receiver, files, transfer_id)


async def test_files_held_for_their_check_bring_a_flush_forward(make_node, tmp_path, monkeypatch):
    """Where syncfs is not trusted, a receiver keeps a descriptor of each
    file it wrote until a flush has checked it: it bounds its batches by
    count and flushes early, rather than hold one per file of a folder."""
    monkeypatch.setattr(storage, "SYNCFS", storage.Syncfs.LEAVES)
    monkeypatch.setattr(storage, "MAX_OPEN_FILES", 4)
    monkeypatch.setattr(storage, "MAX_HELD_FOR_CHECK", 8)
    monkeypatch.setattr(receiving, "MAX_QUEUED_CHUNKS", 8)
    sender, receiver = make_node("alpha", chunk_size=CHUNK), make_node("bravo", chunk_size=CHUNK)
    introduce(sender, receiver)
    files = {f"case/{i:03d}.bin": os.urandom(512) for i in range(300)}
    for rel, data in files.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(data)
    transfer_id = await queue_transfer(sender, "bravo", [str(tmp_path / "src" / "case")])
    partial_dir = str(receiver.home.partial_dir)
    peak = 0
    evict = PartialFiles._evict

    def counted(partial):
        nonlocal peak
        evict(partial)
        held = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, gone by now
                held += os.readlink(f"/proc/self/fd/{fd}").startswith(partial_dir)
        peak = max(peak, held)

    batches = []
    write_batch = PartialFiles.write_batch

    def recorded(partial, actions):
        batches.append(len(actions))
        return write_batch(partial, actions)

    monkeypatch.setattr(PartialFiles, "_evict", counted)
    monkeypatch.setattr(PartialFiles, "write_batch", recorded)
    await delivered_by_a_clean_attempt(sender, receiver, files, transfer_id)
    assert max(batches) == 8  # reached, never passed
    # At worst: 4 open files; 16 held (up to the mark, plus a batch of 8);
    # as many taken over by a running flush, with its duplicates of the 4
    # open ones and of the tree's root; the tree and its directory. Far
    # below one per file.
    assert peak <= 4 + 16 + (16 + 4 + 1) + 2, peak


async def test_a_flush_with_no_thread_to_run_it_lets_its_descriptors_go(make_node, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "SYNCFS", storage.Syncfs.LEAVES)
    monkeypatch.setattr(storage, "MAX_OPEN_FILES", 4)
    sender, receiver, files, transfer_id = await setup_pair(make_node, tmp_path)
    in_flight = receiving.InFlight

    def no_thread_for_a_flush(actions, fn, *args):
        if fn is receiving._make_durable:
            raise RuntimeError("can't start new thread")
        return in_flight(actions, fn, *args)

    monkeypatch.setattr(receiving, "InFlight", no_thread_for_a_flush)
    _, _, errors = await attempt(sender, receiver, transfer_id)
    assert any("can't start new thread" in str(error) for error in errors), errors
    partial_dir = str(receiver.home.partial_dir)
    left = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, gone by now
            if os.readlink(f"/proc/self/fd/{fd}").startswith(partial_dir):
                left.append(fd)
    assert left == []


class PartialReads:
    """Counts the bytes read back from a receiver's partial files."""

    def __init__(self, monkeypatch, receiver):
        self.bytes = 0
        partial_dir = str(receiver.home.partial_dir)
        pread = os.pread

        def counted(fd, length, offset):
            data = pread(fd, length, offset)
            if os.readlink(f"/proc/self/fd/{fd}").startswith(partial_dir):
                self.bytes += len(data)
            return data

        monkeypatch.setattr(os, "pread", counted)


def held_bytes(receiver, transfer_id) -> int:
    return receiver.store.get(transfer_id)["bytes_done"]


async def cut_after_part_is_held(make_node, tmp_path, monkeypatch):
    """A 40-chunk image whose first connection is cut after 25 frames, with
    flushes every 2 chunks: the receiver holds part of it."""
    sender, receiver, files, transfer_id = await one_file_pair(make_node, tmp_path, 40)
    monkeypatch.setattr(receiving, "FLUSH_CHUNKS", 2)
    _, _, errors = await attempt(sender, receiver, transfer_id, cut_sender=25)
    assert errors  # the cut was noticed
    return sender, receiver, files, transfer_id


async def test_after_a_dropped_connection_the_receiver_reads_back_nothing_it_holds(make_node, tmp_path, monkeypatch):
    """The chunks it holds were written by this process, and the files'
    SHA-256 state was kept: the next connection re-reads none of them (for
    an image of 500 GB, minutes of disk reads each time)."""
    sender, receiver, files, transfer_id = await cut_after_part_is_held(make_node, tmp_path, monkeypatch)
    assert held_bytes(receiver, transfer_id) >= 10 * CHUNK
    reads = PartialReads(monkeypatch, receiver)
    _, _, errors = await attempt(sender, receiver, transfer_id)
    assert errors == []
    assert reads.bytes == 0
    assert_delivered(sender, receiver, files, transfer_id)


async def test_after_a_restart_the_receiver_reads_back_every_held_chunk(make_node, tmp_path, monkeypatch):
    """Damage while the node was down is found by reading each held chunk
    against its check, which also rebuilds the files' SHA-256 state."""
    sender, receiver, files, transfer_id = await cut_after_part_is_held(make_node, tmp_path, monkeypatch)
    held = held_bytes(receiver, transfer_id)
    assert held >= 10 * CHUNK
    receiver.received_hashes.clear()  # what a restart forgets
    reads = PartialReads(monkeypatch, receiver)
    _, _, errors = await attempt(sender, receiver, transfer_id)
    assert errors == []
    assert reads.bytes == held
    assert_delivered(sender, receiver, files, transfer_id)


async def test_a_re_verification_the_sender_gave_up_waiting_for_is_not_repeated(make_node, tmp_path, monkeypatch):
    """After a restart, re-reading 250 GB held of a 500 GB image takes longer
    than a sender waits for the answer to its offer. The connection is gone
    when the answer is ready, but the work is kept: the next offer is
    answered at once, reading nothing (else every attempt would start the
    re-reading again, and time out again)."""
    sender, receiver, files, transfer_id = await cut_after_part_is_held(make_node, tmp_path, monkeypatch)
    held = held_bytes(receiver, transfer_id)
    assert held >= 10 * CHUNK
    receiver.received_hashes.clear()  # what a restart forgets
    reads = PartialReads(monkeypatch, receiver)
    _, sent_r, errors = await attempt(sender, receiver, transfer_id, cut_receiver=1)  # its answer to the offer
    assert errors and len(sent_r) == 1  # the handshake went out; the answer did not
    assert reads.bytes == held
    _, _, errors = await attempt(sender, receiver, transfer_id)
    assert errors == []
    assert reads.bytes == held  # nothing more
    assert_delivered(sender, receiver, files, transfer_id)


@pytest.mark.parametrize("change", ["overwritten", "removed", "earlier-layout"])
async def test_partial_files_changed_between_connections_are_read_back(make_node, tmp_path, monkeypatch, change):
    """The kept SHA-256 state describes the partial files as this process
    left them. Changed since (damage, a local tamperer, a clean-up that
    removed them, an earlier build's layout that named them by index),
    they are read back and checked as after a restart: never a receipt for
    a hash of bytes that are no longer on disk, nor a file published that
    is not in the manifest."""
    sender, receiver, files, transfer_id = await cut_after_part_is_held(make_node, tmp_path, monkeypatch)
    assert transfer_id in receiver.received_hashes
    partial = receiver.home.partial_dir / transfer_id
    if change == "overwritten":
        with open(partial / TREE / "image.bin", "r+b") as f:  # inside chunk 0, which is held
            f.seek(5)
            f.write(b"XXXX")
    elif change == "earlier-layout":
        # As a build before the partial tree left it, after a crash during
        # publication: a file by index, and a hidden staging folder in the inbox.
        shutil.move(partial / TREE / "image.bin", partial / "0")
        staging = receiver.home.inbox_dir / "alpha" / f".{transfer_id}.incoming"
        staging.mkdir(parents=True)
        (staging / "image.bin").write_bytes(b"part of the evidence")
    else:
        shutil.rmtree(partial)
    await delivered_by_a_clean_attempt(sender, receiver, files, transfer_id)
    assert os.listdir(receiver.home.inbox_dir / "alpha") == [transfer_id]


async def test_a_copy_dropped_for_good_leaves_no_hash_state_even_if_recording_that_fails(make_node, tmp_path, monkeypatch):
    """A permanent refusal removes the partial files, then the records of
    held chunks; when that second step fails (a full disk), the files are
    gone but still listed as held. The hash state went first, so the next
    connection reads back, finds nothing, and fetches it all again."""
    sender, receiver, files, transfer_id = await one_file_pair(make_node, tmp_path, 40)
    monkeypatch.setattr(receiving, "FLUSH_CHUNKS", 2)
    receive, messages_seen = receiving.ReceiverMachine.receive, []

    def refused_at_the_24th(machine, message):
        messages_seen.append(message)
        if len(messages_seen) == 24:
            raise receiving.RemoteProtocolError("injected refusal", code="bad_chunk")
        return receive(machine, message)

    drop_chunks = receiver.store.drop_chunks

    def fails_to_drop_all(transfer_id, slots=None):
        if slots is None:
            raise sqlite3.OperationalError("database or disk is full")
        return drop_chunks(transfer_id, slots)

    monkeypatch.setattr(receiving.ReceiverMachine, "receive", refused_at_the_24th)
    monkeypatch.setattr(receiver.store, "drop_chunks", fails_to_drop_all)
    await attempt(sender, receiver, transfer_id)
    assert not (receiver.home.partial_dir / transfer_id).exists() and held_bytes(receiver, transfer_id) > 0
    assert transfer_id not in receiver.received_hashes
    monkeypatch.undo()
    await delivered_by_a_clean_attempt(sender, receiver, files, transfer_id)


async def test_hash_states_past_the_memory_bound_are_not_kept(make_node, tmp_path, monkeypatch):
    monkeypatch.setattr(receiving, "KEPT_FILES_MAX", 0)
    sender, receiver, files, transfer_id = await cut_after_part_is_held(make_node, tmp_path, monkeypatch)
    held = held_bytes(receiver, transfer_id)
    assert held > 0 and transfer_id not in receiver.received_hashes
    reads = PartialReads(monkeypatch, receiver)
    _, _, errors = await attempt(sender, receiver, transfer_id)
    assert errors == [] and reads.bytes == held
    assert_delivered(sender, receiver, files, transfer_id)


async def test_a_shutdown_while_the_last_chunks_are_written_waits_for_that_write(make_node, tmp_path, monkeypatch):
    """At `done` the chunks queued behind the batch in flight are written as
    one more batch. A shutdown landing while that batch runs: the cleanup
    waits for it, then saves what arrived; it neither writes a chunk twice
    nor closes the files under a running write."""
    sender, receiver, files, transfer_id = await one_file_pair(make_node, tmp_path, 20)  # queued within MAX_QUEUED_BYTES
    token = trio.lowlevel.current_trio_token()
    first_batch_may_go, cleanup_waits = threading.Event(), threading.Event()
    lock, state = threading.Lock(), {"batches": 0, "running": 0, "closed_under_write": 0, "armed": None, "settles": 0}
    written = []
    write_batch, close, drain, start_write, settle = (
        PartialFiles.write_batch, PartialFiles.close, Incoming._drain, Incoming._start_write, receiving.InFlight.settle)

    def controlled_write_batch(partial, actions):
        with lock:
            state["batches"] += 1
            state["running"] += 1
            first = state["batches"] == 1
        try:
            if first:  # hold it until `done`, so that every other chunk queues behind it
                assert first_batch_may_go.wait(10)
            elif actions is state["armed"]:
                trio.from_thread.run_sync(receiver.running[transfer_id].cancel_scope.cancel, trio_token=token)
                assert cleanup_waits.wait(10), "the cleanup went on without waiting for this write"
            written.extend((a.file, a.index) for a in actions)
            return write_batch(partial, actions)
        finally:
            with lock:
                state["running"] -= 1

    def checked_close(partial):
        state["closed_under_write"] += state["running"] > 0
        return close(partial)

    async def draining(self, partial, machine):
        first_batch_may_go.set()
        self._draining = True
        try:
            return await drain(self, partial, machine)
        finally:
            self._draining = False

    def arming_start_write(self, partial):
        if getattr(self, "_draining", False) and state["armed"] is None:
            state["armed"] = self._queued
        return start_write(self, partial)

    async def counted_settle(self):
        if state["armed"] is not None and self.actions is state["armed"]:
            state["settles"] += 1
            if state["settles"] == 2:  # the first is _drain's own, which the shutdown cancels
                cleanup_waits.set()
        return await settle(self)

    monkeypatch.setattr(PartialFiles, "write_batch", controlled_write_batch)
    monkeypatch.setattr(PartialFiles, "close", checked_close)
    monkeypatch.setattr(Incoming, "_drain", draining)
    monkeypatch.setattr(Incoming, "_start_write", arming_start_write)
    monkeypatch.setattr(receiving.InFlight, "settle", counted_settle)
    _, _, errors = await attempt(sender, receiver, transfer_id)
    assert errors and state["armed"] and cleanup_waits.is_set()
    assert len(written) == len(set(written)) == 20
    assert state["closed_under_write"] == 0
    assert held_bytes(receiver, transfer_id) == 20 * CHUNK  # everything that arrived was saved
    monkeypatch.undo()
    await delivered_by_a_clean_attempt(sender, receiver, files, transfer_id)


async def test_a_transfer_whose_publication_failed_keeps_no_hash_state(make_node, tmp_path, monkeypatch):
    """Finalization consumed the hash state (each file's SHA-256 completed,
    from disk where needed); if publishing then fails, the transfer waits,
    and the next connection starts from what is on disk."""
    sender, receiver, files, transfer_id = await one_file_pair(make_node, tmp_path, 8)

    def disk_fails(*args):
        raise OSError(errno.EIO, "injected publication failure")

    monkeypatch.setattr(PartialFiles, "publish", disk_fails)
    _, _, errors = await attempt(sender, receiver, transfer_id)
    assert [(type(e), e.aborted.code) for e in errors] == [(TransferAborted, "receiver_io_error")]  # told to retry
    assert receiver.store.get(transfer_id)["state"] == "waiting"
    assert transfer_id not in receiver.received_hashes
    monkeypatch.undo()
    await delivered_by_a_clean_attempt(sender, receiver, files, transfer_id)


async def test_a_transfer_published_before_its_receipt_is_not_cancelled_and_completes(make_node, tmp_path, monkeypatch):
    """A crash between publication and the receipt leaves a complete copy
    in the inbox: cancelling it would leave that copy under a transfer the
    ledger calls cancelled. The cancel is refused; the next connection
    records the transfer as received and delivered."""
    sender, receiver, files, transfer_id = await one_file_pair(make_node, tmp_path, 3)

    async def crash_before_the_receipt(self, digests):
        raise OSError(errno.EIO, "injected: the process died here")

    monkeypatch.setattr(Incoming, "_complete", crash_before_the_receipt)
    await attempt(sender, receiver, transfer_id)
    assert (receiver.home.inbox_dir / "alpha" / transfer_id).is_dir()
    assert receiver.store.get(transfer_id)["state"] == "waiting"
    with pytest.raises(queueing.RequestError, match="already complete in the inbox"):
        await cancel_transfer(receiver, receiver.store.get(transfer_id))
    monkeypatch.undo()
    await delivered_by_a_clean_attempt(sender, receiver, files, transfer_id)


async def test_an_attempt_that_hashed_a_chunk_it_does_not_hold_keeps_no_hash_state(make_node, tmp_path, monkeypatch):
    """A write batch fails after its chunks were hashed: they are not held,
    and will be received again. Were the SHA-256 state kept, bytes that
    differed the second time would be on disk but not in the hash; so the
    next connection reads back what is held, as after a restart."""
    sender, receiver, files, transfer_id = await one_file_pair(make_node, tmp_path, 40)
    monkeypatch.setattr(receiving, "FLUSH_CHUNKS", 2)
    write_batch, failed = PartialFiles.write_batch, []

    def hashed_then_failed(partial, actions):
        # The first batch holds only chunk 0, which is written and held.
        checks = write_batch(partial, actions)
        if not failed and any(action.index >= 20 for action in actions):
            failed.append(actions)
            raise OSError(errno.EIO, "injected write failure")
        return checks

    monkeypatch.setattr(PartialFiles, "write_batch", hashed_then_failed)
    await attempt(sender, receiver, transfer_id)
    held = held_bytes(receiver, transfer_id)
    assert failed and held > 0
    assert "injected write failure" in receiver.store.get(transfer_id)["error"]
    assert transfer_id not in receiver.received_hashes
    monkeypatch.undo()
    reads = PartialReads(monkeypatch, receiver)
    _, _, errors = await attempt(sender, receiver, transfer_id)
    assert errors == []
    assert reads.bytes >= held  # and, past a gap in what is held, more at the end for the SHA-256
    assert_delivered(sender, receiver, files, transfer_id)


async def test_queueing_and_offering_100000_files_does_not_stall_the_event_loop(make_node, tmp_path, monkeypatch):
    """Checking and signing a manifest of 100,000 names (at queueing), and
    checking it again (at each attempt), take half a second or more: in
    worker threads, the event loop serves everyone meanwhile. (The sources
    are never read: the attempt fails when it opens the first.) Steps take
    0.08-0.12 s here; the bound leaves room for a loaded machine.
    The garbage collector is off meanwhile: with a few hundred thousand
    objects alive (the suite's and the manifest's), one full collection
    takes 0.1-0.2 s of whichever step triggers it, a pause of CPython's
    and not what this test measures."""
    names = [sources.Source(f"case/d{n % 100}/evidence-{n:06d}.bin", b"/nonexistent", 100, 0) for n in range(100_000)]
    monkeypatch.setattr(queueing, "collect", lambda paths: names)
    sender, receiver = make_node("alpha", chunk_size=CHUNK), make_node("bravo", chunk_size=CHUNK)
    introduce(sender, receiver)
    steps = LongestStep()
    trio.lowlevel.add_instrument(steps)
    gc.disable()
    try:
        transfer_id = await queue_transfer(sender, "bravo", ["case"])
        _, _, errors = await attempt(sender, receiver, transfer_id)
    finally:
        gc.enable()
        trio.lowlevel.remove_instrument(steps)
    assert "evidence-000000.bin': cannot open" in repr(errors[0])  # the sender got as far as reading
    assert receiver.store.get(transfer_id) is not None  # after the receiver accepted the offer
    assert steps.longest < 0.3, f"event loop blocked for {steps.longest:.2f} s in one step"
