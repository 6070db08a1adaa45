"""One outgoing transfer over an authenticated channel: offer the signed
manifest, send the chunks the receiver lacks and each file's SHA-256, and
accept only a receipt that verifies against the peer's key and matches
what we sent.

Reading, hashing, compressing and sealing a chunk happen in a worker thread
while the previous chunk is on the wire; the channel between them holds at
most WINDOW sealed records, which is what bounds memory, whatever the size
of the files.
"""

import trio

from ..keys.truststore import Peer
from ..protocol import messages
from ..protocol.compression import compress_if_smaller
from ..protocol.errors import RemoteProtocolError
from ..protocol.manifest import open_manifest
from ..protocol.paths import quoted
from ..protocol.session import DATA_RECORD
from ..protocol.transfer import Aborted, Bitmap, Delivered, SenderMachine
from . import tuning
from .channel import Channel, ChannelClosed
from .clock import iso_now
from .hashing import FileHasher
from .logs import log
from .node import Node, Running
from .sources import SourceReader

# Sealed records queued between the worker and the socket: enough to keep
# both busy, few enough that memory stays a few MiB per transfer.
WINDOW = 4
# Bytes sent and fresh file hashes go to the state db together, in one
# transaction, once a second or per SAVE_FILES hashes, whichever comes
# first (and before `done`). They only spare work after a restart (an
# active transfer's status comes from memory); a commit per 64 small files
# had cost 17% of the event loop.
SAVE_SECONDS = 1.0
SAVE_FILES = 4096
# Files of at most one chunk are read, hashed and sealed in batches, one
# worker-thread hop per batch of at most SMALL_BATCH files or
# SMALL_BATCH_BYTES of content (what bounds the batch's memory).
SMALL_BATCH = 64
SMALL_BATCH_BYTES = 2 << 20
# A batch's records go to the socket in units of about this size: one send,
# and one idle-deadline scope, per unit instead of two per file.
SEND_UNIT = 1 << 20


class PermanentFailure(Exception):
    """The transfer can never complete (the peer was removed, a receipt
    contradicts the source...): fail it instead of retrying."""


class TransferAborted(Exception):
    def __init__(self, aborted: Aborted):
        super().__init__(aborted.reason)
        self.aborted = aborted


async def _sender_machine(node: Node, row, peer: Peer) -> SenderMachine:
    """The machine for our own manifest: the one just signed, if this is the
    transfer queued last, else the stored one, checked again as the receiver
    will check it (in a worker thread: 100,000 names take a third of a
    second, time in which the event loop would serve no one)."""
    if node.just_queued is not None and node.just_queued[0] == row["id"]:
        _, manifest, manifest_hash = node.just_queued
        node.just_queued = None
    else:
        manifest, manifest_hash = await trio.to_thread.run_sync(open_manifest, row["manifest"])
    return SenderMachine(manifest, row["manifest"], manifest_hash, peer.node_key.sign_public)


class Outgoing:
    def __init__(self, node: Node, channel: Channel, peer: Peer, row, running: Running, machine: SenderMachine):
        self.node = node
        self.channel = channel
        self.peer = peer
        self.row = row
        self.id = row["id"]
        self.running = running
        self.machine = machine
        self.manifest = machine.manifest
        # SHA-256 state survives dropped connections (not restarts), so a
        # resumed transfer does not read again what it already hashed.
        self.hashers: dict[int, FileHasher] = node.sender_hashers.setdefault(self.id, {})
        self._fresh: dict[int, bytes] = {}  # hashes not yet saved
        self._saved_at = trio.current_time()
        self._record: bytearray | None = None  # see _send_all

    async def run(self) -> Delivered:
        await self.channel.send(self.machine.offer())
        result = self.machine.receive(await self.channel.receive())
        if isinstance(result, Bitmap):
            await self._send_all(result)
            # As on the receiver: free the chunk buffers before the ledger
            # record of a large folder needs megabytes of small objects.
            await trio.to_thread.run_sync(tuning.release_free_memory)
            result = self.machine.receive(await self.channel.receive())
        if isinstance(result, Aborted):
            raise TransferAborted(result)
        return result

    async def _send_all(self, have: Bitmap) -> None:
        self.running.bytes_done = await trio.to_thread.run_sync(_held_bytes, self.manifest, have)
        # The one buffer chunk records are built in, by one worker thread at
        # a time (_prepare and _whole_files never overlap for a transfer).
        self._record = bytearray(len(DATA_RECORD) + messages.MAX_CHUNK_HEADER + self.manifest.chunk_size)
        send_side, receive_side = trio.open_memory_channel(WINDOW)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._produce, send_side)
                async with receive_side:
                    async for frame in receive_side:
                        await self.channel.send_raw(frame)
        finally:
            self._record = None

    def _seal(self, message) -> memoryview:
        return self.channel.session.send_message(messages.encode(message))

    async def _produce(self, out: trio.MemorySendChannel) -> None:
        async with out:
            small: list[tuple[int, object, FileHasher, bool]] = []
            small_bytes = 0
            for index, row in enumerate(await self.node.files(self.id)):
                hasher = self._plan(index, row)
                if hasher is None:  # held by the receiver, hash known
                    await self._file_done(out, index, row, row.sha256)
                    continue
                if self.manifest.chunk_count(index) <= 1 and hasher.offset == 0:
                    # Files of at most one chunk travel in batches: one
                    # thread hop for many (most of a phone extraction).
                    small.append((index, row, hasher, self.machine.needs(index, 0)))
                    small_bytes += row.size
                    if len(small) >= SMALL_BATCH or small_bytes >= SMALL_BATCH_BYTES:
                        await self._small_files(out, small)
                        small, small_bytes = [], 0
                    continue
                await self._small_files(out, small)
                small, small_bytes = [], 0
                self.hashers[index] = hasher
                await self._chunked_file(out, index, row, hasher)
                await self._file_done(out, index, row, hasher.digest())
            await self._small_files(out, small)
            self._save_progress()  # every hash, before `done`: _record_delivery counts on it
            await out.send(self._seal(self.machine.done()))

    def _plan(self, index: int, row) -> FileHasher | None:
        """The hasher to continue, or None when there is nothing to read."""
        if not self.machine.missing(index) and row.sha256 is not None:
            return None
        # A chunk lost in flight lies below what was already hashed: it is
        # read again and sent, but not hashed again (FileHasher ignores it).
        # Had the source changed since, the receiver's SHA-256 would differ
        # from ours and the transfer would fail loudly. Only files of several
        # chunks keep their hasher across connections: a small file is read
        # whole in one go, and 10,000 kept hashers would cost 5 MiB.
        return self.hashers.get(index) or FileHasher()

    async def _file_done(self, out, index: int, row, digest: bytes) -> None:
        self._remember(index, row, digest)
        await out.send(self._seal(messages.FileDone(file=index, sha256=digest)))

    def _remember(self, index: int, row, digest: bytes) -> None:
        if row.sha256 is not None and row.sha256 != digest:
            raise RemoteProtocolError(f"{quoted(row.path)} changed after it was queued", code="source_changed")
        if row.sha256 is None:
            self._fresh[index] = digest
            self._save_if_due()

    async def _small_files(self, out, batch: list) -> None:
        if not batch:
            return
        units = await trio.to_thread.run_sync(self._whole_files, batch, _link_is_behind(out))
        for index, row, hasher, _ in batch:
            self._remember(index, row, hasher.digest())
        for unit in units:
            await out.send(unit)
        self._count(sum(row.size for _, row, _, needed in batch if needed))

    def _whole_files(self, batch: list, compress: bool) -> list[bytes]:
        """Worker thread: files of at most one chunk, each opened, read,
        re-checked, and sealed in wire order (record nonces must follow the
        order records are sent): its chunk, carrying the file's SHA-256, or
        a file_done alone when there is no chunk to send. The records are
        joined into units of about SEND_UNIT bytes."""
        units, unit, unit_bytes = [], [], 0
        for index, row, hasher, needed in batch:
            reader = SourceReader(row.source, row.size, row.mtime_ns, row.path)
            try:
                chunk = self._prepare(reader, hasher, index, 0, needed, compress, whole_file=True) if row.size else None
                reader.check()
            finally:
                reader.close()
            frame = chunk if chunk is not None else self._seal(messages.FileDone(file=index, sha256=hasher.digest()))
            unit.append(frame)
            unit_bytes += len(frame)
            if unit_bytes >= SEND_UNIT:
                units.append(b"".join(unit))
                unit, unit_bytes = [], 0
        if unit:
            units.append(b"".join(unit))
        return units

    async def _chunked_file(self, out, index: int, row, hasher: FileHasher) -> None:
        manifest = self.manifest
        reader = await trio.to_thread.run_sync(SourceReader, row.source, row.size, row.mtime_ns, row.path)
        try:
            for chunk in range(manifest.chunk_count(index)):
                needed = self.machine.needs(index, chunk)
                if chunk * manifest.chunk_size < hasher.offset and not needed:
                    continue  # hashed on an earlier connection, and the receiver holds it
                frame = await trio.to_thread.run_sync(
                    self._prepare, reader, hasher, index, chunk, needed, _link_is_behind(out)
                )
                if frame is not None:
                    await out.send(frame)
                    self._count(manifest.chunk_length(index, chunk))
            await trio.to_thread.run_sync(reader.check)
        finally:
            reader.close()

    def _count(self, length: int) -> None:
        """Progress: `length` more bytes of chunks are sent."""
        self.running.bytes_done += length
        self._save_if_due()

    def _save_if_due(self) -> None:
        if len(self._fresh) >= SAVE_FILES or trio.current_time() - self._saved_at >= SAVE_SECONDS:
            self._save_progress()

    def _save_progress(self) -> None:
        """Hashes are kept so that a resume after a restart need not read
        whole files again; losing the latest costs only that re-read."""
        self.node.store.save_sent(self.id, self._fresh, self.running.bytes_done, iso_now())
        self._fresh, self._saved_at = {}, trio.current_time()

    def _prepare(
        self, reader: SourceReader, hasher: FileHasher, index: int, chunk: int, needed: bool, compress: bool,
        whole_file: bool = False,
    ) -> memoryview | None:
        """Worker thread: read, hash, and (if the receiver lacks it) seal one
        chunk, compressed if `compress` and that makes it smaller; a
        `whole_file` chunk carries the file's SHA-256. The chunk is read
        straight into the record buffer, after room for its message header,
        and sealed from there into its frame: no copy of its own."""
        offset, length = chunk * self.manifest.chunk_size, self.manifest.chunk_length(index, chunk)
        # The header goes in once the digest it may carry is known; its
        # length does not depend on the digest.
        placeholder = _NO_DIGEST_YET if whole_file else None
        header_length = len(DATA_RECORD) + len(messages.chunk_header(index, chunk, False, length, placeholder))
        record = memoryview(self._record)[: header_length + length]
        data = record[header_length:]
        reader.read_into(offset, data)
        hasher.feed(offset, data)
        if not needed:
            return None
        sha256 = hasher.digest() if whole_file else None
        if compress:
            compressed, payload = compress_if_smaller(data)
            if compressed:
                return self._seal(messages.Chunk(file=index, index=chunk, compressed=True, data=payload, sha256=sha256))
        record[:header_length] = DATA_RECORD + messages.chunk_header(index, chunk, False, length, sha256)
        return self.channel.session.send_record(record)


_NO_DIGEST_YET = bytes(32)


def _link_is_behind(out: trio.MemorySendChannel) -> bool:
    """Whether compressing the next chunk pays: only while sealed records
    wait for the socket, i.e. the link (or the receiver) and not this node's
    CPU holds the transfer back. On a fast link, zstd costs more time than
    the bytes it saves (loopback, log text: ~3 ms of CPU per MiB to save
    well under 1 ms of sending); on a slow one it multiplies throughput."""
    return out.statistics().current_buffer_used >= WINDOW // 2


def _held_bytes(manifest, have: Bitmap) -> int:
    """Bytes the receiver already holds: whole chunks, less the shortfall of
    each file's held last chunk. Per file, not per chunk: an offer may have
    millions of chunks (and, in a worker thread, 100,000 files)."""
    held = have.count() * manifest.chunk_size
    for index, base in enumerate(manifest.chunk_bases()):
        count = manifest.chunk_count(index)
        if count and base + count - 1 in have:
            held -= manifest.chunk_size - manifest.chunk_length(index, count - 1)
    return held


async def deliver(node: Node, row, peer: Peer, running: Running, channel: Channel) -> None:
    """Run one attempt over `channel`; on success the delivery is in the
    ledger and the state db before this returns."""
    machine = await _sender_machine(node, row, peer)
    delivered = await Outgoing(node, channel, peer, row, running, machine).run()
    running.ending = True
    await _record_delivery(node, row, peer, delivered)


async def notify_ended(node: Node, row, peer: Peer, channel: Channel) -> None:
    """Tell the receiver that a transfer it may hold partially is over:
    cancelled by our operator, or failed here for good (a source changed).
    Offer it, then abort, so the receiver drops its partial copy. (Not
    in-band on the attempt that ended: a cancelled send can leave half a
    record on the wire, and records sealed but never sent leave the
    record counter behind.)"""
    machine = await _sender_machine(node, row, peer)
    await channel.send(machine.offer())
    reply = machine.receive(await channel.receive())
    if isinstance(reply, Delivered):
        # The receiver completed before the cancellation reached it: the
        # evidence did arrive, and the ledger must say so.
        log.warning("transfer %s was delivered before its end reached %s", row["id"], peer.name)
        await _record_delivery(node, row, peer, reply)
        node.store.update(row["id"], iso_now(), error=f"delivered before the peer learnt it was {row['state']}")
    elif isinstance(reply, Bitmap):
        if row["state"] == "cancelled":
            abort = messages.Abort(code="cancelled", reason="cancelled by the sending operator", final=True)
        else:
            abort = messages.Abort(code="failed", reason=f"failed at the sender: {row['error']}", final=True)
        await channel.send(abort)
        await _closed_after_abort(channel)
    elif not reply.final:
        raise TransferAborted(reply)  # busy: try again later
    node.store.update(row["id"], iso_now(), notify_peer=0)


async def _closed_after_abort(channel: Channel) -> None:
    """The receiver closes the session once it has acted on a final abort:
    only that tells us it did (an abort still in a buffer when the
    connection drops never arrived, and the notice must be sent again)."""
    try:
        message = await channel.receive()
    except ChannelClosed:
        return
    raise RemoteProtocolError(f"the receiver answered an abort with {type(message).__name__}", code="unexpected_message")


async def _record_delivery(node: Node, row, peer: Peer, delivered: Delivered) -> None:
    files = await node.files(row["id"])
    for entry, digest in zip(files, delivered.receipt.file_sha256):
        if entry.sha256 is None:
            # Every hash is saved before `done` is sent, so an honest
            # receiver cannot hold a receipt for a file we never hashed.
            raise RemoteProtocolError(f"receipt for {quoted(entry.path)}, which was never sent", code="bad_receipt")
        if entry.sha256 != digest:
            raise PermanentFailure(f"receipt SHA-256 for {quoted(entry.path)} differs from the source's")
    delivered_files = [
        {"path": f.path, "size": f.size, "sha256": d.hex()} for f, d in zip(files, delivered.receipt.file_sha256)
    ]
    del files  # megabytes for a large folder, and the record needs as much again
    # Recorded already if a crash came between the ledger and the state db.
    if not await node.recorded("transfer_delivered", row["id"]):
        await node.record(
            "transfer_delivered",
            {
                "transfer_id": row["id"],
                "peer": peer.name,
                "peer_node_key": str(peer.node_key),
                "manifest_hash": row["manifest_hash"].hex(),
                "files": delivered_files,
                "receipt": delivered.envelope,
            },
        )
    node.store.update(
        row["id"], iso_now(), state="done", receipt=delivered.envelope, bytes_done=row["bytes_total"], error=None, notify_peer=0
    )
    node.sender_hashers.pop(row["id"], None)
    await node.keep_peer_checkpoint(peer, delivered.checkpoint)
    await node.checkpoint()  # our own tree head too: history a crash cannot cut
    log.info("transfer %s delivered to %s; receipt verified", row["id"], peer.name)
