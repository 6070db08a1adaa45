"""protocol/transfer.py: the sender and receiver state machines, joined in
memory with no I/O.

Every message crosses a fake link that encodes and decodes it as the wire
would (messages.encode/decode), so a test also proves the messages survive
the codec. The in-memory "disk" is a dict of bytearrays the test fills from
the receiver's WriteChunk actions.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import zstandard

from dorothy.protocol import messages
from dorothy.protocol.compression import compress_if_smaller
from dorothy.protocol.errors import LocalProtocolError, RemoteProtocolError
from dorothy.protocol.manifest import MIN_CHUNK_SIZE, FileEntry, Manifest, open_manifest, sign_manifest
from dorothy.protocol.messages import Abort, Accept, Chunk, Done, FileDone, Offer, Receipt
from dorothy.protocol.receipt import ReceiptBody, sign_receipt
from dorothy.protocol.transfer import (
    Aborted,
    Bitmap,
    Delivered,
    Finalize,
    ReceiverMachine,
    ReceiverState,
    SenderMachine,
    SenderState,
    WriteChunk,
)

CHUNK = MIN_CHUNK_SIZE  # 64 KiB keeps multi-chunk files small
SENDER_KEY = nacl.signing.SigningKey.generate()
RECEIVER_KEY = nacl.signing.SigningKey.generate()
THIRD_KEY = nacl.signing.SigningKey.generate()
SENDER = SENDER_KEY.verify_key.encode() + bytes(range(32))
RECEIVER = RECEIVER_KEY.verify_key.encode() + bytes(range(32, 64))
TIME = "2024-05-01T12:00:00.000000Z"


def wire(message):
    """What the peer gets: the message after a trip through the codec."""
    return messages.decode(messages.encode(message))


def file_content(kind: str, size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "zeros":
        return bytes(size)
    line = b"%d evidence line for case %d\n" % (seed, rng.randrange(1000))
    return (line * (size // len(line) + 1))[:size]


@dataclass
class Transfer:
    """Both ends of one transfer, the source files, and the receiver's disk."""

    sources: list[bytes]
    manifest: Manifest
    envelope: bytes
    manifest_hash: bytes
    sender: SenderMachine
    receiver: ReceiverMachine | None = None
    disk: dict[int, bytearray] = field(default_factory=dict)

    @property
    def digests(self) -> tuple[bytes, ...]:
        return tuple(hashlib.sha256(data).digest() for data in self.sources)


def make_transfer(sources: list[bytes], *, names: list[str] | None = None, transfer_id: bytes = b"T" * 16) -> Transfer:
    names = names or [f"dir{i % 3}/file{i}.bin" for i in range(len(sources))]
    manifest = Manifest(
        transfer_id=transfer_id,
        sender=SENDER,
        receiver=RECEIVER,
        created=TIME,
        chunk_size=CHUNK,
        files=tuple(FileEntry(name, len(data), 0) for name, data in zip(names, sources)),
    )
    envelope = sign_manifest(manifest, lambda m: SENDER_KEY.sign(m).signature)
    opened, digest = open_manifest(envelope)
    sender = SenderMachine(opened, envelope, digest, RECEIVER_KEY.verify_key.encode())
    return Transfer(list(sources), opened, envelope, digest, sender)


def start(t: Transfer, have: Bitmap | None = None) -> Bitmap:
    """Offer -> (receiver opens the manifest) -> Accept -> the sender's plan."""
    offer = wire(t.sender.offer())
    assert isinstance(offer, Offer)
    manifest, digest = open_manifest(offer.manifest)
    assert manifest == t.manifest and digest == t.manifest_hash
    t.receiver = ReceiverMachine(manifest, have if have is not None else Bitmap(manifest.total_chunks))
    plan = t.sender.receive(wire(t.receiver.accept()))
    assert isinstance(plan, Bitmap)
    assert t.sender.state is SenderState.SENDING
    return plan


def chunk_message(t: Transfer, file: int, index: int) -> Chunk:
    data = t.sources[file][index * CHUNK : (index + 1) * CHUNK]
    compressed, payload = compress_if_smaller(data)
    return Chunk(file=file, index=index, compressed=compressed, data=payload)


def apply(t: Transfer, action: WriteChunk) -> None:
    disk = t.disk.setdefault(action.file, bytearray(t.manifest.files[action.file].size))
    assert action.offset == action.index * CHUNK
    assert action.offset + len(action.data) <= len(disk)
    disk[action.offset : action.offset + len(action.data)] = action.data


def send_chunks(t: Transfer) -> list[tuple[int, int]]:
    """Every chunk the sender's plan needs, written and made durable."""
    sent = []
    for f in range(len(t.manifest.files)):
        for i in range(t.manifest.chunk_count(f)):
            if not t.sender.needs(f, i):
                continue
            action = t.receiver.receive(wire(chunk_message(t, f, i)))
            assert isinstance(action, WriteChunk)
            assert (action.file, action.index) == (f, i)
            apply(t, action)
            t.receiver.chunk_durable(f, i)
            sent.append((f, i))
    return sent


def send_file_dones(t: Transfer) -> None:
    for f, digest in enumerate(t.digests):
        assert t.receiver.receive(wire(FileDone(file=f, sha256=digest))) is None


def finish(t: Transfer) -> Finalize:
    finalize = t.receiver.receive(wire(t.sender.done()))
    assert isinstance(finalize, Finalize)
    assert t.receiver.state is ReceiverState.FINALIZING
    assert t.sender.state is SenderState.AWAIT_RECEIPT
    return finalize


def receipt_for(t: Transfer, *, key=RECEIVER_KEY, **overrides) -> Receipt:
    fields = dict(
        transfer_id=t.manifest.transfer_id,
        manifest_hash=t.manifest_hash,
        sender=t.manifest.sender,
        receiver=t.manifest.receiver,
        file_sha256=t.digests,
        time=TIME,
    )
    fields.update(overrides)
    envelope = sign_receipt(ReceiptBody(**fields), lambda m: key.sign(m).signature)
    return Receipt(receipt=envelope, checkpoint="checkpoint note")


def run_to_finalize(t: Transfer) -> Finalize:
    start(t)
    send_chunks(t)
    send_file_dones(t)
    return finish(t)


def remote_error(call, code: str, *words: str) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        call()
    assert info.value.code == code, f"{info.value.code}: {info.value}"
    for w in words:
        assert w in str(info.value)
    return info.value


# --- the whole exchange ---------------------------------------------------------------


_sizes = st.one_of(
    st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK]),
    st.integers(0, 3 * CHUNK + 1),
)
_files = st.lists(st.tuples(st.sampled_from(["random", "text", "zeros"]), _sizes, st.integers(0, 1 << 30)), min_size=1, max_size=6)


@given(_files)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_full_exchange_reproduces_every_file(spec):
    sources = [file_content(kind, size, seed) for kind, size, seed in spec]
    t = make_transfer(sources)
    plan = start(t)
    assert plan.count() == 0  # the receiver had nothing: everything is needed
    sent = send_chunks(t)
    assert len(sent) == t.manifest.total_chunks
    send_file_dones(t)
    finalize = finish(t)
    assert finalize.sender_sha256 == t.digests

    # What the daemon would write is the source, byte for byte (empty files included).
    for f, data in enumerate(sources):
        assert bytes(t.disk.get(f, b"")) == data
    t.receiver.finalized()
    assert t.receiver.state is ReceiverState.DONE

    receipt = receipt_for(t)
    delivered = t.sender.receive(wire(receipt))
    assert isinstance(delivered, Delivered)
    assert delivered.receipt.file_sha256 == t.digests
    assert delivered.receipt.manifest_hash == t.manifest_hash
    assert delivered.envelope == receipt.receipt
    assert delivered.checkpoint == "checkpoint note"
    assert t.sender.state is SenderState.DELIVERED


def test_a_transfer_of_only_empty_files_needs_no_chunks():
    t = make_transfer([b"", b""])
    plan = start(t)
    assert t.manifest.total_chunks == 0 and plan.to_bytes() == b""
    assert send_chunks(t) == []
    send_file_dones(t)
    assert finish(t).sender_sha256 == (hashlib.sha256(b"").digest(),) * 2


@pytest.mark.parametrize("sizes", [[0], [8 * CHUNK, 0], [CHUNK, 0, CHUNK]], ids=["only-empty", "empty-last", "empty-between"])
def test_an_empty_file_never_needs_a_chunk(sizes):
    # Its base slot is the next file's (or one past the have-map's end).
    t = make_transfer([bytes(size) for size in sizes])
    start(t)
    for file, size in enumerate(sizes):
        if size == 0:
            assert t.sender.needs(file, 0) is False
            assert t.sender.missing(file) == 0


def test_compressible_chunks_travel_compressed():
    t = make_transfer([file_content("text", 2 * CHUNK, 1), file_content("random", CHUNK, 2)])
    start(t)
    assert chunk_message(t, 0, 0).compressed
    assert not chunk_message(t, 1, 0).compressed
    send_chunks(t)
    assert bytes(t.disk[0]) == t.sources[0] and bytes(t.disk[1]) == t.sources[1]


# --- resume ---------------------------------------------------------------------------


@given(_files, st.randoms(use_true_random=False))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_resume_skips_exactly_the_chunks_the_receiver_holds(spec, rng):
    sources = [file_content(kind, size, seed) for kind, size, seed in spec]
    t = make_transfer(sources)
    bases = t.manifest.chunk_bases()
    slots = [(f, i) for f in range(len(sources)) for i in range(t.manifest.chunk_count(f))]
    held = {s for s in slots if rng.random() < 0.5}
    have = Bitmap(t.manifest.total_chunks)
    for f, i in held:
        have.add(bases[f] + i)
        # A previous connection left those chunks on disk.
        apply(t, WriteChunk(f, i, i * CHUNK, sources[f][i * CHUNK : (i + 1) * CHUNK]))

    plan = start(t, have)
    assert plan.to_bytes() == have.to_bytes()
    needed = {(f, i) for f, i in slots if t.sender.needs(f, i)}
    assert needed == set(slots) - held

    sent = send_chunks(t)
    assert set(sent) == needed
    send_file_dones(t)
    assert finish(t).sender_sha256 == t.digests
    for f, data in enumerate(sources):
        assert bytes(t.disk.get(f, b"")) == data


def test_the_accept_carries_the_receivers_have_map():
    t = make_transfer([bytes(3 * CHUNK), bytes(CHUNK)])
    have = Bitmap(4)
    have.add(1)
    have.add(3)
    start(t, have)
    assert [t.sender.needs(0, i) for i in range(3)] == [True, False, True]
    assert t.sender.needs(1, 0) is False


def test_a_chunk_the_receiver_already_holds_produces_no_write():
    t = make_transfer([file_content("text", 2 * CHUNK, 3)])
    have = Bitmap(2)
    have.add(0)
    start(t, have)
    assert t.receiver.receive(wire(chunk_message(t, 0, 0))) is None


def test_a_resent_chunk_produces_no_second_write_before_or_after_it_is_durable():
    t = make_transfer([file_content("text", 2 * CHUNK, 4)])
    start(t)
    assert isinstance(t.receiver.receive(wire(chunk_message(t, 0, 1))), WriteChunk)
    assert t.receiver.receive(wire(chunk_message(t, 0, 1))) is None  # still pending
    t.receiver.chunk_durable(0, 1)
    assert t.receiver.receive(wire(chunk_message(t, 0, 1))) is None  # durable


def test_a_receipt_resent_after_a_crash_is_accepted_on_the_next_offer():
    # The receiver finished, but the connection dropped before the receipt
    # arrived: on the next attempt it answers the offer with the receipt.
    t = make_transfer([b"evidence"])
    assert t.sender.state is SenderState.OFFERED
    delivered = t.sender.receive(wire(receipt_for(t)))
    assert isinstance(delivered, Delivered)
    assert t.sender.state is SenderState.DELIVERED


# --- bitmaps --------------------------------------------------------------------------


def test_bitmap_is_lsb_first_in_global_order():
    bits = Bitmap(10)
    for i in (0, 3, 8):
        bits.add(i)
    assert bits.to_bytes() == bytes([0b00001001, 0b00000001])
    assert [i for i in range(10) if i in bits] == [0, 3, 8]
    assert bits.count() == 3
    bits.discard(3)
    bits.discard(3)
    assert bits.to_bytes() == bytes([0b00000001, 0b00000001]) and bits.count() == 2


@given(st.integers(0, 200), st.data())
@settings(max_examples=100, deadline=None)
def test_bitmap_round_trips_through_bytes(size, data):
    members = data.draw(st.sets(st.integers(0, size - 1))) if size else set()
    bits = Bitmap(size)
    for i in members:
        bits.add(i)
    again = Bitmap(size, bits.to_bytes())
    assert {i for i in range(size) if i in again} == members
    assert again.count() == len(members)


@given(st.integers(0, 200), st.data())
@settings(max_examples=200, deadline=None)
def test_bitmap_counts_any_slot_range(size, data):
    members = data.draw(st.sets(st.integers(0, size - 1))) if size else set()
    start = data.draw(st.integers(0, size))
    stop = data.draw(st.integers(0, size))
    bits = Bitmap(size)
    for i in members:
        bits.add(i)
    assert bits.count(start, stop) == len([i for i in members if start <= i < stop])


# --- hostile input to the receiver ----------------------------------------------------


@pytest.fixture
def receiving() -> Transfer:
    t = make_transfer([file_content("text", CHUNK + 100, 5), file_content("random", 1000, 6), b""])
    start(t)
    return t


def test_chunk_file_index_out_of_range(receiving):
    t = receiving
    remote_error(lambda: t.receiver.receive(Chunk(file=3, index=0, compressed=False, data=b"x")), "bad_chunk", "file index 3")
    # and on the wire, an index no manifest can have is refused by the decoder
    raw = messages.encode(Chunk(file=-1, index=0, compressed=False, data=b"x"))
    remote_error(lambda: messages.decode(raw), "malformed", "'f'")


def test_file_done_index_out_of_range(receiving):
    t = receiving
    remote_error(lambda: t.receiver.receive(FileDone(file=3, sha256=bytes(32))), "bad_file_done", "file index 3")


@pytest.mark.parametrize("file, index, count", [(0, 2, 2), (1, 1, 1), (2, 0, 0), (0, 10**6, 2)])
def test_chunk_index_out_of_range(receiving, file, index, count):
    t = receiving
    remote_error(
        lambda: t.receiver.receive(Chunk(file=file, index=index, compressed=False, data=b"x")),
        "bad_chunk",
        f"chunk {index} of file {file} is out of range (the file has {count})",
    )


@pytest.mark.parametrize("file, index, length", [(0, 0, CHUNK - 1), (0, 0, CHUNK + 1), (0, 1, 99), (0, 1, CHUNK), (1, 0, 0)])
def test_an_uncompressed_chunk_of_the_wrong_length(receiving, file, index, length):
    t = receiving
    expected = t.manifest.chunk_length(file, index)
    remote_error(
        lambda: t.receiver.receive(Chunk(file=file, index=index, compressed=False, data=bytes(length))),
        "bad_chunk",
        f"has {length} bytes, expected {expected}",
    )


@pytest.mark.parametrize("length", [99, 101, CHUNK])
def test_a_compressed_chunk_that_decompresses_to_the_wrong_length(receiving, length):
    t = receiving
    payload = zstandard.ZstdCompressor().compress(bytes(length))
    remote_error(
        lambda: t.receiver.receive(Chunk(file=0, index=1, compressed=True, data=payload)), "bad_chunk", "expected 100"
    )


def test_a_compressed_chunk_that_is_not_zstd(receiving):
    t = receiving
    remote_error(lambda: t.receiver.receive(Chunk(file=0, index=1, compressed=True, data=b"not zstd")), "bad_chunk")


def test_a_bomb_chunk_is_refused(receiving):
    t = receiving
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    remote_error(lambda: t.receiver.receive(wire(Chunk(file=0, index=0, compressed=True, data=bomb))), "bad_chunk", "declares")
    claims_2_gib = b"\x28\xb5\x2f\xfd\xa0" + (2 << 30).to_bytes(4, "little") + bytes([0x09, 0, 0]) + b"x"
    remote_error(lambda: t.receiver.receive(Chunk(file=0, index=0, compressed=True, data=claims_2_gib)), "bad_chunk")


def test_a_refused_chunk_does_not_count_as_received(receiving):
    t = receiving
    with pytest.raises(RemoteProtocolError):
        t.receiver.receive(Chunk(file=0, index=1, compressed=False, data=bytes(99)))
    action = t.receiver.receive(wire(chunk_message(t, 0, 1)))
    assert isinstance(action, WriteChunk) and action.data == t.sources[0][CHUNK:]


def test_done_while_chunks_are_missing(receiving):
    t = receiving
    t.receiver.receive(wire(chunk_message(t, 0, 0)))
    t.receiver.chunk_durable(0, 0)
    send_file_dones(t)
    remote_error(lambda: t.receiver.receive(Done()), "incomplete", "2 chunks still missing")


def test_done_while_a_written_chunk_is_not_yet_durable(receiving):
    t = receiving
    for f, i in [(0, 0), (0, 1), (1, 0)]:
        assert isinstance(t.receiver.receive(wire(chunk_message(t, f, i))), WriteChunk)
    for f, i in [(0, 0), (0, 1)]:
        t.receiver.chunk_durable(f, i)
    send_file_dones(t)
    remote_error(lambda: t.receiver.receive(Done()), "incomplete", "1 chunks still missing")
    t.receiver.chunk_durable(1, 0)
    assert isinstance(t.receiver.receive(Done()), Finalize)


def test_done_without_a_file_done(receiving):
    t = receiving
    send_chunks(t)
    for f in (0, 2):
        t.receiver.receive(wire(FileDone(file=f, sha256=t.digests[f])))
    remote_error(lambda: t.receiver.receive(wire(Done())), "incomplete", "SHA-256 of file 1")


def test_the_last_file_done_for_a_file_wins(receiving):
    t = receiving
    send_chunks(t)
    t.receiver.receive(FileDone(file=1, sha256=bytes(32)))
    send_file_dones(t)
    assert finish(t).sender_sha256 == t.digests


@pytest.mark.parametrize("held", [False, True], ids=["new", "already-held"])
def test_a_chunk_carrying_its_files_sha256_stands_for_its_file_done(receiving, held):
    # File 1 is one chunk: it travels with its SHA-256 and no file_done.
    # A resend of a chunk already held still delivers the hash it carries.
    t = receiving
    if held:
        apply(t, t.receiver.receive(wire(chunk_message(t, 1, 0))))
        t.receiver.chunk_durable(1, 0)
    whole = chunk_message(t, 1, 0)
    action = t.receiver.receive(wire(Chunk(file=1, index=0, compressed=whole.compressed, data=whole.data, sha256=t.digests[1])))
    assert (action is None) == held
    if action is not None:
        apply(t, action)
        t.receiver.chunk_durable(1, 0)
    for f, i in [(0, 0), (0, 1)]:
        apply(t, t.receiver.receive(wire(chunk_message(t, f, i))))
        t.receiver.chunk_durable(f, i)
    for f in (0, 2):
        t.receiver.receive(wire(FileDone(file=f, sha256=t.digests[f])))
    assert finish(t).sender_sha256 == t.digests
    assert bytes(t.disk[1]) == t.sources[1]


@pytest.mark.parametrize(
    "message",
    [
        Offer(manifest=b"again"),
        Accept(transfer_id=b"T" * 16, have=b""),
        Receipt(receipt=b"", checkpoint=""),
    ],
    ids=["offer", "accept", "receipt"],
)
def test_the_receiver_refuses_messages_that_only_a_receiver_sends_or_a_second_offer(receiving, message):
    remote_error(lambda: receiving.receiver.receive(message), "unexpected_message", "in state receiving")


@pytest.mark.parametrize(
    "message",
    [
        Chunk(file=0, index=0, compressed=False, data=b"x"),
        FileDone(file=0, sha256=bytes(32)),
        Done(),
        Offer(manifest=b"x"),
    ],
    ids=["chunk", "file_done", "done", "offer"],
)
def test_a_finalizing_receiver_accepts_nothing_more(message):
    t = make_transfer([b"abc"])
    run_to_finalize(t)
    remote_error(lambda: t.receiver.receive(message), "unexpected_message", "in state finalizing")
    t.receiver.finalized()
    remote_error(lambda: t.receiver.receive(message), "unexpected_message", "in state done")


def test_finalized_before_finalize_is_a_local_error(receiving):
    with pytest.raises(LocalProtocolError):
        receiving.receiver.finalized()


# --- hostile input to the sender ------------------------------------------------------


@pytest.fixture
def offered() -> Transfer:
    return make_transfer([bytes(3 * CHUNK), b"x" * 10])  # 4 chunks: one byte of have-map, 4 stray bits


@pytest.mark.parametrize(
    "message",
    [Chunk(file=0, index=0, compressed=False, data=b"x"), FileDone(file=0, sha256=bytes(32)), Done(), Offer(manifest=b"x")],
    ids=["chunk", "file_done", "done", "offer"],
)
def test_the_sender_refuses_what_only_a_sender_sends(offered, message):
    remote_error(lambda: offered.sender.receive(message), "unexpected_message", "in state offered")


def test_a_second_accept_is_refused(offered):
    t = offered
    start(t)
    remote_error(lambda: t.sender.receive(wire(t.receiver.accept())), "unexpected_message", "Accept in state sending")


def test_an_accept_naming_another_transfer_is_refused(offered):
    t = offered
    remote_error(lambda: t.sender.receive(Accept(transfer_id=b"U" * 16, have=b"\x00")), "bad_accept", "another transfer")
    assert t.sender.state is SenderState.OFFERED


@pytest.mark.parametrize("have", [b"", b"\x00\x00", bytes(100)], ids=["short", "long", "much-longer"])
def test_a_have_map_of_the_wrong_length_is_refused(offered, have):
    remote_error(lambda: offered.sender.receive(Accept(transfer_id=b"T" * 16, have=have)), "bad_have", "4 chunks")
    assert offered.sender.state is SenderState.OFFERED


@pytest.mark.parametrize("have", [b"\x10", b"\x80", b"\xff"])
def test_a_have_map_with_bits_past_the_end_is_refused(offered, have):
    remote_error(lambda: offered.sender.receive(Accept(transfer_id=b"T" * 16, have=have)), "bad_have")


def test_a_full_have_map_is_accepted(offered):
    plan = offered.sender.receive(Accept(transfer_id=b"T" * 16, have=b"\x0f"))
    assert plan.count() == 4
    assert not any(offered.sender.needs(f, i) for f, i in [(0, 0), (0, 1), (0, 2), (1, 0)])


def test_a_receipt_before_done_is_refused(offered):
    t = offered
    start(t)
    remote_error(lambda: t.sender.receive(wire(receipt_for(t))), "unexpected_message", "Receipt in state sending")


def test_done_before_accept_is_a_local_error(offered):
    with pytest.raises(LocalProtocolError):
        offered.sender.done()


@pytest.fixture
def awaiting_receipt() -> Transfer:
    t = make_transfer([file_content("text", CHUNK + 1, 7), b"second"])
    run_to_finalize(t)
    return t


@pytest.mark.parametrize("key", [SENDER_KEY, THIRD_KEY], ids=["sender-key", "third-key"])
def test_a_receipt_signed_by_the_wrong_key_is_refused(awaiting_receipt, key):
    t = awaiting_receipt
    remote_error(lambda: t.sender.receive(wire(receipt_for(t, key=key))), "bad_signature", "receipt has a bad signature")
    assert t.sender.state is SenderState.AWAIT_RECEIPT


@pytest.mark.parametrize(
    "override",
    [
        {"manifest_hash": bytes(32)},
        {"transfer_id": b"U" * 16},
        {"sender": RECEIVER},
        {"receiver": SENDER},
    ],
    ids=["manifest-hash", "transfer-id", "sender", "receiver"],
)
def test_a_receipt_for_another_manifest_is_refused(awaiting_receipt, override):
    t = awaiting_receipt
    remote_error(lambda: t.sender.receive(wire(receipt_for(t, **override))), "bad_receipt", "does not match")


@pytest.mark.parametrize("count", [0, 1, 3])
def test_a_receipt_with_the_wrong_number_of_files_is_refused(awaiting_receipt, count):
    t = awaiting_receipt
    hashes = (t.digests * 2)[:count]
    remote_error(lambda: t.sender.receive(wire(receipt_for(t, file_sha256=hashes))), "bad_receipt", "number of files")


def test_a_receipt_whose_body_was_altered_is_refused(awaiting_receipt):
    t = awaiting_receipt
    good = receipt_for(t).receipt
    at = good.index(TIME.encode())
    forged = good[:at] + b"1" + good[at + 1 :]
    remote_error(lambda: t.sender.receive(Receipt(receipt=forged, checkpoint="")), "bad_signature")


def test_nothing_but_abort_after_delivery(awaiting_receipt):
    t = awaiting_receipt
    t.sender.receive(wire(receipt_for(t)))
    remote_error(lambda: t.sender.receive(wire(receipt_for(t))), "unexpected_message", "in state delivered")


# --- abort ----------------------------------------------------------------------------


def _sender_in(state: SenderState) -> SenderMachine:
    t = make_transfer([b"abc"])
    if state is SenderState.OFFERED:
        return t.sender
    start(t)
    if state is SenderState.SENDING:
        return t.sender
    send_chunks(t)
    send_file_dones(t)
    finish(t)
    if state is SenderState.AWAIT_RECEIPT:
        return t.sender
    t.sender.receive(wire(receipt_for(t)))
    assert t.sender.state is SenderState.DELIVERED
    return t.sender


def _receiver_in(state: ReceiverState) -> ReceiverMachine:
    t = make_transfer([b"abc"])
    start(t)
    if state is ReceiverState.RECEIVING:
        return t.receiver
    send_chunks(t)
    send_file_dones(t)
    finish(t)
    if state is ReceiverState.DONE:
        t.receiver.finalized()
    return t.receiver


@pytest.mark.parametrize("final", [True, False])
@pytest.mark.parametrize("state", [SenderState.OFFERED, SenderState.SENDING, SenderState.AWAIT_RECEIPT, SenderState.DELIVERED])
def test_the_sender_accepts_abort_in_any_state(state, final):
    sender = _sender_in(state)
    assert sender.state is state
    result = sender.receive(wire(Abort(code="disk_full", reason="no space left \u2014 try later", final=final)))
    assert result == Aborted("disk_full", "no space left \u2014 try later", final)
    assert sender.state is SenderState.ABORTED
    remote_error(lambda: sender.receive(Accept(transfer_id=b"T" * 16, have=b"\x00")), "unexpected_message", "aborted")


@pytest.mark.parametrize("final", [True, False])
@pytest.mark.parametrize("state", [ReceiverState.RECEIVING, ReceiverState.FINALIZING, ReceiverState.DONE])
def test_the_receiver_accepts_abort_in_any_state(state, final):
    receiver = _receiver_in(state)
    assert receiver.state is state
    result = receiver.receive(wire(Abort(code="cancelled", reason="cancelled by the sending operator", final=final)))
    assert result == Aborted("cancelled", "cancelled by the sending operator", final)
    assert receiver.state is ReceiverState.ABORTED
    remote_error(lambda: receiver.receive(Done()), "unexpected_message", "aborted")


def test_abort_survives_the_codec_with_its_flag():
    for final in (True, False):
        assert wire(Abort(code="c", reason="r", final=final)) == Abort(code="c", reason="r", final=final)
