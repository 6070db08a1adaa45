"""protocol/manifest.py: building, signing and opening manifests.

A receiver runs `open_manifest` on bytes from the network before it creates
anything, so most of these tests hand it something hostile and check that it
is refused with a RemoteProtocolError that says what is wrong.
"""

from __future__ import annotations

import hashlib

import msgpack
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dorothy.protocol import signed
from dorothy.protocol.codec import pack
from dorothy.protocol.errors import RemoteProtocolError
from dorothy.protocol.manifest import (
    DEFAULT_CHUNK_SIZE,
    MANIFEST_VERSION,
    MAX_CHUNK_SIZE,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_TOTAL_CHUNKS,
    MIN_CHUNK_SIZE,
    FileEntry,
    Manifest,
    manifest_hash,
    open_manifest,
    sign_manifest,
    validate_manifest,
)
from dorothy.protocol.paths import quoted

SENDER_KEY = nacl.signing.SigningKey(bytes(range(32)))
RECEIVER_KEY = nacl.signing.SigningKey(bytes(range(1, 33)))
OTHER_KEY = nacl.signing.SigningKey.generate()
DH_SENDER = bytes([7]) * 32
DH_RECEIVER = bytes([9]) * 32
SENDER = SENDER_KEY.verify_key.encode() + DH_SENDER
RECEIVER = RECEIVER_KEY.verify_key.encode() + DH_RECEIVER
TRANSFER_ID = bytes(range(16))
CREATED = "2024-05-01T12:00:00.000000Z"


def sign(m: bytes) -> bytes:
    return SENDER_KEY.sign(m).signature


def make_manifest(files=(("a.txt", 10, 0),), *, chunk_size=DEFAULT_CHUNK_SIZE, **overrides) -> Manifest:
    fields = dict(
        transfer_id=TRANSFER_ID,
        sender=SENDER,
        receiver=RECEIVER,
        created=CREATED,
        chunk_size=chunk_size,
        files=tuple(FileEntry(*f) for f in files),
    )
    fields.update(overrides)
    return Manifest(**fields)


def body_map(files=(("a.txt", 10, 0),), **overrides) -> dict:
    """A manifest body as a plain map, to build what Manifest would refuse."""
    body = {
        "v": MANIFEST_VERSION,
        "transfer_id": TRANSFER_ID,
        "sender": SENDER,
        "receiver": RECEIVER,
        "created": CREATED,
        "chunk_size": DEFAULT_CHUNK_SIZE,
        "files": [list(f) for f in files],
    }
    body.update(overrides)
    return body


def seal_map(body: dict, key=SENDER_KEY) -> bytes:
    return signed.seal(signed.MANIFEST_DOMAIN, pack(body), lambda m: key.sign(m).signature)


def refused(envelope: bytes, *, code: str | None = None, says: str | tuple[str, ...] = ()) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        open_manifest(envelope)
    if code is not None:
        assert info.value.code == code, str(info.value)
    for words in (says,) if isinstance(says, str) else says:
        assert words in str(info.value)
    return info.value


# --- round trips ----------------------------------------------------------------


def test_sign_and_open_round_trip():
    manifest = make_manifest((("a.txt", 10, 123), ("dir/b.bin", 0, -5)))
    envelope = sign_manifest(manifest, sign)
    opened, digest = open_manifest(envelope)
    assert opened == manifest
    assert opened.sender_sign_public == SENDER_KEY.verify_key.encode()
    assert opened.sender_dh_public == DH_SENDER
    assert opened.total_bytes == 10
    assert digest == hashlib.sha256(manifest.encode()).digest()


def test_manifest_hash_is_sha256_of_the_signed_body_and_stable():
    manifest = make_manifest()
    envelope = sign_manifest(manifest, sign)
    body, signature = msgpack.unpackb(envelope)
    assert body == manifest.encode()
    assert manifest_hash(body) == hashlib.sha256(body).digest()
    # Signing is deterministic and encoding is canonical: the same manifest
    # always has the same hash, on either end.
    assert sign_manifest(manifest, sign) == envelope
    assert open_manifest(envelope)[1] == open_manifest(sign_manifest(manifest, sign))[1] == manifest_hash(body)
    # ... and any change to the content changes it.
    other = make_manifest((("a.txt", 11, 0),))
    assert open_manifest(sign_manifest(other, sign))[1] != manifest_hash(body)


def test_a_signed_manifest_has_exactly_one_encoding():
    # A v1 manifest has exactly its fields, in canonical order: an extra
    # field (or a repeated key another decoder might read differently) is
    # refused even though the signature over the bytes is valid. Later
    # versions change "v".
    for body in (pack(body_map(extra="from the future")), pack(dict(reversed(list(body_map().items()))))):
        envelope = signed.seal(signed.MANIFEST_DOMAIN, body, sign)
        refused(envelope, code="bad_manifest", says="canonical")
    body = pack(body_map())
    manifest, digest = open_manifest(signed.seal(signed.MANIFEST_DOMAIN, body, sign))
    assert digest == hashlib.sha256(body).digest() == hashlib.sha256(manifest.encode()).digest()


_name_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00")
_name = st.text(_name_chars, min_size=1, max_size=12)
_dir = st.text(_name_chars, min_size=1, max_size=12).map(lambda s: "d" + s)
_chunk_sizes = st.sampled_from([MIN_CHUNK_SIZE, 1 << 17, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE])


@st.composite
def manifests(draw, max_files=50):
    chunk = draw(_chunk_sizes)
    # Sizes at and around multiples of the chunk size, and anything up to 3 chunks.
    size = st.one_of(
        st.sampled_from([0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk - 1, 3 * chunk]),
        st.integers(0, 3 * chunk + 1),
        st.integers(0, 1 << 40),
    )
    n = draw(st.integers(1, max_files))
    files = []
    for i in range(n):
        depth = draw(st.integers(0, 40 if i == 0 else 4))
        dirs = draw(st.lists(_dir, min_size=depth, max_size=depth))
        # "<index>-" makes file names unique under any folding; directories
        # start with "d", so no name is both a file and a directory.
        name = f"{i}-" + draw(_name)
        files.append(FileEntry("/".join([*dirs, name]), draw(size), draw(st.integers(-(1 << 63), (1 << 63) - 1))))
    return Manifest(
        transfer_id=draw(st.binary(min_size=16, max_size=16)),
        sender=SENDER,
        receiver=draw(st.binary(min_size=64, max_size=64)),
        created=draw(st.datetimes()).strftime("%Y-%m-%dT%H:%M:%S.%fZ").rjust(27, "0"),
        chunk_size=chunk,
        files=tuple(files),
    )


@given(manifests())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_round_trip_over_random_trees(manifest):
    validate_manifest(manifest)
    envelope = sign_manifest(manifest, sign)
    opened, digest = open_manifest(envelope)
    assert opened == manifest
    assert digest == hashlib.sha256(manifest.encode()).digest()
    assert opened.total_chunks == sum(-(-f.size // manifest.chunk_size) for f in manifest.files)


# --- chunk arithmetic ------------------------------------------------------------


@pytest.mark.parametrize("chunk", [MIN_CHUNK_SIZE, DEFAULT_CHUNK_SIZE])
def test_chunk_arithmetic_at_the_edges(chunk):
    sizes = [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk]
    counts = [0, 1, 1, 1, 2, 3]
    manifest = make_manifest([(f"f{i}", s, 0) for i, s in enumerate(sizes)], chunk_size=chunk)
    assert [manifest.chunk_count(i) for i in range(len(sizes))] == counts
    assert [FileEntry("x", s, 0).chunk_count(chunk) for s in sizes] == counts
    assert manifest.total_chunks == sum(counts) == 8
    assert manifest.chunk_bases() == [0, 0, 1, 2, 3, 5]
    assert manifest.total_bytes == sum(sizes)
    lengths = {
        i: [manifest.chunk_length(i, c) for c in range(manifest.chunk_count(i))] for i in range(len(sizes))
    }
    assert lengths == {
        0: [],
        1: [1],
        2: [chunk - 1],
        3: [chunk],
        4: [chunk, 1],
        5: [chunk, chunk, chunk],
    }
    for i, size in enumerate(sizes):
        assert sum(lengths[i]) == size


@given(manifests(max_files=10))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_chunk_bases_tile_the_global_chunk_space(manifest):
    bases = manifest.chunk_bases()
    counts = [manifest.chunk_count(i) for i in range(len(manifest.files))]
    assert bases[0] == 0
    for i in range(1, len(bases)):
        assert bases[i] == bases[i - 1] + counts[i - 1]
    assert bases[-1] + counts[-1] == manifest.total_chunks
    for i, entry in enumerate(manifest.files):
        if counts[i]:
            last = manifest.chunk_length(i, counts[i] - 1)
            assert 0 < last <= manifest.chunk_size
            assert (counts[i] - 1) * manifest.chunk_size + last == entry.size


# --- hostile manifests: signatures -------------------------------------------------


def test_a_flipped_body_byte_breaks_the_signature():
    manifest = make_manifest(created="2024-05-01T12:00:00.000000Z")
    body, signature = msgpack.unpackb(sign_manifest(manifest, sign))
    at = body.index(b"2024")
    tampered = body[:at] + b"1" + body[at + 1 :]  # still a well-formed manifest
    refused(msgpack.packb([tampered, signature]), code="bad_signature", says="bad signature")


def test_a_changed_size_breaks_the_signature():
    envelope = sign_manifest(make_manifest((("a.txt", 10, 0),)), sign)
    body, signature = msgpack.unpackb(envelope)
    forged = make_manifest((("a.txt", 11, 0),)).encode()
    refused(msgpack.packb([forged, signature]), code="bad_signature")


@pytest.mark.parametrize("position", [0, 31, 32, 63])
def test_a_flipped_signature_byte_is_refused(position):
    body, signature = msgpack.unpackb(sign_manifest(make_manifest(), sign))
    bad = bytearray(signature)
    bad[position] ^= 0x01
    refused(msgpack.packb([body, bytes(bad)]), code="bad_signature", says="manifest has a bad signature")


def test_every_single_bit_flip_in_the_envelope_is_refused():
    envelope = sign_manifest(make_manifest((("a", 1, 0),)), sign)
    for byte in range(len(envelope)):
        for bit in range(8):
            mutated = bytearray(envelope)
            mutated[byte] ^= 1 << bit
            with pytest.raises(RemoteProtocolError):
                open_manifest(bytes(mutated))


def test_signed_by_a_key_other_than_the_sender_field():
    refused(seal_map(body_map(), key=OTHER_KEY), code="bad_signature", says="bad signature")


def test_a_sender_field_naming_the_signer_but_not_the_real_sender_is_just_a_different_sender():
    # Signature checks bind the manifest to the key it names; the caller must
    # still compare that key with the authenticated peer.
    mallory = OTHER_KEY.verify_key.encode() + DH_SENDER
    manifest, _ = open_manifest(seal_map(body_map(sender=mallory), key=OTHER_KEY))
    assert manifest.sender == mallory != SENDER


def test_a_receipt_signature_is_not_a_manifest_signature():
    body = pack(body_map())
    envelope = signed.seal(signed.RECEIPT_DOMAIN, body, sign)
    refused(envelope, code="bad_signature")


# --- hostile manifests: paths -----------------------------------------------------


@pytest.mark.parametrize("path", ["../escape", "a/../../etc/cron.d/x", "..", "a/./b"])
def test_traversal_paths_are_refused(path):
    refused(seal_map(body_map(files=[("ok", 1, 0), (path, 1, 0)])), code="bad_path", says=(quoted(path), "component"))


@pytest.mark.parametrize("path", ["/etc/passwd", "/tmp/x"])
def test_absolute_paths_are_refused(path):
    refused(seal_map(body_map(files=[(path, 1, 0)])), code="bad_path", says=(quoted(path), "absolute"))


@pytest.mark.parametrize("path", ["a//b", "a/", "", "a\x00.txt"])
def test_other_malformed_paths_are_refused(path):
    refused(seal_map(body_map(files=[(path, 1, 0)])), code="bad_path")


def test_a_path_that_is_not_a_string_is_refused():
    refused(seal_map(body_map(files=[(b"a.txt", 1, 0)])), code="bad_path")


def test_an_overlong_path_is_refused():
    refused(seal_map(body_map(files=[("a/" * 3000 + "a", 1, 0)])), code="bad_path")


def test_duplicate_names_are_refused():
    refused(seal_map(body_map(files=[("a.txt", 1, 0), ("a.txt", 2, 0)])), code="bad_path", says=("duplicate", quoted("a.txt")))


def test_case_colliding_names_are_refused():
    refused(
        seal_map(body_map(files=[("Report.PDF", 1, 0), ("report.pdf", 2, 0)])),
        code="bad_path",
        says=(quoted("Report.PDF"), quoted("report.pdf")),
    )


def test_normalisation_colliding_names_are_refused():
    refused(seal_map(body_map(files=[("caf\u00e9", 1, 0), ("cafe\u0301", 2, 0)])), code="bad_path")


def test_file_versus_directory_is_refused():
    refused(seal_map(body_map(files=[("a", 1, 0), ("a/b", 2, 0)])), code="bad_path", says="directory")


# --- hostile manifests: limits ----------------------------------------------------


@pytest.mark.parametrize("chunk", [MIN_CHUNK_SIZE + 1, 3 * MIN_CHUNK_SIZE, MAX_CHUNK_SIZE - 1, 0, 1 << 15, 1, 2])
def test_chunk_size_must_be_a_power_of_two_in_range(chunk):
    refused(seal_map(body_map(chunk_size=chunk)), code="bad_manifest", says=(str(chunk), "power of two"))


@pytest.mark.parametrize("chunk", [MAX_CHUNK_SIZE * 2, -DEFAULT_CHUNK_SIZE, "1048576", 2.0**20])
def test_chunk_size_beyond_the_maximum_or_not_an_int_is_refused(chunk):
    refused(seal_map(body_map(chunk_size=chunk)), says="chunk_size")


@pytest.mark.parametrize("chunk", [MIN_CHUNK_SIZE, 1 << 17, 1 << 18, 1 << 19, DEFAULT_CHUNK_SIZE, 1 << 21, MAX_CHUNK_SIZE])
def test_every_legal_chunk_size_is_accepted(chunk):
    assert open_manifest(seal_map(body_map(chunk_size=chunk)))[0].chunk_size == chunk


def test_more_than_max_files_is_refused():
    files = [[str(i), 0, 0] for i in range(MAX_FILES + 1)]
    envelope = seal_map(body_map(files=files))
    assert len(envelope) < MAX_MANIFEST_BYTES
    refused(envelope, says=("files", str(MAX_FILES)))


def test_exactly_max_files_is_accepted():
    files = [[str(i), 0, 0] for i in range(MAX_FILES)]
    manifest, _ = open_manifest(seal_map(body_map(files=files)))
    assert len(manifest.files) == MAX_FILES


def test_validate_manifest_refuses_too_many_files_on_the_sending_side():
    manifest = make_manifest([(str(i), 0, 0) for i in range(MAX_FILES + 1)])
    with pytest.raises(RemoteProtocolError, match=str(MAX_FILES)):
        validate_manifest(manifest)


def test_no_files_is_refused():
    refused(seal_map(body_map(files=[])), code="bad_manifest", says="at least one file")


@pytest.mark.parametrize("size", [-1, -(1 << 63), MAX_FILE_SIZE + 1, (1 << 64) - 1])
def test_file_size_out_of_range_is_refused(size):
    refused(seal_map(body_map(files=[("big.img", size, 0)])), code="bad_manifest", says=(quoted("big.img"), str(size)))


@pytest.mark.parametrize("size", [True, 1.0, "1", None])
def test_file_size_that_is_not_an_int_is_refused(size):
    refused(seal_map(body_map(files=[("a", size, 0)])), code="bad_manifest", says=quoted("a"))


@pytest.mark.parametrize("mtime", [1 << 63, (1 << 64) - 1, 1.5, None, "0"])
def test_bad_mtime_is_refused(mtime):
    refused(seal_map(body_map(files=[("a", 1, mtime)])), code="bad_manifest", says=(quoted("a"), "mtime"))


@pytest.mark.parametrize("mtime", [-(1 << 63), (1 << 63) - 1, 0])
def test_mtime_limits_are_inclusive(mtime):
    assert open_manifest(seal_map(body_map(files=[("a", 1, mtime)])))[0].files[0].mtime_ns == mtime


def test_total_chunks_at_the_limit_is_accepted_and_one_more_is_refused():
    chunk = MIN_CHUNK_SIZE
    half = (MAX_TOTAL_CHUNKS // 2) * chunk
    manifest, _ = open_manifest(seal_map(body_map(chunk_size=chunk, files=[("a", half, 0), ("b", half, 0)])))
    assert manifest.total_chunks == MAX_TOTAL_CHUNKS
    refused(
        seal_map(body_map(chunk_size=chunk, files=[("a", half, 0), ("b", half + 1, 0)])),
        code="bad_manifest",
        says=(str(MAX_TOTAL_CHUNKS + 1), str(MAX_TOTAL_CHUNKS)),
    )


def test_an_envelope_over_max_manifest_bytes_is_refused_before_parsing():
    refused(bytes(MAX_MANIFEST_BYTES + 1), code="too_large", says=str(MAX_MANIFEST_BYTES))


def test_a_validly_signed_envelope_over_max_manifest_bytes_is_refused():
    envelope = seal_map(body_map(padding=bytes(MAX_MANIFEST_BYTES)))
    refused(envelope, code="too_large")


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("transfer_id", bytes(15), "'transfer_id' must be exactly 16 bytes"),
        ("transfer_id", "0123456789abcdef", "'transfer_id' must be binary"),
        ("sender", SENDER[:63], "'sender' must be exactly 64 bytes"),
        ("receiver", RECEIVER + b"\x00", "'receiver' must be exactly 64 bytes"),
        ("created", "x" * 65, "'created' must be a string of at most 32"),
        ("created", "2024-05-01 12:00", "'created' must be an RFC 3339 UTC time"),
        ("v", 2, "unsupported manifest version 2"),
        ("v", "1", "'v' must be an integer"),
        ("files", "a.txt", "'files' must be a list"),
        ("files", [["a.txt", 1]], "not [path, size, mtime_ns]"),
        ("files", [{"path": "a", "size": 1, "mtime_ns": 0}], "not [path, size, mtime_ns]"),
    ],
)
def test_malformed_fields_are_refused_naming_the_problem(field, value, says):
    body = body_map()
    body[field] = value
    refused(seal_map(body), says=says)


@pytest.mark.parametrize("field", ["v", "transfer_id", "sender", "receiver", "created", "chunk_size", "files"])
def test_missing_fields_are_refused(field):
    body = body_map()
    del body[field]
    refused(seal_map(body), says=field)


@pytest.mark.parametrize(
    "envelope",
    [
        b"",
        b"\xc1",
        msgpack.packb([b"x"]),
        msgpack.packb([b"x", b"y", b"z"]),
        msgpack.packb([b"x", bytes(63)]),
        msgpack.packb(["body", bytes(64)]),
        msgpack.packb({"body": b"x"}),
        msgpack.packb([b"\xc1", bytes(64)]),
        msgpack.packb([msgpack.packb([1, 2]), bytes(64)]),
        msgpack.packb([msgpack.packb(body_map()), bytes(64)]) + b"trailing",
    ],
)
def test_garbage_envelopes_are_refused(envelope):
    refused(envelope)


@given(st.binary(max_size=512))
@settings(max_examples=400, deadline=None)
def test_arbitrary_bytes_raise_only_remote_protocol_error(data):
    with pytest.raises(RemoteProtocolError):
        open_manifest(data)


_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(), st.text(max_size=20), st.binary(max_size=70)
)
_value = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=5)


@st.composite
def hostile_bodies(draw):
    """Signed bodies with a valid-looking shape and hostile values, so the
    parser is exercised past the signature check."""
    body = body_map()
    for key in draw(st.lists(st.sampled_from(sorted(body)), unique=True)):
        body[key] = draw(_value)
    if draw(st.booleans()):
        body["files"] = draw(st.lists(st.lists(_value, min_size=3, max_size=3) | _value, max_size=4))
    if draw(st.booleans()):
        body["sender"] = SENDER
    return body


@given(hostile_bodies())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_signed_hostile_bodies_raise_only_remote_protocol_error(body):
    envelope = seal_map(body)
    try:
        manifest, digest = open_manifest(envelope)
    except RemoteProtocolError:
        return
    validate_manifest(manifest)
    assert manifest.sender == SENDER


# --- known answer -----------------------------------------------------------------


def test_encoding_is_a_stable_wire_format():
    """The body layout is what both ends sign and hash: changing it silently
    would orphan every stored receipt. (Keys and order pinned here.)"""
    manifest = make_manifest((("a.txt", 10, 5),))
    assert msgpack.unpackb(manifest.encode()) == {
        "v": 1,
        "transfer_id": TRANSFER_ID,
        "sender": SENDER,
        "receiver": RECEIVER,
        "created": CREATED,
        "chunk_size": DEFAULT_CHUNK_SIZE,
        "files": [["a.txt", 10, 5]],
    }
    assert list(msgpack.unpackb(manifest.encode())) == ["v", "transfer_id", "sender", "receiver", "created", "chunk_size", "files"]
