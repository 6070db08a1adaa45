"""Regenerate the fuzzing seed corpus: valid inputs for every decoder that
sees network bytes, from fixed keys so the files are stable.

    .venv/bin/python tests/corpus/make_corpus.py
"""

import hashlib
from pathlib import Path

import nacl.signing
import zstandard

from dorothy.protocol import messages
from dorothy.protocol.framing import encode_frame
from dorothy.protocol.manifest import FileEntry, Manifest, sign_manifest
from dorothy.protocol.noise import x25519_public
from dorothy.protocol.receipt import ReceiptBody, sign_receipt
from dorothy.protocol.session import Session

HERE = Path(__file__).parent
SIGNER = nacl.signing.SigningKey(bytes(range(32)))
SIGN_PUBLIC = SIGNER.verify_key.encode()
DH_INITIATOR, DH_RESPONDER = bytes(range(32, 64)), bytes(range(64, 96))
NODE = SIGN_PUBLIC + x25519_public(DH_INITIATOR)
PEER = SIGN_PUBLIC + x25519_public(DH_RESPONDER)
TIME = "2026-11-29T06:40:00.123456Z"


def sign(message: bytes) -> bytes:
    return SIGNER.sign(message).signature


def manifest() -> Manifest:
    return Manifest(
        transfer_id=bytes(16),
        sender=NODE,
        receiver=PEER,
        created=TIME,
        chunk_size=1 << 16,
        files=(FileEntry("case/a.bin", 70000, 1), FileEntry("case/empty", 0, 2), FileEntry("ünï\ncode;.txt", 5, 3)),
    )


def corpus() -> dict[str, dict[str, bytes]]:
    envelope = sign_manifest(manifest(), sign)
    receipt = sign_receipt(
        ReceiptBody(
            transfer_id=bytes(16),
            manifest_hash=hashlib.sha256(manifest().encode()).digest(),
            sender=NODE,
            receiver=PEER,
            file_sha256=(bytes(32), bytes(32), bytes(32)),
            time=TIME,
        ),
        sign,
    )
    initiator = Session(
        initiator=True, static_private=DH_INITIATOR, ephemeral_private=bytes(32), remote_static=x25519_public(DH_RESPONDER)
    )
    return {
        "frames": {"empty": encode_frame(b""), "small": encode_frame(b"hello"), "two": encode_frame(b"a") + encode_frame(b"bc")},
        "handshake": {"opening": initiator.initiate()},
        "messages": {
            "offer": messages.encode(messages.Offer(manifest=envelope)),
            "accept": messages.encode(messages.Accept(transfer_id=bytes(16), have=b"\x05")),
            "chunk": messages.encode(messages.Chunk(file=0, index=1, compressed=False, data=b"x" * 100)),
            "file_done": messages.encode(messages.FileDone(file=2, sha256=bytes(32))),
            "done": messages.encode(messages.Done()),
            "receipt": messages.encode(messages.Receipt(receipt=receipt, checkpoint="origin\n1\nAA==\n\n— x AAAA\n")),
            "abort": messages.encode(messages.Abort(code="cancelled", reason="by operator", final=True)),
        },
        "manifests": {"valid": envelope},
        "receipts": {"valid": receipt},
        "zstd": {"text": zstandard.ZstdCompressor(level=1).compress(b"2026-11-29 INFO ok\n" * 500)},
    }


if __name__ == "__main__":
    for folder, items in corpus().items():
        (HERE / folder).mkdir(exist_ok=True)
        for name, data in items.items():
            (HERE / folder / f"{name}.bin").write_bytes(data)
