"""The two ends of one transfer as state machines: no files, no clocks.

The sender offers a signed manifest; the receiver answers with a have-map of
the chunks it already holds (verified and durable), so only the missing ones
travel; the sender streams chunks and each file's SHA-256; the receiver
finalizes and answers with a signed receipt. Every message is checked
against the state table below, and anything not in it is a protocol error.

The machines decide and validate; the daemon does the reading, writing,
hashing and fsyncing they ask for, and tells them when a chunk is durable.
"""

from dataclasses import dataclass
from enum import Enum

from .compression import decompress_exact
from .errors import LocalProtocolError, RemoteProtocolError
from .manifest import Manifest
from .messages import Abort, Accept, Chunk, Done, FileDone, Offer, Receipt
from .receipt import ReceiptBody, open_receipt


class Bitmap:
    """One bit per chunk in global order (file 0's chunks first), LSB first."""

    def __init__(self, size: int, data: bytes | None = None):
        self.size = size
        nbytes = (size + 7) // 8
        if data is None:
            data = bytes(nbytes)
        if len(data) != nbytes or (size % 8 and data[-1] >> (size % 8)):
            raise RemoteProtocolError(f"have-map of {len(data)} bytes does not fit {size} chunks", code="bad_have")
        self._bits = bytearray(data)

    def __contains__(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def add(self, index: int) -> None:
        self._bits[index >> 3] |= 1 << (index & 7)

    def discard(self, index: int) -> None:
        self._bits[index >> 3] &= ~(1 << (index & 7)) & 0xFF

    def count(self, start: int = 0, stop: int | None = None) -> int:
        """Set bits among slots [start, stop): one big-integer operation,
        not a loop, since a file may span millions of slots."""
        stop = self.size if stop is None else stop
        if stop <= start:
            return 0
        window = int.from_bytes(self._bits[start >> 3 : (stop + 7) >> 3], "little") >> (start & 7)
        return (window & ((1 << (stop - start)) - 1)).bit_count()

    def to_bytes(self) -> bytes:
        return bytes(self._bits)


class SenderState(Enum):
    OFFERED = "offered"
    SENDING = "sending"
    AWAIT_RECEIPT = "await_receipt"
    DELIVERED = "delivered"
    ABORTED = "aborted"


class ReceiverState(Enum):
    RECEIVING = "receiving"
    FINALIZING = "finalizing"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class Delivered:
    receipt: ReceiptBody
    envelope: bytes
    checkpoint: str


@dataclass(frozen=True, slots=True)
class Aborted:
    code: str
    reason: str
    final: bool


@dataclass(frozen=True, slots=True)
class WriteChunk:
    file: int
    index: int
    offset: int
    data: bytes | memoryview  # a view of the received record, unless decompressed


@dataclass(frozen=True, slots=True)
class Finalize:
    """Every chunk is here: flush, hash, compare with `sender_sha256`, move
    into place, sign a receipt, and call `finalized` with it."""

    sender_sha256: tuple[bytes, ...]


def _unexpected(message, state) -> RemoteProtocolError:
    return RemoteProtocolError(f"unexpected {type(message).__name__} in state {state.value}", code="unexpected_message")


class SenderMachine:
    def __init__(self, manifest: Manifest, envelope: bytes, manifest_hash: bytes, receiver_sign_public: bytes):
        self.manifest = manifest
        self._envelope = envelope
        self.manifest_hash = manifest_hash
        self._receiver_sign_public = receiver_sign_public
        self.state = SenderState.OFFERED
        self.have: Bitmap | None = None

    def offer(self) -> Offer:
        return Offer(manifest=self._envelope)

    def needs(self, file: int, index: int) -> bool:
        """Whether the receiver lacks chunk `index` of `file` (an index the
        file does not have is never needed: an empty file's base slot is
        the next file's)."""
        return (
            self.state is SenderState.SENDING
            and 0 <= index < self.manifest.chunk_count(file)
            and self._bases[file] + index not in self.have
        )

    def missing(self, file: int) -> int:
        """How many of the file's chunks the receiver lacks."""
        if self.state is not SenderState.SENDING:
            return 0
        base, count = self._bases[file], self.manifest.chunk_count(file)
        return count - self.have.count(base, base + count)

    def done(self) -> Done:
        if self.state is not SenderState.SENDING:
            raise LocalProtocolError(f"cannot finish sending in state {self.state.value}")
        self.state = SenderState.AWAIT_RECEIPT
        return Done()

    def receive(self, message):
        """Returns the chunk plan (a Bitmap), Delivered, Aborted or None."""
        if isinstance(message, Abort):
            self.state = SenderState.ABORTED
            return Aborted(message.code, message.reason, message.final)
        if isinstance(message, Accept) and self.state is SenderState.OFFERED:
            if message.transfer_id != self.manifest.transfer_id:
                raise RemoteProtocolError("accept names another transfer", code="bad_accept")
            self.have = Bitmap(self.manifest.total_chunks, message.have)
            self._bases = self.manifest.chunk_bases()
            self.state = SenderState.SENDING
            return self.have
        if isinstance(message, Receipt) and self.state in (SenderState.OFFERED, SenderState.AWAIT_RECEIPT):
            # In OFFERED: the receiver finished this transfer before a crash or
            # a dropped connection kept its receipt from us; it sends it again.
            body = open_receipt(message.receipt, self._receiver_sign_public)
            self._check_receipt(body)
            self.state = SenderState.DELIVERED
            return Delivered(body, message.receipt, message.checkpoint)
        raise _unexpected(message, self.state)

    def _check_receipt(self, body: ReceiptBody) -> None:
        m = self.manifest
        if (body.transfer_id, body.manifest_hash, body.sender, body.receiver) != (
            m.transfer_id,
            self.manifest_hash,
            m.sender,
            m.receiver,
        ):
            raise RemoteProtocolError("receipt does not match this transfer's manifest", code="bad_receipt")
        if len(body.file_sha256) != len(m.files):
            raise RemoteProtocolError("receipt lists a different number of files", code="bad_receipt")


class ReceiverMachine:
    """`have` holds the chunks already verified and durable on this node.
    The daemon makes pending writes durable (and reports them with
    `chunk_durable`) before it passes on a Done message."""

    def __init__(self, manifest: Manifest, have: Bitmap):
        self.manifest = manifest
        self.have = have
        self._bases = manifest.chunk_bases()
        self._pending = Bitmap(manifest.total_chunks)  # written, not yet durable
        self._sender_sha256: list[bytes | None] = [None] * len(manifest.files)
        self.state = ReceiverState.RECEIVING

    def accept(self) -> Accept:
        return Accept(transfer_id=self.manifest.transfer_id, have=self.have.to_bytes())

    def receive(self, message):
        """Returns a WriteChunk, Finalize, Aborted or None."""
        if isinstance(message, Abort):
            self.state = ReceiverState.ABORTED
            return Aborted(message.code, message.reason, message.final)
        if self.state is not ReceiverState.RECEIVING:
            raise _unexpected(message, self.state)
        if isinstance(message, Chunk):
            return self._on_chunk(message)
        if isinstance(message, FileDone):
            self._file(message.file, "bad_file_done")
            self._sender_sha256[message.file] = message.sha256
            return None
        if isinstance(message, Done):
            return self._on_done()
        raise _unexpected(message, self.state)

    def _file(self, file: int, code: str):
        if not 0 <= file < len(self.manifest.files):
            raise RemoteProtocolError(f"file index {file} is out of range", code=code)
        return self.manifest.files[file]

    def _on_chunk(self, chunk: Chunk) -> WriteChunk | None:
        self._file(chunk.file, "bad_chunk")
        count = self.manifest.chunk_count(chunk.file)
        if not 0 <= chunk.index < count:
            raise RemoteProtocolError(
                f"chunk {chunk.index} of file {chunk.file} is out of range (the file has {count})", code="bad_chunk"
            )
        expected = self.manifest.chunk_length(chunk.file, chunk.index)
        if chunk.compressed:
            data = decompress_exact(chunk.data, expected)
        elif len(chunk.data) != expected:
            raise RemoteProtocolError(
                f"chunk {chunk.index} of file {chunk.file} has {len(chunk.data)} bytes, expected {expected}",
                code="bad_chunk",
            )
        else:
            data = chunk.data
        slot = self._bases[chunk.file] + chunk.index
        if chunk.sha256 is not None:
            self._sender_sha256[chunk.file] = chunk.sha256  # as a file_done after this chunk
        if slot in self.have or slot in self._pending:
            return None  # a resend of what we hold already: harmless, nothing to do
        self._pending.add(slot)
        return WriteChunk(chunk.file, chunk.index, chunk.index * self.manifest.chunk_size, data)

    def chunk_durable(self, file: int, index: int) -> None:
        slot = self._bases[file] + index
        self._pending.discard(slot)
        self.have.add(slot)

    def _on_done(self) -> Finalize:
        missing = self.manifest.total_chunks - self.have.count()
        if missing:
            raise RemoteProtocolError(f"sender finished with {missing} chunks still missing", code="incomplete")
        absent = [i for i, digest in enumerate(self._sender_sha256) if digest is None]
        if absent:
            raise RemoteProtocolError(f"sender finished without the SHA-256 of file {absent[0]}", code="incomplete")
        self.state = ReceiverState.FINALIZING
        return Finalize(tuple(self._sender_sha256))

    def finalized(self) -> None:
        if self.state is not ReceiverState.FINALIZING:
            raise LocalProtocolError("finalized() before Finalize")
        self.state = ReceiverState.DONE
