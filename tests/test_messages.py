"""Properties of protocol/messages.py and the strict decoder in codec.py.

Every message a peer can send round-trips; anything else a peer can send,
from random bytes to well-formed msgpack with the wrong shape, is refused
with RemoteProtocolError, and a field out of bounds is refused by name.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dorothy.protocol import messages
from dorothy.protocol.codec import pack
from dorothy.protocol.errors import RemoteProtocolError
from dorothy.protocol.manifest import MAX_CHUNK_SIZE, MAX_FILES, MAX_MANIFEST_BYTES, MAX_TOTAL_CHUNKS, TRANSFER_ID_LEN
from dorothy.protocol.messages import (
    MAX_CHECKPOINT_BYTES,
    MAX_HAVE_BYTES,
    MAX_REASON,
    MAX_RECEIPT_BYTES,
    Abort,
    Accept,
    Chunk,
    Done,
    FileDone,
    Offer,
    Receipt,
)
from dorothy.protocol.session import MAX_RECORD_PLAINTEXT

FAST = settings(max_examples=100, deadline=None)

TYPES = ("offer", "accept", "chunk", "file_done", "done", "receipt", "abort")

# Field values inside their bounds; sizes stay small for speed, and the
# exact bounds are tested one by one below.
small_bytes = st.binary(max_size=200)
file_index = st.integers(0, MAX_FILES - 1)
message_values = st.one_of(
    st.builds(Offer, manifest=small_bytes),
    st.builds(Accept, transfer_id=st.binary(min_size=TRANSFER_ID_LEN, max_size=TRANSFER_ID_LEN), have=small_bytes),
    st.builds(
        Chunk, file=file_index, index=st.integers(0, MAX_TOTAL_CHUNKS - 1), compressed=st.booleans(), data=small_bytes,
        sha256=st.none() | st.binary(min_size=32, max_size=32),
    ),
    st.builds(FileDone, file=file_index, sha256=st.binary(min_size=32, max_size=32)),
    st.just(Done()),
    st.builds(Receipt, receipt=small_bytes, checkpoint=st.text(max_size=100)),
    st.builds(Abort, code=st.text(max_size=64), reason=st.text(max_size=200), final=st.booleans()),
)


@FAST
@given(message_values)
def test_every_message_round_trips(message):
    assert messages.decode(messages.encode(message)) == message


def test_encode_refuses_what_is_not_a_message():
    with pytest.raises(TypeError):
        messages.encode({"t": "done"})


# -- the largest legal message of each kind still fits one record -----------


def test_largest_legal_messages_round_trip_and_fit_one_session_record():
    largest = [
        Offer(manifest=bytes(MAX_MANIFEST_BYTES)),
        Accept(transfer_id=bytes(TRANSFER_ID_LEN), have=bytes(MAX_HAVE_BYTES)),
        Chunk(file=MAX_FILES - 1, index=MAX_TOTAL_CHUNKS - 1, compressed=True, data=bytes(MAX_CHUNK_SIZE), sha256=bytes(32)),
        FileDone(file=MAX_FILES - 1, sha256=bytes(32)),
        Receipt(receipt=bytes(MAX_RECEIPT_BYTES), checkpoint="\U0001f4dc" * MAX_CHECKPOINT_BYTES),
        Abort(code="\U0001f4dc" * 64, reason="\U0001f4dc" * MAX_REASON, final=True),
    ]
    for message in largest:
        wire = messages.encode(message)
        assert len(wire) <= MAX_RECORD_PLAINTEXT, type(message).__name__
        assert messages.decode(wire) == message


# -- anything else is refused with the protocol's own error -----------------


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_remote_error(data):
    try:
        decoded = messages.decode(data)
    except RemoteProtocolError:
        return
    assert messages.decode(messages.encode(decoded)) == decoded


# Anything msgpack can carry, including extension types and timestamps,
# non-string keys and values at the edges of msgpack's integer range.
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=40),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
)
FIELD_NAMES = ("t", "manifest", "transfer_id", "have", "f", "i", "z", "d", "sha256", "receipt", "checkpoint", "code", "reason", "final")
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=10), st.binary(max_size=10), st.integers(-5, 5))
msgpack_values = st.recursive(
    leaves,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
    max_leaves=10,
)


# What a strict decoder lets through to the schema check: no extension
# types, string keys only.
plain_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=40)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=10,
)


def packb(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=False)


def assert_only_remote_errors(data: bytes):
    try:
        decoded = messages.decode(data)
    except RemoteProtocolError:
        return
    # If it decoded, it is a real message with every field in bounds.
    assert messages.decode(messages.encode(decoded)) == decoded


@settings(max_examples=150, deadline=None)
@given(msgpack_values)
def test_random_msgpack_structures_raise_only_remote_errors(value):
    assert_only_remote_errors(packb(value))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(TYPES), st.dictionaries(st.sampled_from(FIELD_NAMES), st.one_of(leaves, msgpack_values), max_size=6))
def test_maps_with_a_known_type_and_random_fields_raise_only_remote_errors(kind, fields):
    assert_only_remote_errors(packb({**fields, "t": kind}))


def wire_fields(message) -> dict:
    return msgpack.unpackb(messages.encode(message), raw=False)


@FAST
@given(message_values.filter(lambda m: not isinstance(m, Done)), st.data())
def test_any_field_of_the_wrong_type_is_refused_by_name(message, data):
    fields = wire_fields(message)
    name = data.draw(st.sampled_from(sorted(k for k in fields if k != "t")), label="field")
    original = fields[name]
    wrong = data.draw(plain_values.filter(lambda v: type(v) is not type(original)), label="value")
    fields[name] = wrong
    with pytest.raises(RemoteProtocolError) as info:
        messages.decode(packb(fields))
    assert repr(name) in str(info.value)
    assert info.value.code == "malformed"


@FAST
@given(message_values.filter(lambda m: not isinstance(m, Done)), st.data())
def test_any_missing_field_is_refused_by_name(message, data):
    fields = wire_fields(message)
    optional = {"chunk": {"s"}}.get(fields["t"], set())  # a chunk without "s" is a plain chunk
    name = data.draw(st.sampled_from(sorted(k for k in fields if k != "t" and k not in optional)), label="field")
    del fields[name]
    with pytest.raises(RemoteProtocolError) as info:
        messages.decode(packb(fields))
    assert repr(name) in str(info.value)


@FAST
@given(message_values, st.dictionaries(st.text(min_size=1, max_size=10), plain_values, max_size=3))
def test_unknown_extra_fields_are_ignored(message, extra):
    fields = wire_fields(message)
    extra = {k: v for k, v in extra.items() if k not in fields}
    assert messages.decode(packb({**extra, **fields})) == message


@pytest.mark.parametrize(
    "obj, code",
    [
        ({"t": "hello"}, "unknown_message"),
        ({"t": ""}, "unknown_message"),
        ({"t": 1}, "malformed"),
        ({"t": b"done"}, "malformed"),
        ({"t": "x" * 33}, "malformed"),
        ({}, "malformed"),
        (["done"], "malformed"),
        ("done", "malformed"),
        (None, "malformed"),
    ],
)
def test_what_is_not_a_typed_map_is_refused(obj, code):
    with pytest.raises(RemoteProtocolError) as info:
        messages.decode(packb(obj))
    assert info.value.code == code


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\xc1",  # the one byte msgpack never uses
        packb({"t": "done"}) + b"\x00",  # trailing data
        packb({"t": "done"})[:-1],  # truncated
        b"\xdf\xff\xff\xff\xff",  # a map announcing 4 billion entries
        b"\xc6\xff\xff\xff\xff",  # a bin announcing 4 GiB
        b"\x91" * 5000 + b"\xc0",  # nesting deeper than any message
        packb({"t": "done", 1: 2}),  # a non-string key
        packb(msgpack.ExtType(5, b"x")),
        packb(msgpack.Timestamp(0, 0)),
    ],
)
def test_malformed_msgpack_is_refused(wire):
    with pytest.raises(RemoteProtocolError) as info:
        messages.decode(wire)
    assert info.value.code == "malformed"


# -- field bounds, each refused by name -------------------------------------


def valid(kind: str) -> dict:
    return {
        "offer": {"t": "offer", "manifest": b"m"},
        "accept": {"t": "accept", "transfer_id": bytes(TRANSFER_ID_LEN), "have": b""},
        "chunk": {"t": "chunk", "f": 0, "i": 0, "z": False, "d": b"data"},
        "file_done": {"t": "file_done", "f": 0, "sha256": bytes(32)},
        "receipt": {"t": "receipt", "receipt": b"r", "checkpoint": "c"},
        "abort": {"t": "abort", "code": "busy", "reason": "", "final": False},
    }[kind]


OUT_OF_BOUNDS = [
    ("chunk", "d", bytes(MAX_CHUNK_SIZE + 1)),
    ("chunk", "f", -1),
    ("chunk", "f", MAX_FILES),
    ("chunk", "i", -1),
    ("chunk", "i", MAX_TOTAL_CHUNKS),
    ("chunk", "i", 2**64 - 1),
    ("chunk", "z", 1),
    ("chunk", "f", True),
    ("chunk", "f", 1.0),
    ("chunk", "s", bytes(31)),
    ("chunk", "s", bytes(33)),
    ("chunk", "s", None),
    ("file_done", "sha256", bytes(31)),
    ("file_done", "sha256", bytes(33)),
    ("file_done", "f", -1),
    ("accept", "transfer_id", bytes(TRANSFER_ID_LEN - 1)),
    ("accept", "transfer_id", bytes(TRANSFER_ID_LEN + 1)),
    ("accept", "have", bytes(MAX_HAVE_BYTES + 1)),
    ("offer", "manifest", bytes(MAX_MANIFEST_BYTES + 1)),
    ("offer", "manifest", "a string, not bytes"),
    ("receipt", "receipt", bytes(MAX_RECEIPT_BYTES + 1)),
    ("receipt", "checkpoint", "c" * (MAX_CHECKPOINT_BYTES + 1)),
    ("receipt", "checkpoint", b"bytes, not a string"),
    ("abort", "code", "c" * 65),
    ("abort", "reason", "r" * (MAX_REASON + 1)),
    ("abort", "final", 0),
    ("abort", "final", None),
]


@pytest.mark.parametrize(
    "kind, name, value",
    OUT_OF_BOUNDS,
    ids=[f"{k}.{n}={type(v).__name__}" + (f"[{len(v)}]" if isinstance(v, (bytes, str)) else f"({v})") for k, n, v in OUT_OF_BOUNDS],
)
def test_field_out_of_bounds_is_refused_by_name(kind, name, value):
    good = valid(kind)
    messages.decode(pack(good))  # the baseline is legal
    with pytest.raises(RemoteProtocolError) as info:
        messages.decode(pack({**good, name: value}))
    assert info.value.code == "malformed"
    assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    "kind, name, value",
    [
        ("chunk", "d", bytes(MAX_CHUNK_SIZE)),
        ("chunk", "f", MAX_FILES - 1),
        ("chunk", "i", MAX_TOTAL_CHUNKS - 1),
        ("chunk", "d", b""),
        ("chunk", "s", bytes(32)),
        ("accept", "have", bytes(MAX_HAVE_BYTES)),
        ("accept", "have", b""),
        ("receipt", "checkpoint", "c" * MAX_CHECKPOINT_BYTES),
        ("abort", "code", "c" * 64),
        ("abort", "reason", "r" * MAX_REASON),
    ],
)
def test_field_exactly_at_its_bound_is_accepted(kind, name, value):
    decoded = messages.decode(pack({**valid(kind), name: value}))
    assert value in (getattr(decoded, attr) for attr in decoded.__slots__)


chunks = st.builds(
    Chunk, file=file_index, index=st.integers(0, MAX_TOTAL_CHUNKS - 1), compressed=st.booleans(),
    data=st.one_of(small_bytes, st.integers(0, 70000).map(bytes)),  # every bin header size
    sha256=st.none() | st.binary(min_size=32, max_size=32),  # a one-chunk file's chunk carries it
)


@FAST
@given(chunks)
def test_a_chunk_is_encoded_as_the_msgpack_map_spec_describes(chunk):
    # The header is built alone so that a sender can read data into place:
    # header + data must be exactly the map msgpack itself would pack.
    fields = {"t": "chunk", "f": chunk.file, "i": chunk.index, "z": chunk.compressed}
    if chunk.sha256 is not None:
        fields["s"] = chunk.sha256
    expected = pack({**fields, "d": chunk.data})
    assert messages.encode(chunk) == expected
    header = messages.chunk_header(chunk.file, chunk.index, chunk.compressed, len(chunk.data), chunk.sha256)
    assert header + chunk.data == expected and len(header) <= messages.MAX_CHUNK_HEADER


@FAST
@given(chunks)
def test_a_received_chunk_is_a_view_of_the_record_not_a_copy(chunk):
    record = bytearray(messages.encode(chunk))
    decoded = messages.decode(memoryview(record))
    assert decoded == chunk
    assert isinstance(decoded.data, memoryview) and decoded.data.obj is record


def _outcome(decode, data):
    try:
        return decode(data)
    except RemoteProtocolError as exc:
        return exc.code


@settings(max_examples=500, deadline=None)
@given(chunks, st.data())
def test_the_in_place_chunk_decoder_agrees_with_the_generic_one_on_any_damage(chunk, draw):
    """Whatever a peer sends that starts like a chunk, decode() and the
    generic msgpack decoder give the same message or the same refusal."""
    data = bytearray(messages.encode(chunk))
    for _ in range(draw.draw(st.integers(1, 3))):
        action = draw.draw(st.sampled_from(["flip", "cut", "extend"]))
        if action == "flip" and data:
            data[draw.draw(st.integers(0, min(len(data), 60) - 1))] ^= draw.draw(st.integers(1, 255))
        elif action == "cut":
            del data[draw.draw(st.integers(0, len(data))):]
        else:
            data += draw.draw(st.binary(min_size=1, max_size=3))
    assert _outcome(messages.decode, bytes(data)) == _outcome(messages.decode_generic, bytes(data))


@pytest.mark.parametrize("field, value", [("f", MAX_FILES), ("i", MAX_TOTAL_CHUNKS), ("f", -1), ("i", (1 << 64) - 1)])
def test_a_chunk_field_out_of_bounds_is_refused_by_name_on_either_path(field, value):
    fields = {"t": "chunk", "f": 0, "i": 0, "z": False, "d": b"x"}
    fields[field] = value
    with pytest.raises(RemoteProtocolError) as info:
        messages.decode(pack(fields))
    assert repr(field) in str(info.value)
