"""Fuzzing every decoder that sees network bytes, from the seed corpus in
tests/corpus/ (regenerate with tests/corpus/make_corpus.py): each seed must
decode, and every mutation of it (bit flips, truncation, insertion,
duplication, splicing) must either decode or raise the protocol's own error,
never anything else."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dorothy.protocol import messages
from dorothy.protocol.compression import decompress_exact
from dorothy.protocol.errors import ProtocolError
from dorothy.protocol.framing import MAX_FRAME, FrameDecoder
from dorothy.protocol.manifest import open_manifest
from dorothy.protocol.receipt import open_receipt
from dorothy.protocol.session import Session

from corpus.make_corpus import DH_RESPONDER, SIGN_PUBLIC

CORPUS = Path(__file__).parent / "corpus"
TEXT_LEN = len(b"2026-11-29 INFO ok\n" * 500)


def decode_frames(data: bytes) -> None:
    decoder = FrameDecoder(MAX_FRAME)
    decoder.receive_data(data)
    while decoder.next_frame() is not None:
        pass


def handshake_responder(data: bytes) -> None:
    session = Session(initiator=False, static_private=DH_RESPONDER, ephemeral_private=bytes(32), authorize=lambda key: True)
    session.receive_data(data)
    while session.next_event() is not None:
        pass


DECODERS = {
    "frames": decode_frames,
    "handshake": handshake_responder,
    "messages": messages.decode,
    "manifests": open_manifest,
    "receipts": lambda data: open_receipt(data, SIGN_PUBLIC),
    "zstd": lambda data: decompress_exact(data, TEXT_LEN),
}

SEEDS = sorted((folder.name, path) for folder in CORPUS.iterdir() if folder.is_dir() for path in folder.glob("*.bin"))


def test_every_decoder_has_seeds():
    assert {folder for folder, _ in SEEDS} == set(DECODERS)


@pytest.mark.parametrize("decoder, path", SEEDS, ids=[f"{d}/{p.name}" for d, p in SEEDS])
def test_seed_decodes(decoder, path):
    DECODERS[decoder](path.read_bytes())


@st.composite
def mutated(draw):
    decoder, path = draw(st.sampled_from(SEEDS))
    data = bytearray(path.read_bytes())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "duplicate", "splice"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        else:
            other = draw(st.sampled_from(SEEDS))[1].read_bytes()
            data[at:] = other[draw(st.integers(0, len(other))) :]
    return decoder, bytes(data)


@settings(max_examples=400, deadline=None)
@given(mutated())
def test_mutations_raise_only_protocol_errors(case):
    decoder, data = case
    try:
        DECODERS[decoder](data)
    except ProtocolError:
        pass
