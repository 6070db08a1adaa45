"""Transfer-layer messages, carried one per session record.

Each message is a msgpack map with a `t` (type) field. The decoder checks
every field's type and bound before the state machines see it; a map with an
unknown `t` is a protocol error, while unknown extra fields are ignored so
that later versions can add fields without breaking this one.
"""

from dataclasses import dataclass

from .codec import Fields, pack, unpack
from .errors import RemoteProtocolError
from .manifest import MAX_CHUNK_SIZE, MAX_FILES, MAX_MANIFEST_BYTES, MAX_TOTAL_CHUNKS, TRANSFER_ID_LEN

MAX_REASON = 1024
MAX_RECEIPT_BYTES = MAX_FILES * 40 + 4096
MAX_CHECKPOINT_BYTES = 4096
MAX_HAVE_BYTES = MAX_TOTAL_CHUNKS // 8


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """Sender -> receiver, first message: the signed manifest."""

    manifest: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Accept:
    """Receiver -> sender: the chunks it already holds, verified and durable,
    one bit per chunk in global chunk order (LSB first)."""

    transfer_id: bytes
    have: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    file: int
    index: int
    compressed: bool
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class FileDone:
    """Sender -> receiver: the SHA-256 of a whole source file, once read."""

    file: int
    sha256: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """Sender -> receiver: every chunk the receiver lacked has been sent."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """Receiver -> sender: the signed receipt and the receiver's latest
    ledger checkpoint (a signed note)."""

    receipt: bytes
    checkpoint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Abort:
    """Either side stops the transfer. `final` means it will never complete
    (cancelled, failed); otherwise the sender retries later (busy, disk full)."""

    code: str
    reason: str
    final: bool


def encode(message) -> bytes:
    match message:
        case Offer():
            return pack({"t": "offer", "manifest": message.manifest})
        case Accept():
            return pack({"t": "accept", "transfer_id": message.transfer_id, "have": message.have})
        case Chunk():
            return pack({"t": "chunk", "f": message.file, "i": message.index, "z": message.compressed, "d": message.data})
        case FileDone():
            return pack({"t": "file_done", "f": message.file, "sha256": message.sha256})
        case Done():
            return pack({"t": "done"})
        case Receipt():
            return pack({"t": "receipt", "receipt": message.receipt, "checkpoint": message.checkpoint})
        case Abort():
            # Reasons can quote long (escaped) paths: cut them to what every
            # decoder accepts rather than make the abort itself malformed.
            reason = message.reason[:MAX_REASON]
            return pack({"t": "abort", "code": message.code[:64], "reason": reason, "final": message.final})
    raise TypeError(f"not a message: {message!r}")


def _decode_offer(f: Fields):
    return Offer(manifest=f.bytes("manifest", max_len=MAX_MANIFEST_BYTES))


def _decode_accept(f: Fields):
    return Accept(transfer_id=f.bytes("transfer_id", length=TRANSFER_ID_LEN), have=f.bytes("have", max_len=MAX_HAVE_BYTES))


def _decode_chunk(f: Fields):
    return Chunk(
        file=f.int("f", 0, MAX_FILES - 1),
        index=f.int("i", 0, MAX_TOTAL_CHUNKS - 1),
        compressed=f.bool("z"),
        data=f.bytes("d", max_len=MAX_CHUNK_SIZE),
    )


def _decode_file_done(f: Fields):
    return FileDone(file=f.int("f", 0, MAX_FILES - 1), sha256=f.bytes("sha256", length=32))


def _decode_receipt(f: Fields):
    return Receipt(receipt=f.bytes("receipt", max_len=MAX_RECEIPT_BYTES), checkpoint=f.str("checkpoint", max_len=MAX_CHECKPOINT_BYTES))


def _decode_abort(f: Fields):
    return Abort(code=f.str("code", max_len=64), reason=f.str("reason", max_len=MAX_REASON), final=f.bool("final"))


_DECODERS = {
    "offer": _decode_offer,
    "accept": _decode_accept,
    "chunk": _decode_chunk,
    "file_done": _decode_file_done,
    "done": lambda f: Done(),
    "receipt": _decode_receipt,
    "abort": _decode_abort,
}


def decode(data: bytes):
    fields = Fields(unpack(data, "message"), "message")
    kind = fields.str("t", max_len=32)
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise RemoteProtocolError(f"unknown message type {kind!r}", code="unknown_message")
    return decoder(Fields(fields.map, f"{kind} message"))
