"""Helpers for tests/test_hostile.py: a real receiving node ("bravo") on
127.0.0.1, attackers that speak raw TCP or the session by hand, and the
checks every attack ends with (what bravo answered, what it wrote, and
whether it still serves an honest sender).

No sleeps: every wait is a read with a `trio.fail_after` deadline.
"""

import dataclasses
import errno
import hashlib
import itertools
import logging
import os
import resource
import subprocess
import time
import tracemalloc
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
import trio
import zstandard
from msgpack import packb

from dorothy.dorothyd import audit, storage
from dorothy.dorothyd.channel import ChannelClosed, accept, initiate
from dorothy.dorothyd.clock import iso_now
from dorothy.dorothyd.home import Home
from dorothy.dorothyd.main import load_node, serve
from dorothy.dorothyd.provision import create_home
from dorothy.dorothyd.node import Running, node_key_bytes
from dorothy.dorothyd.queueing import queue_transfer
from dorothy.dorothyd.sending import deliver
from dorothy.protocol import messages
from dorothy.protocol.errors import ProtocolError
from dorothy.protocol.manifest import FileEntry, Manifest, open_manifest, sign_manifest
from dorothy.protocol.receipt import ReceiptBody
from dorothy.protocol.session import SUPPORTED_VERSIONS, Authenticated, Closed, Message, Session
from dorothy.protocol.signed import RECEIPT_DOMAIN

from conftest import introduce

CHUNK = 1 << 16  # smallest legal chunk size: multi-chunk files stay small
DEADLINE = 10.0  # seconds; every wait in these tests is bounded by it
RECEIVE = 1 << 20

_counter = itertools.count()


# -- the environment -----------------------------------------------------------


@dataclass
class Env:
    """bravo serving on `port`; alpha (honest) and mallory (trusted but
    hostile) are loaded nodes without services: the test drives them."""

    bravo: object
    alpha: object
    mallory: object
    port: int
    tmp_path: Path
    nursery: trio.Nursery
    errors: "InternalErrors"

    @property
    def bravo_dh(self) -> bytes:
        return self.bravo.node_key.dh_public


def make_env_nodes(make_node, **bravo_config):
    bravo = make_node("bravo", listen_host="127.0.0.1", listen_port=0, **bravo_config)
    alpha = make_node("alpha", chunk_size=CHUNK)
    mallory = make_node("mallory", chunk_size=CHUNK)
    introduce(bravo, alpha, mallory)
    return bravo, alpha, mallory


@dataclass
class Shared:
    """Nodes reused by every case of a parametrized attack (creating three
    homes costs more than most attacks). Every check is relative to a
    snapshot taken just before the attack, so earlier cases do not matter."""

    root: Path
    nodes: tuple

    def close(self) -> None:
        for node in self.nodes:
            node.store.close()
            node.ledger.close()


def shared_nodes(root: Path) -> Shared:
    bravo = node_in(root / "bravo", "bravo", listen_port=0)
    alpha = node_in(root / "alpha", "alpha", chunk_size=CHUNK)
    mallory = node_in(root / "mallory", "mallory", chunk_size=CHUNK)
    introduce(bravo, alpha, mallory)
    return Shared(root, (bravo, alpha, mallory))


class InternalErrors(logging.Handler):
    """ERROR records of the daemon's logger: what the listener logs as an
    "internal error" is an exception nobody handled, which hostile input
    must never cause."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def summary(self) -> list[str]:
        return [f"{r.getMessage()}: {r.exc_info[1]!r}" if r.exc_info else r.getMessage() for r in self.records]


async def start_env(nursery, make_node, tmp_path, nodes=None) -> Env:
    """Start bravo's services. Create every node first: loading a node
    resets the daemon's log handlers."""
    bravo, alpha, mallory = nodes or make_env_nodes(make_node)
    daemon_log = logging.getLogger("dorothyd")
    errors = InternalErrors()
    daemon_log.handlers[:] = [h for h in daemon_log.handlers if not isinstance(h, InternalErrors)] + [errors]
    port = await nursery.start(serve, bravo)
    return Env(bravo=bravo, alpha=alpha, mallory=mallory, port=port, tmp_path=tmp_path, nursery=nursery, errors=errors)


@asynccontextmanager
async def serving(make_node, tmp_path=None, nodes=None):
    """bravo serving for the duration of the block; its services are
    cancelled at the end (the block may start more tasks in env.nursery).
    `make_node` may be a Shared instead: its nodes and root are used."""
    if isinstance(make_node, Shared):
        make_node, tmp_path, nodes = None, make_node.root, make_node.nodes
    async with trio.open_nursery() as nursery:
        yield await start_env(nursery, make_node, tmp_path, nodes)
        nursery.cancel_scope.cancel()


# -- raw TCP and hand-driven sessions ------------------------------------------


async def read_to_eof(stream: trio.abc.Stream, deadline: float = DEADLINE) -> bytes:
    """Everything the peer sends until it closes; a reset counts as closed."""
    received = bytearray()
    with trio.fail_after(deadline):
        while True:
            try:
                data = await stream.receive_some(RECEIVE)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            received += data
    await trio.aclose_forcefully(stream)
    return bytes(received)


async def send_quietly(stream: trio.abc.Stream, data: bytes) -> bool:
    """Send, tolerating a peer that already hung up (it may, legitimately,
    close before reading everything a hostile client pushes)."""
    try:
        await stream.send_all(data)
        return True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False


async def raw_exchange(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    """Connect, send `data` (then EOF if `half_close`), return all bytes
    bravo sends before it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await send_quietly(stream, data)
    if half_close:
        try:
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    return await read_to_eof(stream)


def initiator_session(identity_or_dh_private, responder_dh: bytes, versions=SUPPORTED_VERSIONS) -> Session:
    static = identity_or_dh_private if isinstance(identity_or_dh_private, bytes) else identity_or_dh_private.dh_private
    return Session(
        initiator=True,
        static_private=static,
        ephemeral_private=os.urandom(32),
        remote_static=responder_dh,
        versions=versions,
    )


@dataclass
class Outcome:
    """What bravo did after an attack, read until it closed the connection."""

    received: list = field(default_factory=list)  # decoded transfer messages, in order
    closed: str | None = None  # reason of bravo's authenticated CLOSE, if any
    error: str | None = None  # our session's view of the end (e.g. "truncated")
    eof: bool = False

    def abort(self) -> messages.Abort:
        """The abort bravo ended with (after an accept, if it had accepted)."""
        kinds = [type(m) for m in self.received]
        assert kinds in ([messages.Abort], [messages.Accept, messages.Abort]), self
        return self.received[-1]


class RawPeer:
    """A trusted attacker holding a real session with bravo: it can send any
    record body, well-formed or not."""

    def __init__(self, stream: trio.SocketStream, session: Session):
        self.stream = stream
        self.session = session

    @classmethod
    async def connect(cls, env: Env, identity, *, versions=SUPPORTED_VERSIONS) -> "RawPeer":
        stream = await trio.open_tcp_stream("127.0.0.1", env.port)
        session = initiator_session(identity, env.bravo_dh, versions)
        with trio.fail_after(DEADLINE):
            await stream.send_all(session.initiate())
            while not isinstance(session.next_event(), Authenticated):
                data = await stream.receive_some(RECEIVE)
                assert data, "bravo closed the connection during the handshake"
                session.receive_data(data)
            await stream.send_all(session.data_to_send())  # key confirmation
        return cls(stream, session)

    async def send(self, message) -> bool:
        return await self.send_body(messages.encode(message))

    async def send_body(self, body: bytes) -> bool:
        """Any DATA record body: bravo's session accepts it, its decoder judges it.
        False once bravo has closed (its CLOSE, read by `outcome`, ends ours too)."""
        if self.session.state.value != "open":
            return False
        return await send_quietly(self.stream, self.session.send_message(body))

    async def send_raw(self, data: bytes) -> bool:
        return await send_quietly(self.stream, data)

    async def receive(self):
        """The next transfer message from bravo (None if it closed instead)."""
        with trio.fail_after(DEADLINE):
            while True:
                event = self.session.next_event()
                if isinstance(event, Message):
                    return messages.decode(event.data)
                if isinstance(event, Closed):
                    return None
                data = await self.stream.receive_some(RECEIVE)
                self.session.receive_data(data)

    async def outcome(self) -> Outcome:
        """Read until bravo closes; decode everything it said on the way."""
        result = Outcome()
        with trio.fail_after(DEADLINE):
            while True:
                while (event := self.session.next_event()) is not None:
                    if isinstance(event, Message):
                        result.received.append(messages.decode(event.data))
                    elif isinstance(event, Closed):
                        result.closed = event.reason
                if result.eof:
                    break
                try:
                    data = await self.stream.receive_some(RECEIVE)
                except trio.BrokenResourceError:
                    data = b""
                result.eof = not data
                if self.session.state.value in ("closed", "error"):
                    continue  # after CLOSE (or an error) bytes are ignored: wait for EOF
                try:
                    self.session.receive_data(data)
                except ProtocolError as exc:
                    result.error = exc.code
        await trio.aclose_forcefully(self.stream)
        return result

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# -- hostile manifests -----------------------------------------------------------


def hostile_manifest(env: Env, files, *, signer=None, sender=None, receiver=None, chunk_size=CHUNK, transfer_id=None) -> tuple[Manifest, bytes]:
    """A manifest from mallory (by default), signed without any validation:
    a trusted peer can sign whatever it likes."""
    signer = signer or env.mallory
    manifest = Manifest(
        transfer_id=transfer_id or os.urandom(16),
        sender=sender if sender is not None else node_key_bytes(signer.node_key),
        receiver=receiver if receiver is not None else node_key_bytes(env.bravo.node_key),
        created=iso_now(),
        chunk_size=chunk_size,
        files=tuple(FileEntry(path, size, 0) for path, size in files),
    )
    return manifest, sign_manifest(manifest, signer.identity.sign)


# -- what bravo wrote -------------------------------------------------------------


def snapshot(root: Path) -> set[str]:
    """Every path under root (files, directories, links), and the listing of
    root's parent, so that a file planted beside the test dir shows up too."""
    seen = {f"../{name}" for name in os.listdir(root.parent)}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            seen.add(os.path.relpath(os.path.join(directory, name), root))
    return seen


# Paths bravo writes for its own bookkeeping on any connection (state db,
# ledger appends and checkpoints): allowed, as are partial/ and inbox/.
_BOOKKEEPING = ("state.db", "ledger", "control.sock", "dorothyd.lock")


def assert_contained(env: Env, before: set[str], *, inbox_allowed: bool = False, honest_ran: bool = False) -> None:
    """New paths since `before` are only bravo's partial/ and inbox/ (and its
    bookkeeping); nothing new in the inbox unless the attack was a transfer
    bravo accepted. `honest_ran`: alpha sent meanwhile, so its home and its
    sources changed too."""
    home = os.path.relpath(env.bravo.home.root, env.tmp_path)
    honest = {os.path.relpath(env.alpha.home.root, env.tmp_path), "honest"} if honest_ran else set()
    new = snapshot(env.tmp_path) - before
    for path in sorted(new):
        inside = path.split(os.sep)
        if inside[0] in honest:
            continue
        assert inside[0] == home, f"attack created {path} outside bravo's home"
        assert len(inside) > 1 and (
            inside[1] in ("partial", "inbox") or inside[1].startswith(_BOOKKEEPING)
        ), f"attack created {path} in bravo's home outside partial/ and inbox/"
        assert inbox_allowed or inside[1] != "inbox", f"refused attack created {path}"


def transfer_rows(node) -> dict[str, str]:
    return {row["id"]: row["state"] for row in node.store.all_transfers()}


def assert_failed_in(env: Env, transfer_id: bytes) -> None:
    """A refused transfer that had been registered is failed for good: state,
    ledger and partial data agree."""
    tid = transfer_id.hex()
    row = env.bravo.store.get(tid)
    assert row is not None and row["state"] == "failed", dict(row) if row else None
    assert not (env.bravo.home.partial_dir / tid).exists()
    assert env.bravo.store.chunks(tid) == {}
    events = [(r.event, r.fields.get("transfer_id")) for r in audit.read_records(env.bravo.home.ledger_dir / "ledger.bin")]
    assert ("transfer_failed", tid) in events


def assert_ledger_ok(node) -> None:
    result = audit.verify_ledger(node.home.ledger_dir / "ledger.bin", node.node_key.sign_public)
    assert result.ok, result


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@contextmanager
def memory_growth():
    """Yields a dict filled on exit with `python_peak` (MiB: the peak of
    Python allocations while inside, bravo's included, since it runs in
    this process) and `maxrss` (MiB the process's peak RSS grew by: coarse,
    since an earlier peak hides anything below it)."""
    result = {}
    rss = max_rss_mib()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        yield result
    finally:
        result["python_peak"] = (tracemalloc.get_traced_memory()[1] - base) / (1 << 20)
        if started:
            tracemalloc.stop()
        result["maxrss"] = max_rss_mib() - rss


# -- the honest transfer that must still work -------------------------------------


def write_source(root: Path, name: str, data: bytes) -> Path:
    path = root / f"src-{next(_counter)}" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


async def deliver_over_tcp(sender, receiver, port: int, transfer_id: str) -> None:
    """The production sender code path (initiate + deliver), over real TCP."""
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            channel = await initiate(stream, sender.identity, receiver.node_key.dh_public, idle_timeout=DEADLINE)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        try:
            row = sender.store.get(transfer_id)
            peer = sender.trust.find_by_node_key(receiver.node_key)
            await deliver(sender, row, peer, Running(trio.CancelScope()), channel)
        finally:
            with trio.CancelScope(shield=True):
                await channel.close()


async def assert_still_serving(env: Env, sender=None, *, size: int = 3 * CHUNK + 1234, internal_errors_ok: bool = False) -> str:
    """bravo logged no internal error, and a complete honest transfer from
    `sender` (alpha) over a new TCP connection arrives in bravo's inbox
    bit-identical."""
    if not internal_errors_ok:
        assert env.errors.summary() == []
    sender = sender or env.alpha
    data = os.urandom(size)
    source = write_source(env.tmp_path / "honest", "evidence.bin", data)
    bravo_name = sender.trust.find_by_node_key(env.bravo.node_key).name
    tid = await queue_transfer(sender, bravo_name, [str(source)])
    await deliver_over_tcp(sender, env.bravo, env.port, tid)
    assert sender.store.get(tid)["state"] == "done"
    assert env.bravo.store.get(tid)["state"] == "done"
    sender_name = env.bravo.trust.find_by_node_key(sender.node_key).name
    published = env.bravo.home.inbox_dir / sender_name / tid / "evidence.bin"
    assert hashlib.sha256(published.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert not (env.bravo.home.partial_dir / tid).exists()
    return tid


# -- attack helpers shared by the tests ---------------------------------------------------


async def assert_refused_unheard(env, data: bytes, *, half_close: bool = False) -> None:
    """bravo closes having sent nothing, registers nothing, writes nothing."""
    before, rows = snapshot(env.tmp_path), transfer_rows(env.bravo)
    assert await raw_exchange(env.port, data, half_close=half_close) == b""
    assert transfer_rows(env.bravo) == rows
    assert_contained(env, before)


async def record_honest_opening(env) -> tuple[bytes, bytes]:
    """alpha's preamble + message 1 and its key confirmation, from a real
    session with bravo that ends with an authenticated close."""
    session = initiator_session(env.alpha.identity, env.bravo_dh)
    stream = await trio.open_tcp_stream("127.0.0.1", env.port)
    opening = session.initiate()
    with trio.fail_after(DEADLINE):
        await stream.send_all(opening)
        while not isinstance(session.next_event(), Authenticated):
            session.receive_data(await stream.receive_some(1 << 16))
        confirm = session.data_to_send()
        await stream.send_all(confirm + session.close())
        await read_to_eof(stream)
    return opening, confirm


async def assert_refused_after_auth(env, peer: RawPeer, before, rows, *, code: str | None, transfer_id: bytes | None = None) -> Outcome:
    """bravo ends the connection; with `code`, it first sends a final abort
    with that code; with `transfer_id`, the transfer it had registered is
    failed for good. Nothing else changes."""
    outcome = await peer.outcome()
    assert outcome.eof
    if code is None:
        assert outcome.received == [], outcome
    else:
        abort = outcome.abort()
        assert (abort.code, abort.final) == (code, True), abort
    if transfer_id is None:
        assert transfer_rows(env.bravo) == rows
    else:
        assert_failed_in(env, transfer_id)
        rows = {**rows, transfer_id.hex(): "failed"}
        assert transfer_rows(env.bravo) == rows
    assert_contained(env, before)
    assert_ledger_ok(env.bravo)
    return outcome


DROP = object()


def raw_body(env, **changes) -> bytes:
    """A manifest body as a list of (key, value) pairs, changed as asked (a
    value of DROP removes the key; EXTRA pairs are appended, repeats allowed)."""
    manifest, _ = hostile_manifest(env, [("f.bin", 10)])
    pairs = [
        ("v", 1),
        ("transfer_id", manifest.transfer_id),
        ("sender", manifest.sender),
        ("receiver", manifest.receiver),
        ("created", manifest.created),
        ("chunk_size", manifest.chunk_size),
        ("files", [["f.bin", 10, 0]]),
    ]
    extra = changes.pop("EXTRA", [])
    pairs = [(k, changes.get(k, v)) for k, v in pairs if changes.get(k, v) is not DROP] + extra
    packer = msgpack.Packer(use_bin_type=True)
    return packer.pack_map_pairs(pairs)


def flip_signature(envelope: bytes) -> bytes:
    body, signature = msgpack.unpackb(envelope)
    return packb([body, bytes([signature[0] ^ 1]) + signature[1:]])


async def offer(env, files, **manifest_args):
    """mallory offers a manifest it signed; returns (peer, manifest) once
    bravo has accepted it."""
    manifest, envelope = hostile_manifest(env, files, **manifest_args)
    peer = await RawPeer.connect(env, env.mallory.identity)
    await peer.send(messages.Offer(manifest=envelope))
    accept = await peer.receive()
    assert isinstance(accept, messages.Accept) and accept.transfer_id == manifest.transfer_id, accept
    assert accept.have == bytes(-(-manifest.total_chunks // 8))
    return peer, manifest


async def send_files(peer: RawPeer, manifest, contents: list[bytes]) -> None:
    """Every chunk, each file's SHA-256, then done: what an honest sender does."""
    for index, data in enumerate(contents):
        for number in range(manifest.chunk_count(index)):
            piece = data[number * manifest.chunk_size : (number + 1) * manifest.chunk_size]
            await peer.send(messages.Chunk(file=index, index=number, compressed=False, data=piece))
        await peer.send(messages.FileDone(file=index, sha256=hashlib.sha256(data).digest()))
    await peer.send(messages.Done())


def zstd(data: bytes, **params) -> bytes:
    if not params:
        return zstandard.ZstdCompressor(level=1).compress(data)
    # Streamed, so the encoder cannot shrink the window to the input size.
    compressor = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(**params)).compressobj()
    return compressor.compress(data) + compressor.flush()


def chunk(file=0, index=0, data=None, compressed=False):
    return messages.Chunk(file=file, index=index, compressed=compressed, data=bytes(CHUNK) if data is None else data)


def receipt_body(manifest, manifest_hash, hashes, **changes) -> ReceiptBody:
    fields = dict(
        transfer_id=manifest.transfer_id,
        manifest_hash=manifest_hash,
        sender=manifest.sender,
        receiver=manifest.receiver,
        file_sha256=tuple(hashes),
        time=iso_now(),
    )
    return ReceiptBody(**{**fields, **changes})


def seal_receipt(body_bytes: bytes, sign, domain=RECEIPT_DOMAIN) -> bytes:
    return packb([body_bytes, sign(domain + body_bytes)])


async def hostile_receiver(env, forge, *, before_accept: bool, task_status=trio.TASK_STATUS_IGNORED):
    """mallory as a receiver: accepts alpha's offer (or not), reads every
    chunk, then answers with the forged receipt."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    stream = await listeners[0].accept()
    await listeners[0].aclose()
    channel = await accept(stream, env.mallory.identity, lambda key: True, idle_timeout=DEADLINE)
    try:
        offer_message = await channel.receive()
        manifest, manifest_hash = open_manifest(offer_message.manifest)
        hashes = [bytes(32)] * len(manifest.files)
        if not before_accept:
            await channel.send(messages.Accept(transfer_id=manifest.transfer_id, have=bytes(-(-manifest.total_chunks // 8))))
            while not isinstance(message := await channel.receive(), messages.Done):
                if isinstance(message, messages.FileDone) or getattr(message, "sha256", None) is not None:
                    hashes[message.file] = message.sha256  # a file_done, or a one-chunk file's chunk
        checkpoint = await env.mallory.checkpoint()
        await channel.send(messages.Receipt(receipt=forge(manifest, manifest_hash, hashes), checkpoint=checkpoint))
        with trio.fail_after(DEADLINE):
            await channel.receive()  # alpha hangs up
    except (ChannelClosed, ProtocolError, trio.BrokenResourceError):
        pass
    finally:
        await channel.close()


@contextmanager
def small_filesystem(directory, size: str):
    """A tmpfs of `size` at `directory` (root only), unmounted afterwards."""
    directory.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


def fill(directory, leave: int):
    """A filler file that leaves about `leave` bytes free; delete it to free space."""
    filler = directory / "filler"
    st = os.statvfs(directory)
    with open(filler, "wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def node_in(home_dir, name: str, **config):
    """A node whose home is `home_dir` (make_node's homes are under tmp_path)."""
    home = Home(home_dir)
    create_home(home, name, "127.0.0.1:0")
    node = load_node(home, "text")
    node.config = dataclasses.replace(node.config, **config)
    return node


async def first_attempt(env, tid: str):
    """alpha's first attempt, driven by hand so that bravo's answer is read
    even if bravo hangs up while chunks are still on the way."""
    peer = await RawPeer.connect(env, env.alpha.identity)
    row = env.alpha.store.get(tid)
    manifest, _ = open_manifest(row["manifest"])
    await peer.send(messages.Offer(manifest=row["manifest"]))
    assert isinstance(await peer.receive(), messages.Accept)
    data = open(env.alpha.store.files(tid)[0].source, "rb").read()
    outcome = None

    async def read():
        nonlocal outcome
        outcome = await peer.outcome()

    async with trio.open_nursery() as both:
        both.start_soon(read)
        await send_files(peer, manifest, [data])
    return outcome


class _OsWith:
    """The os module as storage.py sees it, with some functions replaced,
    so that a fault reaches only the receiver's partial-file writes."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(os, name)


def patch_storage_pwrite(monkeypatch, pwrite) -> None:
    monkeypatch.setattr(storage, "os", _OsWith(pwrite=pwrite))


@contextmanager
def full_disk(how, make_node, tmp_path, monkeypatch):
    """(bravo, alpha, mallory, fill, free): bravo's disk fills up after about
    six chunks once `fill()` is called, until `free()`.

    full-tmpfs: bravo's whole home on a 16 MiB tmpfs, as on a real server
    where partial/, state.db and the ledger share one filesystem.
    enospc-from-pwrite: only the chunk writes fail (os.pwrite patched)."""
    with ExitStack() as stack:
        if how == "full-tmpfs":
            small = stack.enter_context(small_filesystem(tmp_path / "small", "16m"))
            bravo = node_in(small / "bravo", "bravo", listen_port=0)
            stack.callback(bravo.ledger.close)
            stack.callback(bravo.store.close)
            filler = []

            def fill_up():
                filler.append(fill(small, leave=6 * CHUNK))

            def free():
                filler.pop().unlink()
        else:
            bravo = make_node("bravo", listen_host="127.0.0.1", listen_port=0)
            written = [0]

            def pwrite(fd, data, offset):
                if written[0] + len(data) > 6 * CHUNK:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written[0] += len(data)
                return os.pwrite(fd, data, offset)

            def fill_up():
                patch_storage_pwrite(monkeypatch, pwrite)

            def free():
                monkeypatch.setattr(storage, "os", os)

        alpha = make_node("alpha", chunk_size=CHUNK)
        mallory = make_node("mallory", chunk_size=CHUNK)
        introduce(bravo, alpha, mallory)
        yield bravo, alpha, mallory, fill_up, free


class LongestStep(trio.abc.Instrument):
    """The longest stretch the event loop spent in one task step: while it
    runs, no other connection, handshake or control request is served."""

    def __init__(self):
        self.longest = 0.0
        self._start: float | None = None

    def before_task_step(self, task):
        self._start = time.perf_counter()

    def after_task_step(self, task):
        if self._start is not None:  # None: the step began before we were added
            self.longest = max(self.longest, time.perf_counter() - self._start)
