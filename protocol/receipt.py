"""The receipt: the receiver's signed statement that it holds, verified and
durable, exactly the files the sender's manifest described, with the SHA-256
it computed itself for each."""

from dataclasses import dataclass

from . import signed
from .codec import Fields, pack, unpack
from .errors import RemoteProtocolError
from .manifest import MAX_FILES, NODE_KEY_LEN, TRANSFER_ID_LEN
from .messages import MAX_RECEIPT_BYTES

RECEIPT_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptBody:
    transfer_id: bytes
    manifest_hash: bytes
    sender: bytes
    receiver: bytes
    file_sha256: tuple[bytes, ...]
    time: str  # RFC 3339 UTC, the receiver's clock at completion

    def encode(self) -> bytes:
        return pack(
            {
                "v": RECEIPT_VERSION,
                "transfer_id": self.transfer_id,
                "manifest_hash": self.manifest_hash,
                "sender": self.sender,
                "receiver": self.receiver,
                "files": list(self.file_sha256),
                "time": self.time,
            }
        )


def sign_receipt(body: ReceiptBody, sign) -> bytes:
    return signed.seal(signed.RECEIPT_DOMAIN, body.encode(), sign)


def open_receipt(envelope: bytes, receiver_sign_public: bytes) -> ReceiptBody:
    """Verify a receipt against the key of the node that should have signed it."""
    body, signature = signed.split(envelope, "receipt", MAX_RECEIPT_BYTES)
    signed.verify(signed.RECEIPT_DOMAIN, body, signature, receiver_sign_public, "receipt")
    fields = Fields(unpack(body, "receipt"), "receipt")
    if fields.int("v", 0, 255) != RECEIPT_VERSION:
        raise RemoteProtocolError("unsupported receipt version", code="bad_receipt")
    hashes = fields.list("files", max_len=MAX_FILES)
    if not all(type(h) is bytes and len(h) == 32 for h in hashes):
        raise RemoteProtocolError("receipt file hashes must be 32-byte SHA-256 values", code="bad_receipt")
    receipt = ReceiptBody(
        transfer_id=fields.bytes("transfer_id", length=TRANSFER_ID_LEN),
        manifest_hash=fields.bytes("manifest_hash", length=32),
        sender=fields.bytes("sender", length=NODE_KEY_LEN),
        receiver=fields.bytes("receiver", length=NODE_KEY_LEN),
        file_sha256=tuple(hashes),
        time=fields.time("time"),
    )
    if receipt.encode() != body:
        raise RemoteProtocolError("receipt is not in canonical encoding", code="bad_receipt")
    return receipt
