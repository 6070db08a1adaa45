"""Hostile peers against a real receiving node over real TCP.

bravo runs `serve` in-process on 127.0.0.1; attackers connect with raw
sockets (before authentication) or hold a real session as a trusted but
hostile peer, mallory (after). Every attack ends with the same three checks:
what bravo answered (closed, and which abort code where it sends one), what
it wrote (nothing outside its partial/ and inbox/, nothing in the inbox for
a refused transfer), and that an honest sender (alpha, the production
sender code) still gets a file through on a new connection.
"""

import errno
import hashlib
import os
from functools import partial

import msgpack
import pytest
import trio
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgpack import packb

from dorothy.dorothyd import receiving
from dorothy.dorothyd.channel import ChannelClosed
from dorothy.dorothyd.listener import MAX_UNAUTHENTICATED
from dorothy.dorothyd.node import node_key_bytes
from dorothy.dorothyd.queueing import queue_transfer
from dorothy.dorothyd.sending import PermanentFailure, TransferAborted
from dorothy.dorothyd.storage import TREE
from dorothy.keys.identity import NodeIdentity
from dorothy.protocol import messages
from dorothy.protocol.errors import ProtocolError, RemoteProtocolError
from dorothy.protocol.framing import MAX_FRAME
from dorothy.protocol.manifest import MAX_FILES, sign_manifest
from dorothy.protocol.paths import MAX_PATH_COMPONENTS
from dorothy.protocol.receipt import sign_receipt
from dorothy.protocol.session import HANDSHAKE1_LEN, HANDSHAKE2_LEN, MAGIC, encode_preamble
from dorothy.protocol.signed import MANIFEST_DOMAIN, RECEIPT_DOMAIN

from hostile import (
    CHUNK,
    DEADLINE,
    DROP,
    LongestStep,
    RawPeer,
    assert_contained,
    assert_ledger_ok,
    assert_refused_after_auth,
    assert_refused_unheard,
    assert_still_serving,
    chunk,
    deliver_over_tcp,
    first_attempt,
    flip_signature,
    full_disk,
    hostile_manifest,
    hostile_receiver,
    initiator_session,
    make_env_nodes,
    memory_growth,
    offer,
    patch_storage_pwrite,
    raw_body,
    raw_exchange,
    read_to_eof,
    receipt_body,
    record_honest_opening,
    seal_receipt,
    send_files,
    send_quietly,
    serving,
    shared_nodes,
    snapshot,
    transfer_rows,
    write_source,
    zstd,
)

PREAMBLE = encode_preamble((1,))


# -- before authentication -------------------------------------------------------


@pytest.fixture
def nodes(make_node):
    return make_env_nodes(make_node)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One bravo, alpha and mallory for all cases of the parametrized
    attacks below that change nothing but bravo's transfers."""
    nodes = shared_nodes(tmp_path_factory.mktemp("shared"))
    yield nodes
    nodes.close()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(min_size=1, max_size=4096))
async def test_random_bytes_before_handshake(make_node, tmp_path, nodes, junk):
    async with serving(make_node, tmp_path, nodes) as env:
        await assert_refused_unheard(env, junk, half_close=True)
        await assert_still_serving(env)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"DORO", id="truncated-magic"),
        pytest.param(PREAMBLE[:-1], id="truncated-preamble"),
        pytest.param(PREAMBLE, id="preamble-only"),
        pytest.param(PREAMBLE + b"\x00\x00", id="truncated-frame-header"),
        pytest.param(b"DOROTHX\x01\x01", id="bad-magic"),
        pytest.param(b"HTTP/1.1 200 OK\r\n\r\n", id="http"),
        pytest.param(MAGIC + b"\x00", id="zero-versions"),
        pytest.param(MAGIC + b"\x09" + bytes(range(1, 10)), id="nine-versions"),
        pytest.param(MAGIC + b"\x02\x02\x03", id="no-common-version"),
    ],
)
async def test_bad_preamble(shared, data):
    async with serving(shared) as env:
        await assert_refused_unheard(env, data, half_close=True)
        await assert_still_serving(env)


async def test_four_gib_frame_header_is_refused_without_reading_it(make_node, tmp_path):
    async with serving(make_node, tmp_path) as env:
        before = snapshot(tmp_path)
        with memory_growth() as grown:
            stream = await trio.open_tcp_stream("127.0.0.1", env.port)
            await stream.send_all(PREAMBLE + b"\xff\xff\xff\xff" + os.urandom(64 * 1024))
            # No half-close: bravo must decide on the header alone, promptly.
            start = trio.current_time()
            assert await read_to_eof(stream, deadline=2.0) == b""
            assert trio.current_time() - start < 2.0
        assert grown["python_peak"] < 8 and grown["maxrss"] < 64, grown
        assert_contained(env, before)
        await assert_still_serving(env)


@pytest.mark.parametrize("length", [0, 1, HANDSHAKE1_LEN - 1, HANDSHAKE1_LEN + 1, 65535])
async def test_message_one_of_wrong_length(shared, length):
    async with serving(shared) as env:
        await assert_refused_unheard(env, PREAMBLE + length.to_bytes(4, "big") + os.urandom(length))
        await assert_still_serving(env)


async def test_message_one_of_right_length_full_of_random_bytes(make_node, tmp_path):
    async with serving(make_node, tmp_path) as env:
        for body in (os.urandom(HANDSHAKE1_LEN), bytes(HANDSHAKE1_LEN)):  # random; all-zero (low-order e)
            await assert_refused_unheard(env, PREAMBLE + HANDSHAKE1_LEN.to_bytes(4, "big") + body)
        await assert_still_serving(env)


async def test_unknown_key_learns_nothing(make_node, tmp_path):
    async with serving(make_node, tmp_path) as env:
        stranger = NodeIdentity.generate()
        # No half-close: bravo itself must hang up, having sent not even
        # its ephemeral key.
        await assert_refused_unheard(env, initiator_session(stranger, env.bravo_dh).initiate())
        await assert_still_serving(env)


async def test_removed_key_is_refused(make_node, tmp_path):
    async with serving(make_node, tmp_path) as env:
        peer = await RawPeer.connect(env, env.mallory.identity)  # trusted: the handshake completes
        await peer.aclose()
        env.bravo.trust.remove("mallory")
        await assert_refused_unheard(env, initiator_session(env.mallory.identity, env.bravo_dh).initiate())
        await assert_still_serving(env)


@pytest.mark.parametrize(
    "first_record",
    [
        pytest.param("replayed-confirm", id="replayed-confirm"),
        pytest.param(os.urandom(33), id="garbage-record"),
        pytest.param(os.urandom(4096), id="garbage-4k-record"),
        pytest.param(None, id="silence-then-eof"),
    ],
)
async def test_replayed_message_one_never_reaches_the_application(make_node, tmp_path, first_record):
    async with serving(make_node, tmp_path) as env:
        opening, confirm = await record_honest_opening(env)
        before, rows = snapshot(tmp_path), transfer_rows(env.bravo)
        stream = await trio.open_tcp_stream("127.0.0.1", env.port)
        await stream.send_all(opening)
        # bravo cannot tell a replay from alpha yet: it answers message 2...
        reply = b""
        with trio.fail_after(DEADLINE):
            while len(reply) < 4 + HANDSHAKE2_LEN:
                data = await stream.receive_some(1 << 16)
                assert data, "bravo closed before message 2"
                reply += data
        assert len(reply) == 4 + HANDSHAKE2_LEN
        # ...but without alpha's keys the first record cannot be the key
        # confirmation, and bravo hangs up having done nothing.
        if first_record == "replayed-confirm":
            await send_quietly(stream, confirm)
        elif first_record is not None:
            await send_quietly(stream, len(first_record).to_bytes(4, "big") + first_record)
        else:
            await stream.send_eof()
        assert await read_to_eof(stream) == b""
        assert transfer_rows(env.bravo) == rows
        assert_contained(env, before)
        await assert_still_serving(env)


async def test_downgraded_version_list_breaks_the_handshake(make_node, tmp_path):
    async with serving(make_node, tmp_path) as env:
        offered = encode_preamble((1, 2))
        # Control: the honest (1, 2) preamble is fine (bravo picks 1).
        honest = await RawPeer.connect(env, env.alpha.identity, versions=(1, 2))
        assert honest.session.version == 1
        await honest.aclose()
        # A man in the middle strips version 2: the prologue no longer
        # matches and message 1 does not decrypt.
        opening = initiator_session(env.alpha.identity, env.bravo_dh, versions=(1, 2)).initiate()
        assert opening.startswith(offered)
        await assert_refused_unheard(env, PREAMBLE + opening[len(offered):])
        await assert_still_serving(env)


async def test_unauthenticated_slots_are_bounded_and_recover(make_node, tmp_path):
    """64 replays of a recorded message 1 each get message 2 and then hold a
    handshake slot (up to the 10 s handshake deadline). SPEC 3.6: more
    connections are closed on arrival, so while the slots are held even
    alpha is refused; once they are gone bravo serves again."""
    async with serving(make_node, tmp_path) as env:
        opening, _ = await record_honest_opening(env)
        before, rows = snapshot(tmp_path), transfer_rows(env.bravo)
        holders = []
        for _ in range(MAX_UNAUTHENTICATED):
            stream = await trio.open_tcp_stream("127.0.0.1", env.port)
            await stream.send_all(opening)
            with trio.fail_after(DEADLINE):
                reply = b""
                while len(reply) < 4 + HANDSHAKE2_LEN:
                    reply += await stream.receive_some(1 << 16)
            holders.append(stream)  # bravo now waits in accept() for a confirmation
        fresh = initiator_session(env.alpha.identity, env.bravo_dh).initiate()
        assert await raw_exchange(env.port, fresh) == b""  # refused on arrival
        for stream in holders:
            await stream.send_all(b"\x00\x00\x00\x21" + bytes(33))  # not a confirmation
            assert await read_to_eof(stream) == b""  # bravo released the slot, then hung up
        assert transfer_rows(env.bravo) == rows
        assert_contained(env, before)
        await assert_still_serving(env)


# -- after authentication: a trusted peer sending garbage ---------------------------


def random_garbage() -> bytes:
    """64 KiB of random bytes. One draw in 256 starts with a header of at
    most 16 MiB: that is a frame still arriving, which bravo rightly waits
    for (until its idle timeout), so such draws are redrawn."""
    data = os.urandom(1 << 16)
    while int.from_bytes(data[:4], "big") <= MAX_FRAME:
        data = os.urandom(1 << 16)
    return data


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(lambda: (100).to_bytes(4, "big") + os.urandom(100), id="random-record"),
        pytest.param(lambda: (10).to_bytes(4, "big") + os.urandom(10), id="short-record"),
        pytest.param(lambda: (MAX_FRAME + 1).to_bytes(4, "big") + os.urandom(1 << 16), id="frame-over-16MiB"),
        pytest.param(lambda: b"\xff\xff\xff\xff" + os.urandom(1 << 16), id="frame-4GiB"),
        pytest.param(random_garbage, id="random-bytes"),
    ],
)
async def test_garbage_after_handshake(shared, wire):
    async with serving(shared) as env:
        before, rows = snapshot(env.tmp_path), transfer_rows(env.bravo)
        peer = await RawPeer.connect(env, env.mallory.identity)
        await peer.send_raw(wire())
        # Damage in transit looks the same: no abort, no state, just closed.
        await assert_refused_after_auth(env, peer, before, rows, code=None)
        await assert_still_serving(env)


@pytest.mark.parametrize(
    "body, code",
    [
        pytest.param(messages.encode(messages.Done()), "unexpected_message", id="done"),
        pytest.param(messages.encode(messages.FileDone(file=0, sha256=bytes(32))), "unexpected_message", id="file_done"),
        pytest.param(messages.encode(messages.Chunk(file=0, index=0, compressed=False, data=b"x")), "unexpected_message", id="chunk"),
        pytest.param(messages.encode(messages.Accept(transfer_id=bytes(16), have=b"")), "unexpected_message", id="accept"),
        pytest.param(messages.encode(messages.Receipt(receipt=b"r", checkpoint="c")), "unexpected_message", id="receipt"),
        pytest.param(packb({"t": "hello"}), "unknown_message", id="unknown-type"),
        pytest.param(packb({"t": 1}), "malformed", id="type-not-str"),
        pytest.param(packb(["t", "offer"]), "malformed", id="not-a-map"),
        pytest.param(b"", "malformed", id="empty-record"),
        pytest.param(b"\xc1", "malformed", id="invalid-msgpack"),
        pytest.param(b"\xdf\xff\xff\xff\xff", "malformed", id="map-of-4G-entries"),
        pytest.param(packb({"t": "offer", "manifest": "text"}), "malformed", id="offer-manifest-str"),
        pytest.param(packb({"t": "offer", "manifest": os.urandom(300)}), "malformed", id="offer-random-manifest"),
        pytest.param(packb({"t": "offer", "manifest": packb([b"body", bytes(63)])}), "malformed", id="offer-short-signature"),
        pytest.param(packb({"t": "offer", "manifest": packb([b"body", bytes(64)])}), "malformed", id="offer-body-not-msgpack-map"),
    ],
)
async def test_first_message_not_a_valid_offer(shared, body, code):
    async with serving(shared) as env:
        before, rows = snapshot(env.tmp_path), transfer_rows(env.bravo)
        peer = await RawPeer.connect(env, env.mallory.identity)
        await peer.send_body(body)
        await assert_refused_after_auth(env, peer, before, rows, code=code)
        await assert_still_serving(env)


# -- hostile manifests from a trusted peer -------------------------------------------


@pytest.mark.parametrize(
    "files, code",
    [
        pytest.param([("../x", 1)], "bad_path", id="dotdot"),
        pytest.param([("a/../../x", 1)], "bad_path", id="inner-dotdot"),
        pytest.param([("./x", 1)], "bad_path", id="dot"),
        pytest.param([("/etc/passwd", 1)], "bad_path", id="absolute"),
        pytest.param([("a\x00b", 1)], "bad_path", id="nul"),
        pytest.param([("", 1)], "bad_path", id="empty"),
        pytest.param([("a//b", 1)], "bad_path", id="empty-component"),
        pytest.param([("dir/", 1)], "bad_path", id="trailing-slash"),
        pytest.param([("x" * 256, 1)], "bad_path", id="component-over-255-bytes"),
        pytest.param([("é" * 128, 1)], "bad_path", id="component-256-utf8-bytes"),
        pytest.param([("a/" * 2048 + "b", 1)], "bad_path", id="path-over-4096-bytes"),
        pytest.param([("ZZZ", 1)], "malformed", id="surrogate-in-utf8"),  # ZZZ becomes ED B2 80 on the wire
        pytest.param([("x", 1), ("x", 1)], "bad_path", id="duplicate"),
        pytest.param([("A.txt", 1), ("a.txt", 1)], "bad_path", id="case-collision"),
        pytest.param([("Stra\u00dfe", 1), ("STRASSE", 1)], "bad_path", id="casefold-collision"),
        pytest.param([("caf\u00e9", 1), ("cafe\u0301", 1)], "bad_path", id="nfc-nfd-collision"),
        pytest.param([("a", 1), ("a/b", 1)], "bad_path", id="file-then-dir-prefix"),
        pytest.param([("a/b", 1), ("A", 1)], "bad_path", id="dir-then-file-folded"),
        pytest.param([], "bad_manifest", id="no-files"),
        pytest.param([("x", -1)], "bad_manifest", id="negative-size"),
        pytest.param([("x", (1 << 50) + 1)], "bad_manifest", id="size-over-1PiB"),
        pytest.param([("x", (1 << 26) * CHUNK + 1)], "bad_manifest", id="over-2^26-chunks"),
    ],
)
async def test_manifest_with_hostile_names_or_sizes(shared, files, code):
    async with serving(shared) as env:
        before, rows = snapshot(env.tmp_path), transfer_rows(env.bravo)
        if code == "malformed":
            body = raw_body(env, files=[[path, size, 0] for path, size in files])
            body = body.replace(b"\xa3ZZZ", b"\xa3\xed\xb2\x80")  # invalid UTF-8: a lone surrogate
            envelope = packb([body, env.mallory.identity.sign(MANIFEST_DOMAIN + body)])
        else:
            _, envelope = hostile_manifest(env, files)
        peer = await RawPeer.connect(env, env.mallory.identity)
        await peer.send(messages.Offer(manifest=envelope))
        await assert_refused_after_auth(env, peer, before, rows, code=code)
        await assert_still_serving(env)


@pytest.mark.parametrize(
    "case, code",
    [
        ("chunk-size-not-power-of-two", "bad_manifest"),
        ("chunk-size-too-small", "bad_manifest"),
        ("chunk-size-too-large", "malformed"),
        ("version-2", "bad_manifest"),
        ("version-as-bool", "malformed"),
        ("missing-files", "malformed"),
        ("repeated-key", "bad_manifest"),
        ("unknown-extra-field", "bad_manifest"),
        ("short-transfer-id", "malformed"),
        ("bad-created", "malformed"),
        ("mtime-over-int64", "bad_manifest"),
        ("entry-not-a-triple", "bad_manifest"),
        ("size-as-str", "bad_manifest"),
        ("signed-by-mallory-naming-alpha", "bad_signature"),
        ("mallory-sign-key-with-alpha-dh-key", "bad_manifest"),
        ("alphas-genuine-manifest-replayed", "bad_manifest"),
        ("addressed-to-alpha", "bad_manifest"),
        ("bad-signature", "bad_signature"),
        ("receipt-domain-signature", "bad_signature"),
    ],
)
async def test_manifest_that_must_be_refused(shared, case, code):
    async with serving(shared) as env:
        mallory, alpha = env.mallory, env.alpha
        sign = mallory.identity.sign

        def sealed(body, domain=MANIFEST_DOMAIN, signer=sign):
            return packb([body, signer(domain + body)])

        alpha_key, mallory_key = node_key_bytes(alpha.node_key), node_key_bytes(mallory.node_key)
        envelope = {
            "chunk-size-not-power-of-two": lambda: sealed(raw_body(env, chunk_size=100_000)),
            "chunk-size-too-small": lambda: sealed(raw_body(env, chunk_size=1 << 15)),
            "chunk-size-too-large": lambda: sealed(raw_body(env, chunk_size=1 << 23)),
            "version-2": lambda: sealed(raw_body(env, v=2)),
            "version-as-bool": lambda: sealed(raw_body(env, v=True)),
            "missing-files": lambda: sealed(raw_body(env, files=DROP)),
            "repeated-key": lambda: sealed(raw_body(env, EXTRA=[("files", [["other", 10, 0]])])),
            "unknown-extra-field": lambda: sealed(raw_body(env, EXTRA=[("comment", "later version")])),
            "short-transfer-id": lambda: sealed(raw_body(env, transfer_id=bytes(15))),
            "bad-created": lambda: sealed(raw_body(env, created="yesterday")),
            "mtime-over-int64": lambda: sealed(raw_body(env, files=[["f", 1, 1 << 63]])),
            "entry-not-a-triple": lambda: sealed(raw_body(env, files=[["f", 1]])),
            "size-as-str": lambda: sealed(raw_body(env, files=[["f", "1", 0]])),
            "signed-by-mallory-naming-alpha": lambda: hostile_manifest(env, [("f", 1)], sender=alpha_key)[1],
            "mallory-sign-key-with-alpha-dh-key": lambda: hostile_manifest(
                env, [("f", 1)], sender=mallory_key[:32] + alpha_key[32:]
            )[1],
            "alphas-genuine-manifest-replayed": lambda: hostile_manifest(env, [("f", 1)], signer=alpha)[1],
            "addressed-to-alpha": lambda: hostile_manifest(env, [("f", 1)], receiver=alpha_key)[1],
            "bad-signature": lambda: flip_signature(hostile_manifest(env, [("f", 1)])[1]),
            "receipt-domain-signature": lambda: sealed(raw_body(env), domain=RECEIPT_DOMAIN),
        }[case]()
        before, rows = snapshot(env.tmp_path), transfer_rows(env.bravo)
        peer = await RawPeer.connect(env, mallory.identity)
        await peer.send(messages.Offer(manifest=envelope))
        await assert_refused_after_auth(env, peer, before, rows, code=code)
        await assert_still_serving(env)


async def test_windows_device_names_are_plain_names_on_linux(make_node, tmp_path):
    """SPEC 4.6 refuses names that collide on case-insensitive filesystems
    but says nothing of Windows device names (CON, NUL, COM1, AUX...):
    paths.py keeps them, and on a Linux receiver they are ordinary files.
    The transfer completes and publishes them as such, inside the inbox."""
    names = ["CON", "nul.txt", "aux/com1.log", "PRN.", "LPT9 "]
    async with serving(make_node, tmp_path) as env:
        before = snapshot(tmp_path)
        contents = [os.urandom(100 + i) for i in range(len(names))]
        peer, manifest = await offer(env, [(name, len(data)) for name, data in zip(names, contents)])
        await send_files(peer, manifest, contents)
        receipt = await peer.receive()
        assert isinstance(receipt, messages.Receipt)
        outcome = await peer.outcome()
        assert outcome.received == [] and outcome.closed == "done" and outcome.eof
        tid = manifest.transfer_id.hex()
        assert env.bravo.store.get(tid)["state"] == "done"
        published = env.bravo.home.inbox_dir / "mallory" / tid
        for name, data in zip(names, contents):
            assert (published / name).read_bytes() == data
        assert_contained(env, before, inbox_allowed=True)
        await assert_still_serving(env)


DEEPEST = "/".join(["d"] * (MAX_PATH_COMPONENTS - 1) + ["a.bin"])


@pytest.mark.parametrize("name", ["a.bin", DEEPEST], ids=["shallow", "deepest-legal"])
@pytest.mark.parametrize("code", ["cancelled", "source_changed"])
async def test_a_final_abort_right_after_a_chunk_leaves_nothing_behind(make_node, tmp_path, monkeypatch, code, name):
    """The chunk is written but not yet durable when the abort ends the
    transfer: nothing may be saved for it afterwards, in the state db or,
    with its partial directory gone, relative to the daemon's working
    directory. The deepest tree a manifest may name goes as well."""
    cwd = tmp_path / "daemon-cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    async with serving(make_node, tmp_path) as env:
        before = snapshot(tmp_path)
        peer, manifest = await offer(env, [(name, 2 * CHUNK + 100), ("b.bin", 10)])
        await peer.send(chunk(index=0))
        await peer.send(messages.Abort(code=code, reason="the sender gave up", final=True))
        await peer.outcome()
        tid = manifest.transfer_id.hex()
        assert env.bravo.store.get(tid)["state"] == ("cancelled" if code == "cancelled" else "failed")
        assert env.bravo.store.chunks(tid) == {}
        assert os.listdir(cwd) == []
        assert not (env.bravo.home.partial_dir / tid).exists()
        assert_contained(env, before | {"daemon-cwd"})
        assert_ledger_ok(env.bravo)
        await assert_still_serving(env)


HUGE = 1 << 45  # 32 TiB: larger than this disk, and than ext4's largest file
BIG_CHUNK = 1 << 22


async def test_huge_declared_size_is_not_preallocated(make_node, tmp_path):
    """A manifest declaring one 32 TiB file is a legal offer (sizes up to
    2^50, 2^23 chunks here): bravo accepts it, preallocates nothing, and
    writes only chunks that arrive, as a sparse partial file."""
    async with serving(make_node, tmp_path) as env:
        before = snapshot(tmp_path)
        peer, manifest = await offer(env, [("disk.img", HUGE)], chunk_size=BIG_CHUNK)
        tid = manifest.transfer_id.hex()
        partial = env.bravo.home.partial_dir / tid / TREE
        assert not any(partial.iterdir())  # nothing created for a non-empty file until a chunk comes
        zeros = zstandard.ZstdCompressor().compress(bytes(BIG_CHUNK))
        for index in (0, 1 << 20):  # offsets 0 and 4 TiB
            await peer.send(messages.Chunk(file=0, index=index, compressed=True, data=zeros))
        await peer.send_raw(peer.session.close())  # an authenticated goodbye: bravo keeps what it got
        outcome = await peer.outcome()
        assert outcome.received == [] and outcome.eof
        st = os.stat(partial / "disk.img")
        assert st.st_size == (1 << 42) + BIG_CHUNK  # apparent size: up to the last byte written
        assert st.st_blocks * 512 <= 2 * BIG_CHUNK + (1 << 20)  # allocated: the two chunks only
        assert env.bravo.store.get(tid)["state"] == "waiting"
        assert len(env.bravo.store.chunks(tid)) == 2
        assert_contained(env, before)
        assert_ledger_ok(env.bravo)
        await assert_still_serving(env)


def stores_32_tib_files(directory) -> bool:
    probe = directory / ".probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x", HUGE - 1)
        return True
    except OSError as exc:
        assert exc.errno == errno.EFBIG
        return False
    finally:
        os.close(fd)
        probe.unlink()


async def test_chunk_beyond_the_filesystems_largest_file(make_node, tmp_path):
    """The last chunk of the 32 TiB file lies past what ext4 can store
    (16 TiB): pwrite fails with EFBIG. bravo tells the sender it could not
    store the data (not final: a local condition), writes nothing, and keeps
    serving. On a filesystem that does store such files, the chunk is simply
    written, sparse."""
    efbig = not stores_32_tib_files(tmp_path)
    async with serving(make_node, tmp_path) as env:
        before = snapshot(tmp_path)
        peer, manifest = await offer(env, [("disk.img", HUGE)], chunk_size=BIG_CHUNK)
        tid = manifest.transfer_id.hex()
        zeros = zstandard.ZstdCompressor().compress(bytes(BIG_CHUNK))
        await peer.send(messages.Chunk(file=0, index=manifest.chunk_count(0) - 1, compressed=True, data=zeros))
        await peer.send(messages.Done())  # bravo learns of a failed write when the next step needs it
        outcome = await peer.outcome()
        if efbig:
            assert [(a.code, a.final) for a in outcome.received] == [("receiver_io_error", False)]
            assert "File too large" in outcome.received[0].reason
            row = env.bravo.store.get(tid)
            assert row["state"] == "waiting" and "could not store" in row["error"]
            assert os.stat(env.bravo.home.partial_dir / tid / TREE / "disk.img").st_blocks == 0
        else:
            assert [a.code for a in outcome.received] == ["incomplete"]
        assert_contained(env, before)
        assert_ledger_ok(env.bravo)
        await assert_still_serving(env)


# -- hostile transfer messages after a valid offer --------------------------------------

TWO_FILES = [("a.bin", 2 * CHUNK + 100), ("b.bin", 10)]
SHA_A = hashlib.sha256(bytes(2 * CHUNK + 100)).digest()


@pytest.mark.parametrize(
    "attack, code",
    [
        pytest.param([chunk(file=2)], "bad_chunk", id="file-index-out-of-range"),
        pytest.param([packb({"t": "chunk", "f": 100_000, "i": 0, "z": False, "d": b"x"})], "malformed", id="file-index-over-MAX_FILES"),
        pytest.param([packb({"t": "chunk", "f": -1, "i": 0, "z": False, "d": b"x"})], "malformed", id="file-index-negative"),
        pytest.param([chunk(index=3)], "bad_chunk", id="chunk-index-out-of-range"),
        pytest.param([chunk(file=1, index=1, data=b"x" * 10)], "bad_chunk", id="second-chunk-of-one-chunk-file"),
        pytest.param([packb({"t": "chunk", "f": 0, "i": 1 << 26, "z": False, "d": b"x"})], "malformed", id="chunk-index-over-2^26"),
        pytest.param([chunk(data=bytes(CHUNK + 1))], "bad_chunk", id="chunk-larger-than-declared"),
        pytest.param([chunk(index=2, data=bytes(101))], "bad_chunk", id="last-chunk-one-byte-too-long"),
        pytest.param([chunk(data=bytes(CHUNK - 1))], "bad_chunk", id="chunk-shorter-than-declared"),
        pytest.param([packb({"t": "chunk", "f": 0, "i": 0, "z": False, "d": bytes((4 << 20) + 1)})], "malformed", id="chunk-over-4MiB"),
        pytest.param([chunk(data=zstd(bytes(CHUNK + 1)), compressed=True)], "bad_chunk", id="zstd-one-byte-too-many"),
        pytest.param([chunk(data=zstd(bytes(CHUNK - 1)), compressed=True)], "bad_chunk", id="zstd-one-byte-short"),
        pytest.param([chunk(data=zstd(bytes(CHUNK)) + zstd(b""), compressed=True)], "bad_chunk", id="zstd-two-frames"),
        pytest.param([chunk(data=zstd(bytes(CHUNK)) + b"\x00", compressed=True)], "bad_chunk", id="zstd-trailing-byte"),
        pytest.param([chunk(data=zstd(bytes(CHUNK))[:-1], compressed=True)], "bad_chunk", id="zstd-truncated"),
        pytest.param([chunk(data=zstd(bytes(CHUNK), window_log=27), compressed=True)], "bad_chunk", id="zstd-128MiB-window"),
        pytest.param([chunk(data=os.urandom(100), compressed=True)], "bad_chunk", id="zstd-garbage"),
        pytest.param([messages.FileDone(file=2, sha256=bytes(32))], "bad_file_done", id="file_done-out-of-range"),
        pytest.param([packb({"t": "file_done", "f": 0, "sha256": bytes(31)})], "malformed", id="file_done-short-hash"),
        pytest.param([messages.Done()], "incomplete", id="done-before-any-chunk"),
        pytest.param(
            [chunk(index=0), chunk(index=1), chunk(index=2, data=bytes(100)), chunk(file=1, data=bytes(10)), messages.Done()],
            "incomplete", id="done-without-file_done",
        ),
        pytest.param(
            [chunk(index=0), messages.FileDone(file=0, sha256=SHA_A), messages.FileDone(file=1, sha256=bytes(32)), messages.Done()],
            "incomplete", id="done-with-chunks-missing",
        ),
        pytest.param(
            [chunk(index=0), chunk(index=1), chunk(index=2, data=bytes(100)), chunk(file=1, data=bytes(10)),
             messages.FileDone(file=0, sha256=SHA_A), messages.FileDone(file=1, sha256=bytes(32)), messages.Done()],
            "hash_mismatch", id="wrong-sha256",
        ),
        pytest.param([messages.Offer(manifest=b"again")], "unexpected_message", id="second-offer"),
        pytest.param([messages.Accept(transfer_id=bytes(16), have=b"")], "unexpected_message", id="accept-from-sender"),
        pytest.param([messages.Receipt(receipt=b"r", checkpoint="c")], "unexpected_message", id="receipt-from-sender"),
        pytest.param([packb({"t": "nope"})], "unknown_message", id="unknown-type"),
    ],
)
async def test_hostile_transfer_messages(shared, attack, code):
    async with serving(shared) as env:
        before, rows = snapshot(env.tmp_path), transfer_rows(env.bravo)
        peer, manifest = await offer(env, TWO_FILES)
        for message in attack:
            if isinstance(message, bytes):
                await peer.send_body(message)
            else:
                await peer.send(message)
        await assert_refused_after_auth(env, peer, before, rows, code=code, transfer_id=manifest.transfer_id)
        await assert_still_serving(env)


@pytest.mark.parametrize(
    "level, refused_by",
    [
        (1, "declares 268435456 bytes, expected 65536"),  # refused from its header, before decoding
        (19, "byte window"),  # an 8 MiB window is refused from its header too
    ],
    ids=["level1-512KiB-window", "level19-8MiB-window"],
)
async def test_zstd_bomb_costs_at_most_one_chunk(make_node, tmp_path, level, refused_by):
    """256 MiB of zeros in an 8 KiB zstd frame whose header claims 256 MiB,
    sent for a 64 KiB chunk: bravo never decodes more than one chunk of it
    and refuses it (bad_chunk)."""
    compressor = zstandard.ZstdCompressor(level=level).compressobj(size=256 << 20)
    zeros = bytes(1 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(256)) + compressor.flush()
    assert len(bomb) < 64 << 10 and zstandard.get_frame_parameters(bomb).content_size == 256 << 20
    async with serving(make_node, tmp_path) as env:
        before, rows = snapshot(tmp_path), transfer_rows(env.bravo)
        peer, manifest = await offer(env, TWO_FILES)
        with memory_growth() as grown:
            await peer.send(chunk(data=bomb, compressed=True))
            outcome = await assert_refused_after_auth(env, peer, before, rows, code="bad_chunk", transfer_id=manifest.transfer_id)
        assert refused_by in outcome.abort().reason
        assert grown["python_peak"] < 64 and grown["maxrss"] < 64, grown
        await assert_still_serving(env)


FLOOD = 5000  # useless file_done records on each side of the chunks


async def test_message_flood_does_not_starve_an_honest_sender(make_node, tmp_path):
    """Thousands of valid but useless records (repeated file_done, repeated
    chunks) while alpha sends: bravo keeps up with both, and the flood's own
    transfer still completes."""
    async with serving(make_node, tmp_path) as env:
        before = snapshot(tmp_path)
        content = os.urandom(CHUNK + 10)
        peer, manifest = await offer(env, [("flood.bin", len(content))])
        file_done = messages.FileDone(file=0, sha256=hashlib.sha256(content).digest())
        first = chunk(index=0, data=content[:CHUNK])
        seal = peer.session.send_message
        flood = [seal(messages.encode(first))]
        flood += [seal(messages.encode(file_done)) for _ in range(FLOOD)]
        flood += [seal(messages.encode(first)) for _ in range(FLOOD // 10)]
        flood.append(seal(messages.encode(chunk(index=1, data=content[CHUNK:]))))
        flood += [seal(messages.encode(file_done)) for _ in range(FLOOD)]

        async def flooding():
            await peer.send_raw(b"".join(flood))
            await peer.send(messages.Done())
            assert isinstance(await peer.receive(), messages.Receipt)
            await peer.aclose()

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as both:
                both.start_soon(flooding)
                both.start_soon(assert_still_serving, env)
        tid = manifest.transfer_id.hex()
        assert (env.bravo.home.inbox_dir / "mallory" / tid / "flood.bin").read_bytes() == content
        assert_contained(env, before, inbox_allowed=True, honest_ran=True)
        await assert_still_serving(env)


async def test_transfer_id_of_another_peer_is_a_conflict(make_node, tmp_path):
    """mallory reuses the id of alpha's transfer (in flight, then done):
    bravo refuses with a final `conflict` and alpha's transfer is untouched."""
    async with serving(make_node, tmp_path) as env:
        source = write_source(tmp_path / "alpha-src", "case.bin", os.urandom(2 * CHUNK))
        tid = await queue_transfer(env.alpha, "bravo", [str(source)])
        # alpha's first attempt is cut after bravo accepts: bravo holds an
        # incoming transfer `tid`, waiting.
        alpha_peer = await RawPeer.connect(env, env.alpha.identity)
        await alpha_peer.send(messages.Offer(manifest=env.alpha.store.get(tid)["manifest"]))
        assert isinstance(await alpha_peer.receive(), messages.Accept)
        await alpha_peer.send_raw(alpha_peer.session.close())
        await alpha_peer.outcome()
        assert env.bravo.store.get(tid)["state"] == "waiting"
        for expected_state in ("waiting", "done"):
            before, rows = snapshot(tmp_path), transfer_rows(env.bravo)
            _, envelope = hostile_manifest(env, [("case.bin", 2 * CHUNK)], transfer_id=bytes.fromhex(tid))
            peer = await RawPeer.connect(env, env.mallory.identity)
            await peer.send(messages.Offer(manifest=envelope))
            await assert_refused_after_auth(env, peer, before, rows, code="conflict")
            assert env.bravo.store.get(tid)["state"] == expected_state
            if expected_state == "waiting":
                await deliver_over_tcp(env.alpha, env.bravo, env.port, tid)  # alpha resumes: unharmed
        assert (env.bravo.home.inbox_dir / "alpha" / tid / "case.bin").read_bytes() == source.read_bytes()
        await assert_still_serving(env)


@pytest.mark.parametrize("stage", ["_register", "_published_digests"])
async def test_same_transfer_offered_while_the_first_connection_holds_it_is_busy(make_node, tmp_path, monkeypatch, stage):
    """While the first connection adds the transfer's rows (in steps, the
    event loop free between them), or hashes again a copy published before a
    crash (minutes for a large one), a second connection offering the same
    transfer is told busy: it is not let in to add the rows, or record the
    transfer, a second time."""
    original, reached, proceed = getattr(receiving.Incoming, stage), trio.Event(), trio.Event()

    async def held(self, *args):
        reached.set()
        await proceed.wait()
        return await original(self, *args)

    monkeypatch.setattr(receiving.Incoming, stage, held)
    async with serving(make_node, tmp_path) as env:
        content = os.urandom(100)
        manifest, envelope = hostile_manifest(env, [("x", len(content))])
        first = await RawPeer.connect(env, env.mallory.identity)
        await first.send(messages.Offer(manifest=envelope))
        await reached.wait()
        second = await RawPeer.connect(env, env.mallory.identity)
        await second.send(messages.Offer(manifest=envelope))
        outcome = await second.outcome()
        assert [(m.code, m.final) for m in outcome.received] == [("busy", False)] and outcome.eof
        proceed.set()
        assert isinstance(await first.receive(), messages.Accept)
        await send_files(first, manifest, [content])
        assert isinstance(await first.receive(), messages.Receipt)
        await first.aclose()
        await assert_still_serving(env)


async def test_same_transfer_on_two_connections_is_busy(make_node, tmp_path):
    async with serving(make_node, tmp_path) as env:
        content = os.urandom(100)
        first, manifest = await offer(env, [("x", len(content))])
        second = await RawPeer.connect(env, env.mallory.identity)
        await second.send(messages.Offer(manifest=sign_manifest(manifest, env.mallory.identity.sign)))
        outcome = await second.outcome()
        assert [(m.code, m.final) for m in outcome.received] == [("busy", False)] and outcome.eof
        await send_files(first, manifest, [content])
        assert isinstance(await first.receive(), messages.Receipt)
        await first.aclose()
        await assert_still_serving(env)


async def test_refused_transfer_stays_refused(make_node, tmp_path):
    """After a permanent failure the same signed offer gets `failed` again:
    a hostile peer cannot revive it, and nothing is written."""
    async with serving(make_node, tmp_path) as env:
        peer, manifest = await offer(env, TWO_FILES)
        await peer.send(chunk(file=9))
        assert (await peer.outcome()).abort().code == "bad_chunk"
        before, rows = snapshot(tmp_path), transfer_rows(env.bravo)
        again = await RawPeer.connect(env, env.mallory.identity)
        await again.send(messages.Offer(manifest=sign_manifest(manifest, env.mallory.identity.sign)))
        outcome = await again.outcome()
        assert [(m.code, m.final) for m in outcome.received] == [("failed", True)] and outcome.eof
        assert transfer_rows(env.bravo) == rows
        assert_contained(env, before)
        await assert_still_serving(env)


# -- a hostile receiver: receipts alpha must refuse ----------------------------------------


def _bad_receipts(env):
    """name -> (forge(manifest, hash, file hashes) -> envelope, expected code).
    Code None: the receipt verifies but contradicts alpha's own SHA-256."""
    mallory, bravo = env.mallory.identity, env.bravo.identity

    def ok(m, h, hashes, **changes):
        return receipt_body(m, h, hashes, **changes)

    def extra_field(m, h, hashes):
        body = msgpack.unpackb(ok(m, h, hashes).encode())
        return packb({**body, "note": "added"})

    return {
        "flipped-signature": (lambda m, h, x: flip_signature(sign_receipt(ok(m, h, x), mallory.sign)), "bad_signature"),
        "signed-by-bravo": (lambda m, h, x: sign_receipt(ok(m, h, x), bravo.sign), "bad_signature"),
        "signed-by-alpha": (lambda m, h, x: sign_receipt(ok(m, h, x), env.alpha.identity.sign), "bad_signature"),
        "manifest-domain": (lambda m, h, x: seal_receipt(ok(m, h, x).encode(), mallory.sign, MANIFEST_DOMAIN), "bad_signature"),
        "other-manifest-hash": (lambda m, h, x: sign_receipt(ok(m, hashlib.sha256(h).digest(), x), mallory.sign), "bad_receipt"),
        "other-transfer-id": (lambda m, h, x: sign_receipt(ok(m, h, x, transfer_id=os.urandom(16)), mallory.sign), "bad_receipt"),
        "other-sender": (lambda m, h, x: sign_receipt(ok(m, h, x, sender=m.receiver), mallory.sign), "bad_receipt"),
        "missing-file": (lambda m, h, x: sign_receipt(ok(m, h, x[:-1]), mallory.sign), "bad_receipt"),
        "extra-field": (lambda m, h, x: seal_receipt(extra_field(m, h, x), mallory.sign), "bad_receipt"),
        "wrong-file-hash": (lambda m, h, x: sign_receipt(ok(m, h, [bytes(32)] + x[1:]), mallory.sign), None),
        "garbage": (lambda m, h, x: os.urandom(200), "malformed"),
    }


RECEIPT_CASES = [
    "flipped-signature", "signed-by-bravo", "signed-by-alpha", "manifest-domain", "other-manifest-hash",
    "other-transfer-id", "other-sender", "missing-file", "extra-field", "wrong-file-hash", "garbage",
]
@pytest.mark.parametrize(
    "case, before_accept",
    [pytest.param(case, False, id=f"{case}-after-chunks") for case in RECEIPT_CASES]
    + [
        pytest.param(case, True, id=f"{case}-instead-of-accept")
        for case in RECEIPT_CASES
    ],
)
async def test_sender_refuses_a_bad_receipt(shared, case, before_accept):
    async with serving(shared) as env:
        forge, code = _bad_receipts(env)[case]
        data = os.urandom(2 * CHUNK + 5)
        source = write_source(env.tmp_path / "to-mallory", "evidence.bin", data)
        tid = await queue_transfer(env.alpha, "mallory", [str(source)])
        port = await env.nursery.start(partial(hostile_receiver, env, forge, before_accept=before_accept))
        with pytest.raises((RemoteProtocolError, PermanentFailure)) as raised:
            await deliver_over_tcp(env.alpha, env.mallory, port, tid)
        if code is None and before_accept:
            # A receipt for files never sent, hence never hashed: refused as such.
            assert isinstance(raised.value, RemoteProtocolError) and raised.value.code == "bad_receipt", raised.value
        elif code is None:
            assert isinstance(raised.value, PermanentFailure), raised.value  # the receipt contradicts the source
        else:
            assert isinstance(raised.value, RemoteProtocolError) and raised.value.code == code, raised.value
        row = env.alpha.store.get(tid)
        assert row["state"] != "done" and row["receipt"] is None
        assert not await env.alpha.recorded("transfer_delivered", tid)
        assert_ledger_ok(env.alpha)
        await assert_still_serving(env)  # alpha still delivers to an honest bravo


# -- the receiver's own disk: full, or not writable ----------------------------------------


@pytest.mark.parametrize("how", ["full-tmpfs", "enospc-from-pwrite"])
async def test_disk_full_tells_the_sender_to_wait(make_node, tmp_path, monkeypatch, how):
    """The sender is told `disk_full`, not final; bravo marks the transfer
    `waiting` with the reason."""
    with full_disk(how, make_node, tmp_path, monkeypatch) as (bravo, alpha, mallory, fill_up, free):
        source = write_source(tmp_path / "alpha-src", "image.bin", os.urandom(16 * CHUNK))
        tid = await queue_transfer(alpha, "bravo", [str(source)])
        async with serving(make_node, tmp_path, (bravo, alpha, mallory)) as env:
            fill_up()
            outcome = await first_attempt(env, tid)
            abort = outcome.abort()
            assert (abort.code, abort.final) == ("disk_full", False), abort
            row = bravo.store.get(tid)
            if how == "full-tmpfs":
                # The state db shares the full disk, so the state may not be
                # recordable; the sender was told first, and a restart marks
                # every unconnected transfer waiting.
                assert row["state"] in ("waiting", "active"), dict(row)
            else:
                assert row["state"] == "waiting" and "disk full" in row["error"], dict(row)
            free()
            await assert_still_serving(env)


@pytest.mark.parametrize("how", ["full-tmpfs", "enospc-from-pwrite"])
async def test_disk_full_keeps_the_inbox_clean_and_resumes(make_node, tmp_path, monkeypatch, how):
    """Whatever bravo answered: nothing half-visible in the inbox, a ledger
    that verifies, and once space returns alpha's production sender
    completes the same transfer bit-identical."""
    with full_disk(how, make_node, tmp_path, monkeypatch) as (bravo, alpha, mallory, fill_up, free):
        data = os.urandom(16 * CHUNK)
        source = write_source(tmp_path / "alpha-src", "image.bin", data)
        tid = await queue_transfer(alpha, "bravo", [str(source)])
        async with serving(make_node, tmp_path, (bravo, alpha, mallory)) as env:
            fill_up()
            outcome = await first_attempt(env, tid)
            assert outcome.eof and not any(isinstance(m, messages.Receipt) for m in outcome.received)
            assert bravo.store.get(tid)["state"] != "done"
            assert not bravo.home.inbox_dir.exists() or not any(bravo.home.inbox_dir.rglob("*"))
            assert_ledger_ok(bravo)
            free()
            await deliver_over_tcp(alpha, bravo, env.port, tid)
            assert bravo.store.get(tid)["state"] == "done" and alpha.store.get(tid)["state"] == "done"
            assert (bravo.home.inbox_dir / "alpha" / tid / "image.bin").read_bytes() == data
            assert_ledger_ok(bravo)
            # Internal errors: see test_failed_chunk_write_is_handled_cleanly.
            await assert_still_serving(env)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EFBIG], ids=errno.errorcode.get)
async def test_failed_chunk_write_is_handled_cleanly(make_node, tmp_path, monkeypatch, code):
    """Any write error while receiving is told to the sender as a local,
    not final condition (`disk_full` for ENOSPC), without an internal error,
    and leaves the transfer `waiting`."""
    async with serving(make_node, tmp_path) as env:
        peer, manifest = await offer(env, TWO_FILES)

        def pwrite(fd, data, offset):
            raise OSError(code, os.strerror(code))

        patch_storage_pwrite(monkeypatch, pwrite)
        await peer.send(chunk(index=0))
        await peer.send(messages.Done())  # whatever comes next, bravo notices the failed write
        outcome = await peer.outcome()
        monkeypatch.undo()
        expected = "disk_full" if code == errno.ENOSPC else "receiver_io_error"
        assert [(m.code, m.final) for m in outcome.received] == [(expected, False)]
        assert env.errors.summary() == []
        assert env.bravo.store.get(manifest.transfer_id.hex())["state"] == "waiting"
        await assert_still_serving(env)


async def test_inbox_that_is_a_file_fails_publication_and_recovers(make_node, tmp_path):
    """We run as root, so permissions cannot make the inbox unwritable:
    instead HOME/inbox is a regular file (mkdir below it fails, ENOTDIR).
    The transfer is not published and not done, the verified data stays in
    partial/, bravo keeps serving, and once the inbox is fixed alpha's retry
    publishes it bit-identical without resending any chunk."""
    async with serving(make_node, tmp_path) as env:
        env.bravo.home.inbox_dir.write_text("not a directory")
        data = os.urandom(3 * CHUNK)
        source = write_source(tmp_path / "alpha-src", "case.bin", data)
        tid = await queue_transfer(env.alpha, "bravo", [str(source)])
        with pytest.raises(TransferAborted) as raised:
            await deliver_over_tcp(env.alpha, env.bravo, env.port, tid)
        assert (raised.value.aborted.code, raised.value.aborted.final) == ("receiver_io_error", False)
        row = env.bravo.store.get(tid)
        assert row["state"] == "waiting", dict(row)
        assert env.alpha.store.get(tid)["state"] != "done"
        assert env.bravo.home.inbox_dir.read_text() == "not a directory"
        assert len(env.bravo.store.chunks(tid)) == 3  # verified and durable, kept for the retry
        assert_ledger_ok(env.bravo)
        # Another peer's connection is still served up to publication.
        peer, _ = await offer(env, [("x", 1)])
        await peer.aclose()
        env.bravo.home.inbox_dir.unlink()
        await deliver_over_tcp(env.alpha, env.bravo, env.port, tid)
        assert (env.bravo.home.inbox_dir / "alpha" / tid / "case.bin").read_bytes() == data
        await assert_still_serving(env)


async def test_inbox_that_is_a_file_is_reported(make_node, tmp_path):
    async with serving(make_node, tmp_path) as env:
        env.bravo.home.inbox_dir.write_text("not a directory")
        source = write_source(tmp_path / "alpha-src", "case.bin", os.urandom(10))
        tid = await queue_transfer(env.alpha, "bravo", [str(source)])
        with pytest.raises(Exception) as raised:
            await deliver_over_tcp(env.alpha, env.bravo, env.port, tid)
        # Both operators can tell what went wrong.
        assert "could not store" in env.bravo.store.get(tid)["error"]
        assert isinstance(raised.value, TransferAborted) and "Not a directory" in raised.value.aborted.reason


@pytest.mark.parametrize(
    "files, chunk_size",
    [
        pytest.param([("disk.img", HUGE)], BIG_CHUNK, id="2^23-chunks"),
        pytest.param(
            [(f"d{n % 100}/evidence-{n:06d}.bin", 100) for n in range(MAX_FILES)], CHUNK, id="100000-files"
        ),
    ],
)
async def test_a_large_legal_offer_does_not_stall_the_event_loop(make_node, tmp_path, files, chunk_size):
    """Both offers are within the limits (SPEC 8), so an honest sender of a
    large disk image or a phone extraction triggers this too, on every resume."""
    async with serving(make_node, tmp_path) as env:
        steps = LongestStep()
        trio.lowlevel.add_instrument(steps)
        try:
            peer, _ = await offer(env, files, chunk_size=chunk_size)
        finally:
            trio.lowlevel.remove_instrument(steps)
        await peer.aclose()
        assert steps.longest < 0.2, f"event loop blocked for {steps.longest:.2f} s in one step"
