"""One incoming transfer over an authenticated channel: check the offer,
answer with what we hold, write and verify chunks, make them durable, then
publish the complete set and sign the receipt.

Durability order: chunk bytes are fsync'd before the chunk is recorded as
held; the files are published, the ledger record fsync'd and the state
committed before the receipt leaves this node.
"""

import bisect
import errno
import sqlite3
from pathlib import Path

import trio

from ..keys.truststore import Peer
from ..protocol import messages
from ..protocol.errors import RemoteProtocolError
from ..protocol.manifest import Manifest, open_manifest
from ..protocol.paths import quoted
from ..protocol.receipt import ReceiptBody, sign_receipt
from ..protocol.transfer import Aborted, Bitmap, Finalize, ReceiverMachine, WriteChunk
from . import tuning
from .channel import Channel
from .clock import iso_now
from .logs import log
from .node import Node, Running, node_key_bytes
from .storage import (
    PartialFiles, discard_received, hash_published, is_disk_full, partial_stamp, settled_partial_stamp,
)
from .store import FINAL_STATES

# Chunks are made durable (fdatasync, then recorded) at least this often:
# the most a crash can cost an in-flight transfer. The chunk count matters
# only for folders of small files, where each flush is a syncfs with a fixed
# cost that stalls the writes: 256 meant 40 of them per 10,000 files, and
# 2048 gave 2,737 against 2,498 files/s (median of 8 alternating runs).
FLUSH_BYTES = 64 << 20
FLUSH_CHUNKS = 2048
FLUSH_SECONDS = 1.0
# Held chunks are re-verified after a restart this many bytes per
# worker-thread hop: what bounds the slot list kept meanwhile, and how long
# a cancel or a shutdown waits for the hop to end (about a second).
VERIFY_PAGE_BYTES = 1 << 30
# Chunks queued behind a running write before the receiver stops reading:
# the back-pressure that bounds its memory, and, in count, the files a
# batch can leave held for a check (storage.MAX_HELD_FOR_CHECK): a batch of
# 2 MiB of 512-byte files would be 4,000 files and their descriptors.
MAX_QUEUED_BYTES = 2 << 20
MAX_QUEUED_CHUNKS = 128
# Files' SHA-256 states kept between connections (Incoming._keep_hashes),
# in all: they stay in memory while their transfers wait for the peer, and
# 100,000 finished files take 17 MiB.
KEPT_FILES_MAX = 100_000


def _slot_layout(manifest: Manifest, have: dict[int, int]) -> list[tuple[int, int, int, int]]:
    """(slot, file, offset, length) of each held chunk, in slot order. Walks
    the held slots only: an offer may declare millions of chunks."""
    bases = manifest.chunk_bases()
    layout = []
    for slot in sorted(have):
        index = bisect.bisect_right(bases, slot) - 1
        while manifest.chunk_count(index) <= slot - bases[index]:  # skip empty files sharing a base
            index += 1
        chunk = slot - bases[index]
        layout.append((slot, index, chunk * manifest.chunk_size, manifest.chunk_length(index, chunk)))
    return layout


def _make_durable(flush) -> None:
    """Worker thread: flush the partial files (PartialFiles.flusher), then
    hand freed chunk buffers back to the system. Without the trim, heap
    fragmentation let the peak creep with the transfer's length (4 GiB:
    receiver 55-58 MiB against 50-56 for 1 GiB); with it, 50-52 against
    49-50, at no measurable speed cost. It runs at each flush: every 64 MiB,
    2,048 chunks or second of writes at the most, and when a connection
    ends (a trim took 1-2 ms)."""
    flush()
    tuning.release_free_memory()


# Errors a retry cannot cure: the sender is told the transfer failed for
# good (and stops retrying) instead of seeing a dropped connection. Damage in
# transit shows up as decrypt_failed or truncated instead, and is retried.
PERMANENT_CODES = frozenset(
    {
        "bad_manifest", "bad_path", "bad_chunk", "bad_file_done", "unexpected_message",
        "incomplete", "malformed", "unknown_message", "too_large", "bad_signature",
    }
)


class InFlight:
    """A batch of writes, or a flush, running in a worker thread while the
    event loop goes on: `settle()` waits for it, `take()` gives its result.
    At most one of each per transfer at a time."""

    def __init__(self, actions: list[WriteChunk], fn, *args):
        self.actions = actions
        self._done = trio.Event()
        self._outcome = None
        token = trio.lowlevel.current_trio_token()

        def deliver(outcome) -> None:
            self._outcome = outcome
            token.run_sync_soon(self._done.set)

        trio.lowlevel.start_thread_soon(lambda: fn(*args), deliver)

    async def settle(self) -> None:
        await self._done.wait()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def take(self):
        """The result of a finished run, with no checkpoint: nothing can
        cancel the caller between taking it and acting on it."""
        return self._outcome.unwrap()


class Incoming:
    def __init__(self, node: Node, channel: Channel, peer: Peer):
        self.node = node
        self.channel = channel
        self.peer = peer
        self.id: str | None = None

    async def run(self) -> None:
        try:
            await self._run()
        except RemoteProtocolError as exc:
            if exc.code in PERMANENT_CODES:
                with trio.CancelScope(shield=True):
                    await self._fail_permanently(exc)
            raise

    async def _fail_permanently(self, exc: RemoteProtocolError) -> None:
        reason = f"refused by the receiver: {exc}"
        row = self.node.store.get(self.id) if self.id else None
        if row is not None and row["state"] in FINAL_STATES:
            return  # cancelled by the operator during this attempt: the peer was told so
        if row is not None and self.id not in self.node.running:
            # Registered as ending while the copy goes: a cancel is refused
            # meanwhile, and another connection offering it is told `busy`.
            self.node.running[self.id] = Running(trio.CancelScope(), ending=True)
            try:
                await self._drop_partial_copy()
                self.node.store.update(self.id, iso_now(), state="failed", error=reason)
                fields = {"transfer_id": self.id, "peer": self.peer.name, "direction": "in", "error": reason}
                await self.node.record("transfer_failed", fields)
            finally:
                del self.node.running[self.id]
        await self._abort_quietly(exc.code, reason)

    async def _drop_partial_copy(self) -> None:
        """The partial files, and the records of the chunks they held."""
        self.node.received_hashes.pop(self.id, None)  # first: it describes the files about to go
        await trio.to_thread.run_sync(discard_received, self.node.home.partial_dir, self._inbox, self.id)
        self.node.store.drop_chunks(self.id)

    @property
    def _inbox(self) -> Path:
        return self.node.home.peer_inbox(self.peer.name)

    async def _abort_quietly(self, code: str, reason: str) -> None:
        """A final abort on a connection that may already be gone: the peer
        then learns it from the answer to its next offer."""
        try:
            await self._abort(code, reason, final=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _run(self) -> None:
        offer = await self.channel.receive()
        if not isinstance(offer, messages.Offer):
            raise RemoteProtocolError("the first message must be an offer", code="unexpected_message")
        # Off the event loop: a manifest of 100,000 names takes a while to check.
        manifest, manifest_hash = await trio.to_thread.run_sync(open_manifest, offer.manifest)
        if manifest.sender != node_key_bytes(self.peer.node_key):
            raise RemoteProtocolError("manifest is signed by another node than the connected peer", code="bad_manifest")
        if manifest.receiver != node_key_bytes(self.node.node_key):
            raise RemoteProtocolError("manifest is addressed to another node", code="bad_manifest")
        self.manifest = manifest
        self.manifest_hash = manifest_hash
        self.id = manifest.transfer_id.hex()
        row = self.node.store.get(self.id)
        if self.id in self.node.running:  # another connection adds, checks or receives it right now
            return await self._abort("busy", "this transfer is already being received", final=False)
        if row is None:
            self.node.running[self.id] = Running(trio.CancelScope())
            try:
                await self._register(offer.manifest)
            finally:
                del self.node.running[self.id]
        elif row["direction"] != "in" or row["manifest_hash"] != manifest_hash:
            return await self._abort("conflict", "transfer id already used for other content", final=True)
        elif row["state"] == "done":
            return await self._resend_receipt(row)
        elif row["state"] in ("failed", "cancelled"):
            return await self._abort(row["state"], row["error"] or row["state"], final=True)
        # Held as ending while a copy published before a crash is hashed again
        # (minutes for a large one): another connection is told busy, not let
        # in to record the transfer a second time.
        self.node.running[self.id] = Running(trio.CancelScope(), ending=True)
        try:
            published = await self._published_digests()
            if published is not None:
                return await self._complete(published)
        finally:
            del self.node.running[self.id]
        with trio.CancelScope() as scope:
            running = self.node.running[self.id] = Running(scope)
            try:
                await self._receive(running)
            finally:
                del self.node.running[self.id]
                # Also when the attempt ends in an error: a cancel that landed
                # while it was saving what had arrived must not leave the copy.
                if running.cancelled_by_operator:
                    with trio.CancelScope(shield=True):
                        await self._drop_partial_copy()
                        await self._abort_quietly("cancelled", "cancelled by the receiving operator")

    async def _register(self, envelope: bytes) -> None:
        files = [(entry.path, None, entry.size, entry.mtime_ns) for entry in self.manifest.files]
        await self.node.add_file_rows(self.id, files)
        self.node.store.add_transfer_row(
            id=self.id,
            direction="in",
            peer=self.peer.name,
            peer_node_key=str(self.peer.node_key),
            state="active",
            manifest=envelope,
            manifest_hash=self.manifest_hash,
            bytes_total=self.manifest.total_bytes,
            now=iso_now(),
        )
        total = self.manifest.total_bytes
        log.info("incoming transfer %s from %s: %d files, %d bytes", self.id, self.peer.name, len(files), total)

    async def _abort(self, code: str, reason: str, *, final: bool) -> None:
        await self.channel.send(messages.Abort(code=code, reason=reason, final=final))

    async def _resend_receipt(self, row) -> None:
        checkpoint = await self.node.checkpoint()
        await self.channel.send(messages.Receipt(receipt=row["receipt"], checkpoint=checkpoint))

    async def _published_digests(self) -> list[bytes] | None:
        """After a crash between publishing into the inbox and recording
        the receipt: the digests of the published files, re-read."""
        final = self._inbox / self.id
        if not final.is_dir():
            return None  # the usual case: no file rows to read back
        files = await self.node.files(self.id)
        if any(f.sha256 is None for f in files):
            return None
        digests = await trio.to_thread.run_sync(hash_published, final, [f.path for f in files])
        if digests != [f.sha256 for f in files]:
            raise RemoteProtocolError("published files changed after a crash", code="internal")
        return digests

    async def _open_partial(self) -> tuple[PartialFiles, Bitmap, int]:
        """Open the partial files and re-verify every chunk recorded as held:
        damage while we were down is found here and fetched again. Held
        chunks are read from the state db a page at a time, so a resumed
        500 GB image costs no more memory than a small one. After a dropped
        connection, with this process still up, the chunks held were written
        or verified by it, and the files' SHA-256 state was kept
        (_keep_hashes): nothing is read back."""
        store, manifest = self.node.store, self.manifest
        paths, sizes = [entry.path for entry in manifest.files], [entry.size for entry in manifest.files]
        kept = self.node.received_hashes.pop(self.id, None)  # matches the held chunks until more are written
        directory = self.node.home.partial_dir / self.id
        if kept is not None and kept.stamp != await trio.to_thread.run_sync(partial_stamp, directory):
            log.warning("transfer %s: partial files changed since the last connection; reading them back", self.id)
            kept = None
        partial = await trio.to_thread.run_sync(PartialFiles, self.node.home.partial_dir, self.id, paths, sizes, kept)
        try:
            have = Bitmap(manifest.total_chunks)
            done_bytes, damaged, verified, last = 0, [], 0, -1
            started = trio.current_time()
            page = max(1, VERIFY_PAGE_BYTES // manifest.chunk_size)
            while held := store.chunks(self.id, after=last, limit=page):
                layout = _slot_layout(manifest, held)
                bad = set() if kept else set(await trio.to_thread.run_sync(partial.verify, held, layout))
                for slot, _, _, length in layout:
                    if slot not in bad:
                        have.add(slot)
                        done_bytes += length
                damaged.extend(bad)
                verified += len(layout)
                last = layout[-1][0]
            if verified and kept:
                log.info("transfer %s: resumed with %d held chunks, %d bytes, none read back", self.id, verified, done_bytes)
            elif verified:  # what a restart costs, for operators (and the bench)
                log.info("transfer %s: re-verified %d held chunks, %d bytes, in %.2f s",
                         self.id, verified, done_bytes, trio.current_time() - started)
            if damaged:
                log.warning("transfer %s: %d held chunks were damaged on disk; fetching them again", self.id, len(damaged))
                store.drop_chunks(self.id, damaged)
        except BaseException:
            partial.close()  # cancelled (or failed) between pages: no descriptor left behind
            raise
        return partial, have, done_bytes

    async def _receive(self, running: Running) -> None:
        store = self.node.store
        store.update(self.id, iso_now(), state="active", error=None)
        partial, have, self._done_bytes = await self._open_partial()
        self._bases = self.manifest.chunk_bases()
        self._pending: list[tuple[int, int, int, bytes]] = []  # (file, index, slot, check): written, not yet durable
        self._pending_bytes = 0
        self._pending_since = 0.0
        # A flush runs beside the writes that follow it; its chunks are
        # recorded as held once it is done (see _flushed).
        self._flushing: InFlight | None = None
        self._flush_failed = False
        # Chunks handed to the writer, and of those, recorded as held: equal
        # at the end when every chunk hashed is on disk (_keep_hashes).
        self._handed = self._held = 0
        self._running = running
        running.bytes_done = self._done_bytes
        machine = ReceiverMachine(self.manifest, have)
        # Chunks are written (copy, pwrite, SHA-256, check) in a worker thread
        # while the event loop receives and decrypts the next ones; those
        # that arrive meanwhile are written together in the next hop, so a
        # folder of small files does not pay a thread hop per file.
        self._writing: InFlight | None = None
        self._queued: list[WriteChunk] = []
        self._queued_bytes = 0
        try:
            await trio.to_thread.run_sync(partial.create_empty)
            await self.channel.send(machine.accept())
            while True:
                message = await self.channel.receive()
                if self._flushing is not None and self._flushing.finished:
                    await self._flushed(machine)
                if isinstance(message, messages.Done):
                    await self._drain(partial, machine)
                    await self._flush(partial, machine)
                action = machine.receive(message)
                if isinstance(action, WriteChunk):
                    await self._queue(action, partial, machine)
                elif isinstance(action, (Aborted, Finalize)):
                    await self._drain(partial, machine)
                    if isinstance(action, Aborted):
                        return await self._on_abort(action, partial)
                    return await self._finalize(partial, machine, action)
        except (OSError, sqlite3.OperationalError) as exc:
            # Local trouble (a full disk, an I/O error): the sender is told,
            # first, since recording it may fail for the same reason, and
            # retries later; what was already verified is kept.
            full = is_disk_full(exc) if isinstance(exc, OSError) else "full" in str(exc)
            code, reason = ("disk_full", "disk full on the receiving node") if full else (
                "receiver_io_error", f"the receiving node could not store the data: {exc}")
            log.warning("transfer %s: %s; the sender will retry", self.id, reason)
            with trio.CancelScope(shield=True):
                try:
                    await self._abort(code, reason, final=False)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                try:
                    store.update(self.id, iso_now(), state="waiting", error=reason)
                except sqlite3.OperationalError:
                    pass
        finally:
            with trio.CancelScope(shield=True):
                if self._writing is not None:
                    await self._writing.settle()  # never close files under a running write
                if self._flushing is not None:
                    await self._flushing.settle()
                # A dropped connection or a shutdown must not cost what
                # already arrived: make it durable before letting go (a
                # crash still can).
                try:
                    if not running.cancelled_by_operator:
                        try:
                            await self._drain(partial, machine)
                        except (OSError, sqlite3.OperationalError) as exc:
                            log.warning("transfer %s: could not save received chunks: %s", self.id, exc)
                        await self._flush_quietly(partial, machine)
                finally:
                    partial.close()  # whatever went wrong: no descriptor or writer thread left behind
                try:
                    state = store.get(self.id)["state"]
                    if state == "active":
                        store.update(self.id, iso_now(), state="waiting")
                    if state not in FINAL_STATES:
                        await self._keep_hashes(partial)
                except sqlite3.OperationalError:
                    pass  # a full disk: restart marks it waiting too

    async def _keep_hashes(self, partial: PartialFiles) -> None:
        """Keep the files' SHA-256 state for the next connection, so that it
        reads back nothing. Only when every chunk handed to the writer was
        made durable and held (a chunk hashed but not held would be received
        again, and had its bytes differed then, the disk would not hold what
        was hashed), with a stamp of the partial files (the next connection
        re-reads if any changed), and within KEPT_FILES_MAX."""
        if self._held != self._handed or self._flush_failed or self._running.ending:
            return
        kept_files = sum(len(h.running) + len(h.complete) for h in self.node.received_hashes.values())
        if kept_files + len(partial.hashes.running) + len(partial.hashes.complete) > KEPT_FILES_MAX:
            return
        partial.hashes.stamp = await trio.to_thread.run_sync(settled_partial_stamp, partial.directory)
        if partial.hashes.stamp is not None:
            self.node.received_hashes[self.id] = partial.hashes

    async def _queue(self, action: WriteChunk, partial: PartialFiles, machine: ReceiverMachine) -> None:
        """Write a received chunk: at once when no batch is being written,
        else in the next batch, with those that arrive meanwhile."""
        self._queued.append(action)
        self._queued_bytes += len(action.data)
        if self._writing is not None and (
            self._writing.finished or self._queued_bytes > MAX_QUEUED_BYTES or len(self._queued) >= MAX_QUEUED_CHUNKS
        ):
            await self._written(partial, machine)
        if self._writing is None:
            self._start_write(partial)

    def _start_write(self, partial: PartialFiles) -> None:
        """Hand the queued chunks to a worker thread."""
        batch, self._queued, self._queued_bytes = self._queued, [], 0
        self._handed += len(batch)
        self._writing = InFlight(batch, partial.write_batch, batch)

    async def _drain(self, partial: PartialFiles, machine: ReceiverMachine) -> None:
        """Finish the batch in flight, then write what is queued."""
        if self._writing is not None:
            await self._written(partial, machine)
        if self._queued:
            self._start_write(partial)
            await self._written(partial, machine)

    async def _written(self, partial: PartialFiles, machine: ReceiverMachine) -> None:
        """Account for the batch in flight once it is done; start a flush
        when enough is pending."""
        writing = self._writing
        await writing.settle()
        self._writing = None  # only now: a cancel while waiting leaves it to the shielded cleanup
        checks = writing.take()
        for action, check in zip(writing.actions, checks):
            if not self._pending:
                self._pending_since = trio.current_time()
            self._pending.append((action.file, action.index, self._bases[action.file] + action.index, check))
            self._pending_bytes += len(action.data)
        if (
            self._pending_bytes >= FLUSH_BYTES
            or len(self._pending) >= FLUSH_CHUNKS
            or trio.current_time() - self._pending_since >= FLUSH_SECONDS
            or partial.flush_due
        ):
            await self._start_flush(partial, machine)

    async def _start_flush(self, partial: PartialFiles, machine: ReceiverMachine) -> None:
        """Make the pending chunks durable in a worker thread while writing
        goes on: a flush of a folder of small files is a syncfs of tens of
        milliseconds, and receiving used to stop for it. Call only while no
        write runs: the flush covers every write finished before it."""
        if self._flushing is not None:
            await self._flushed(machine)  # one at a time, recorded in order
        if self._flush_failed:
            # After a failed fsync the kernel may have marked pages clean that
            # never reached the disk (writes that ran beside it among them),
            # and the next fsync of the file can succeed all the same:
            # nothing more of this attempt is recorded as held.
            self._pending, self._pending_bytes = [], 0
            raise OSError(errno.EIO, "an earlier flush on this connection failed; nothing more of it is saved")
        if self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            flush = partial.flusher()
            try:
                self._flushing = InFlight(pending, _make_durable, flush)
            except BaseException:  # no thread to run it: its descriptors go now
                flush.discard()
                raise

    async def _flush(self, partial: PartialFiles, machine: ReceiverMachine) -> None:
        """Every chunk written so far durable and held, before this returns."""
        await self._start_flush(partial, machine)
        if self._flushing is not None:
            await self._flushed(machine)

    async def _flushed(self, machine: ReceiverMachine) -> None:
        """Wait for the flush in flight and record its chunks as held."""
        flushing = self._flushing
        await flushing.settle()
        self._flushing = None  # only now: a cancel while waiting leaves it to the shielded cleanup
        try:
            flushing.take()
        except Exception:
            self._flush_failed = True
            raise
        pending = flushing.actions
        self._done_bytes += sum(self.manifest.chunk_length(f, i) for f, i, _, _ in pending)
        self.node.store.add_chunks(self.id, [(slot, check) for _, _, slot, check in pending], self._done_bytes, iso_now())
        self._held += len(pending)
        for file, index, _, _ in pending:
            machine.chunk_durable(file, index)
        self._running.bytes_done = self._done_bytes

    async def _flush_quietly(self, partial: PartialFiles, machine: ReceiverMachine) -> None:
        try:
            await self._flush(partial, machine)
        except (OSError, sqlite3.OperationalError) as exc:
            log.warning("transfer %s: could not save received chunks: %s", self.id, exc)

    async def _on_abort(self, action: Aborted, partial: PartialFiles) -> None:
        if not action.final:
            self.node.store.update(self.id, iso_now(), state="waiting", error=action.reason[:200])
            return
        state = "cancelled" if action.code == "cancelled" else "failed"
        await self._end(state, f"sender: {action.reason}", partial, by="sender")

    async def _end(self, state: str, error: str, partial: PartialFiles, *, by: str) -> None:
        self._running.ending = True
        self._pending, self._pending_bytes = [], 0  # written for a transfer that is over: nothing to save
        if self._flushing is not None:
            await self._flushing.settle()
            self._flushing = None
        partial.close()
        await trio.to_thread.run_sync(discard_received, self.node.home.partial_dir, self._inbox, self.id)
        self.node.store.drop_chunks(self.id)
        self.node.store.update(self.id, iso_now(), state=state, error=error)
        fields = {"transfer_id": self.id, "peer": self.peer.name, "direction": "in"}
        if state == "cancelled":
            await self.node.record("transfer_cancelled", {**fields, "by": by})
        else:
            await self.node.record("transfer_failed", {**fields, "error": error})
        log.info("incoming transfer %s %s: %s", self.id, state, error)

    async def _finalize(self, partial: PartialFiles, machine: ReceiverMachine, action: Finalize) -> None:
        self._running.ending = True
        manifest = self.manifest
        # The chunk buffers are free now; the ledger record of a large folder
        # is about to need megabytes of small objects, which cannot reuse them.
        await trio.to_thread.run_sync(tuning.release_free_memory)
        # One thread hop for every file: a phone extraction has tens of thousands.
        digests = await trio.to_thread.run_sync(lambda: [partial.file_sha256(i) for i in range(len(manifest.files))])
        for entry, digest, expected in zip(manifest.files, digests, action.sender_sha256):
            if digest != expected:
                error = f"SHA-256 of {quoted(entry.path)} does not match the sender's"
                await self._end("failed", error, partial, by="receiver")
                await self._abort("hash_mismatch", error, final=True)
                return
        await self.node.set_file_sha256(self.id, digests)
        await trio.to_thread.run_sync(partial.publish, self._inbox, self.id)
        await self._complete(digests)
        machine.finalized()

    async def _complete(self, digests: list[bytes]) -> None:
        """Sign the receipt, record it, then (only then) send it. Each step
        is idempotent, so finishing again after a crash anywhere in it
        neither signs a second receipt nor records the transfer twice."""
        manifest, node = self.manifest, self.node
        node.received_hashes.pop(self.id, None)  # also after a crash or a failed first try: none is needed now
        row = node.store.get(self.id)
        receipt = row["receipt"]
        if receipt is None:
            body = ReceiptBody(
                transfer_id=manifest.transfer_id,
                manifest_hash=self.manifest_hash,
                sender=manifest.sender,
                receiver=manifest.receiver,
                file_sha256=tuple(digests),
                time=iso_now(),
            )
            receipt = sign_receipt(body, node.identity.sign)
            node.store.update(self.id, iso_now(), receipt=receipt)
        files = [
            {"path": entry.path, "size": entry.size, "sha256": digest.hex()}
            for entry, digest in zip(manifest.files, digests)
        ]
        if not await node.recorded("transfer_received", self.id):
            await node.record(
                "transfer_received",
                {
                    "transfer_id": self.id,
                    "peer": self.peer.name,
                    "peer_node_key": str(self.peer.node_key),
                    "manifest_hash": self.manifest_hash.hex(),
                    "manifest": row["manifest"],
                    "files": files,
                    "receipt": receipt,
                },
            )
        node.store.update(self.id, iso_now(), state="done", bytes_done=manifest.total_bytes, error=None)
        node.store.drop_chunks(self.id)  # a done transfer answers from its receipt, never from these
        checkpoint = await node.checkpoint()
        await self.channel.send(messages.Receipt(receipt=receipt, checkpoint=checkpoint))
        log.info("incoming transfer %s complete: %d files verified, receipt sent", self.id, len(files))
