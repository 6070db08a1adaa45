"""The node's append-only ledger: signed, hash-chained records in one file.

`ledger.bin` is a sequence of frames, `u32 big-endian length || payload`.
The payload is `msgpack([body, sig])`: `body` is the msgpack map
{seq, time, event, fields, prev} (keys in that order) and `sig` is Ed25519
over SIGNATURE_DOMAIN || body. The signature covers the stored bytes, so a
verifier never re-encodes anything. `prev` is SHA-256 of the previous
record's payload, and each payload is one RFC 6962 Merkle leaf.
SPEC.md section 6 is the full specification.

This module owns the record codec (shared with audit.py) and the `Ledger`
writer: appends are fsync'd before they return, serialised across processes
by flock, and a torn final record left by a crash is cut away and recorded.
"""

import errno
import fcntl
import hashlib
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import msgpack
import nacl.signing

from ..keys import ed25519
from . import merkle
from .note import Checkpoint, checkpoint_origin, format_utc, parse_utc, sign_note, unverified_checkpoint

LEDGER_FILE = "ledger.bin"
CHECKPOINT_DIR = "checkpoints"
PEER_DIR = "peers"
TORN_DIR = "torn"
LENGTH_PREFIX = struct.Struct(">I")
# Other signatures by the node key (manifests, receipts, notes) can never be
# mistaken for a record's: each domain ends in NUL, which note text cannot hold.
SIGNATURE_DOMAIN = b"dorothy ledger v1\x00"
SIGNATURE_SIZE = 64
GENESIS_PREV = bytes(32)
BODY_KEYS = ("seq", "time", "event", "fields", "prev")
# The largest record is a transfer_received: the sender's manifest (at most
# 15 MiB, protocol/manifest.py), the receipt (~3.4 MiB at 100,000 files) and
# the file list. 64 MiB holds that with ordinary path lengths and bounds the
# one allocation a reader makes per record.
MAX_RECORD_BYTES = 64 * 1024 * 1024
# Nesting deeper than this in `fields` is refused: the events need 3 levels.
MAX_FIELD_DEPTH = 16
_EVENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_TORN_NAME = re.compile(r"(0|[1-9][0-9]*)-([0-9a-f]{64})\.bin")
_NOTE_NAME = re.compile(r"(0|[1-9][0-9]*)\.note")

# Why a record fails verification: a fixed vocabulary, shared with audit.py.
BAD_SIGNATURE = "bad signature"
BROKEN_CHAIN = "broken chain"
GAP = "gap in sequence"
REORDERED = "reordered"
TRUNCATED_RECORD = "truncated record"
TRUNCATED_BEFORE_CHECKPOINT = "truncated before checkpoint"
MALFORMED = "malformed record"

RECOVERY = "recovery"
# Fields every event must carry (more are allowed). `recovery` is written by
# the ledger itself and cannot be appended from outside.
EVENT_FIELDS: dict[str, frozenset[str]] = {
    "node_created": frozenset({"name", "node_key"}),
    "peer_added": frozenset({"name", "address", "node_key", "fingerprint"}),
    "peer_removed": frozenset({"name", "node_key"}),
    "peer_key_changed": frozenset({"name", "old_node_key", "new_node_key"}),
    "transfer_queued": frozenset({"transfer_id", "peer", "peer_node_key", "manifest_hash", "files"}),
    "transfer_delivered": frozenset(
        {"transfer_id", "peer", "peer_node_key", "manifest_hash", "files", "receipt"}
    ),
    "transfer_received": frozenset(
        {"transfer_id", "peer", "peer_node_key", "manifest_hash", "manifest", "files", "receipt"}
    ),
    "transfer_failed": frozenset({"transfer_id", "peer", "direction", "error"}),
    "transfer_cancelled": frozenset({"transfer_id", "peer", "direction", "by"}),
    "daemon_started": frozenset({"listen", "version"}),
    "daemon_stopped": frozenset(),
}


class LedgerError(Exception):
    """The ledger cannot do what was asked (bad event, I/O failure)."""


class RecordError(Exception):
    """A record that fails verification; `reason` is from the vocabulary above.

    `offset` is where its frame starts (None for a record outside a file),
    `frame_end` where the frame claims to end (None if its length is invalid).
    """

    def __init__(self, reason: str, detail: str, offset: int | None = None, frame_end: int | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.offset, self.frame_end = reason, detail, offset, frame_end


class LedgerCorrupt(LedgerError):
    """A record before the final one fails: not a crash, so nothing is cut."""


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    time: str
    event: str
    fields: dict
    prev: bytes
    sig: bytes
    body: memoryview  # the exact signed bytes, in place in `payload`
    payload: bytes  # the exact stored bytes, without the length prefix
    offset: int | None = None

    @property
    def digest(self) -> bytes:
        """What the next record's `prev` must be."""
        return hashlib.sha256(self.payload).digest()

    @property
    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.payload)

    @property
    def timestamp(self) -> datetime:
        return parse_utc(self.time)

    @property
    def end(self) -> int | None:
        return None if self.offset is None else self.offset + LENGTH_PREFIX.size + len(self.payload)


def check_value(value: object, depth: int = 0) -> None:
    """Field values are nil, bool, int, str, bytes, lists and str-keyed maps.
    No floats (one value, one meaning) and no extension types. Exact types
    only, containers too: a subclass could show this walk other contents
    than msgpack packs, and the writer signs what it packed without
    decoding it again."""
    if depth > MAX_FIELD_DEPTH:
        raise ValueError(f"fields nest deeper than {MAX_FIELD_DEPTH}")
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ValueError("field names must be strings")
            check_value(item, depth + 1)
    elif type(value) is list:
        for item in value:
            check_value(item, depth + 1)
    elif value is not None and type(value) not in (bool, int, str, bytes):
        raise ValueError(f"field value of type {type(value).__name__} is not allowed")
    elif type(value) is int and not -(1 << 63) <= value < (1 << 64):
        raise ValueError("integers must fit msgpack's 64 bits")


def _unpack(data: bytes) -> object:
    return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, timestamp=0)


# A payload is msgpack [bin body, bin sig] in its one shortest spelling:
# 0x92, the body as bin 8, 16 or 32 (the shortest that fits), then the
# signature as bin 8. Marker -> (length bytes, the least length it may carry).
_BODY_HEADERS = {0xC4: (1, 0), 0xC5: (2, 1 << 8), 0xC6: (4, 1 << 16)}
_SIGNATURE_HEADER = bytes([0xC4, SIGNATURE_SIZE])


def _split_envelope(payload: bytes) -> tuple[memoryview, bytes]:
    """A payload's body and signature. The body is a view, not a copy: a
    record listing a large folder is megabytes."""
    header = _BODY_HEADERS.get(payload[1]) if len(payload) > 1 and payload[0] == 0x92 else None
    if header is None:
        raise ValueError("payload is not [bin body, 64-byte bin sig]")
    width, least = header
    start = 2 + width
    size = int.from_bytes(payload[2:start], "big")
    end = start + size
    if payload[end : end + 2] != _SIGNATURE_HEADER or len(payload) != end + 2 + SIGNATURE_SIZE:
        raise ValueError("payload is not [bin body, 64-byte bin sig]")
    if size < least:
        raise ValueError("payload is not canonically encoded")
    return memoryview(payload)[start:end], payload[end + 2 :]


def decode_record(payload: bytes, offset: int | None = None) -> Record:
    """A record's structure, strictly; RecordError(MALFORMED) otherwise.
    Neither its signature nor its place in the chain is checked here.

    Envelope and body must each be the canonical (shortest-form) encoding of
    what they decode to, so a record has one spelling: a map with a repeated
    key, say, which decoders resolve differently, is refused."""
    try:
        body, sig = _split_envelope(payload)
        content = _unpack(body)
        if type(content) is not dict or tuple(content) != BODY_KEYS:
            raise ValueError(f"body is not a map with keys {', '.join(BODY_KEYS)} in that order")
        seq, time, event, fields, prev = (content[key] for key in BODY_KEYS)
        if type(seq) is not int or seq < 0:
            raise ValueError("seq is not a non-negative integer")
        parse_utc(time)
        if type(event) is not str or not _EVENT_NAME.fullmatch(event):
            raise ValueError("event is not a lower-case name")
        if type(fields) is not dict:
            raise ValueError("fields is not a map")
        check_value(fields)
        if type(prev) is not bytes or len(prev) != len(GENESIS_PREV):
            raise ValueError("prev is not a 32-byte hash")
        if msgpack.packb(content, use_bin_type=True) != body:
            raise ValueError("body is not canonically encoded")
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        end = None if offset is None else offset + LENGTH_PREFIX.size + len(payload)
        raise RecordError(MALFORMED, str(exc), offset, end) from exc
    return Record(seq, time, event, fields, prev, sig, body, payload, offset)


def check_signature(record: Record, verify_key: nacl.signing.VerifyKey) -> None:
    if not ed25519.verify(verify_key.encode(), record.sig, SIGNATURE_DOMAIN, record.body):
        raise RecordError(BAD_SIGNATURE, f"record {record.seq}", record.offset, record.end)


def link_error(record: Record, expected_seq: int, expected_prev: bytes) -> str | None:
    """Why `record` cannot follow the records before it, if it cannot."""
    if record.seq > expected_seq:
        return GAP
    if record.seq < expected_seq:
        return REORDERED
    if record.prev != expected_prev:
        return BROKEN_CHAIN
    return None


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            raise OSError(errno.EIO, "file shrank while being read")
        chunks.append(chunk)
        size, offset = size - len(chunk), offset + len(chunk)
    return b"".join(chunks)


def scan(fd: int, start: int, end: int, verify_key: nacl.signing.VerifyKey | None) -> Iterator[Record]:
    """Records framed in bytes [start, end) of `fd`, each decoded and, with a
    key, signature-checked; RecordError at the first that is not. The chain
    is the caller's to check. The length is bounded before anything is read."""
    offset = start
    while offset < end:
        if end - offset < LENGTH_PREFIX.size:
            prefix_end = offset + LENGTH_PREFIX.size
            raise RecordError(TRUNCATED_RECORD, "incomplete length prefix", offset, prefix_end)
        (length,) = LENGTH_PREFIX.unpack(_pread_exact(fd, LENGTH_PREFIX.size, offset))
        if not 0 < length <= MAX_RECORD_BYTES:
            raise RecordError(MALFORMED, f"record length {length} outside 1..{MAX_RECORD_BYTES}", offset)
        frame_end = offset + LENGTH_PREFIX.size + length
        if frame_end > end:
            raise RecordError(TRUNCATED_RECORD, f"{frame_end - end} bytes missing", offset, frame_end)
        record = decode_record(_pread_exact(fd, length, offset + LENGTH_PREFIX.size), offset)
        if verify_key is not None:
            check_signature(record, verify_key)
        yield record
        offset = frame_end


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _make_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _check_path_component(name: object) -> str:
    """A peer name safe to use as one directory name."""
    if (
        type(name) is not str
        or not 0 < len(name) <= 128
        or name.startswith(".")
        or any(ch in "/\\" or ord(ch) < 0x20 for ch in name)
    ):
        raise LedgerError(f"peer name {name!r} cannot be a directory name")
    return name


class Ledger:
    """One node's ledger directory (`HOME/ledger/`). Open with `Ledger.open`."""

    def __init__(self, directory: Path, fd: int, signer, now: Callable[[], datetime]):
        self.directory = directory
        self._fd = fd
        self._signer = signer
        self._sign_public = signer.signing_key.verify_key.encode()
        self._verify_key = nacl.signing.VerifyKey(self._sign_public)
        self._now = now
        self._thread_lock = threading.Lock()
        self._next_seq = 0
        self._transfer_events: set[tuple[str, str]] = set()
        self._prev = GENESIS_PREV
        self._tree = merkle.CompactRange()
        self._end = 0
        self._recorded_drops: set[str] = set()
        self.recoveries: list[Record] = []  # recovery records this object wrote

    @classmethod
    def open(cls, directory: str | os.PathLike, signer, *, now: Callable[[], datetime]) -> "Ledger":
        """Open or create the ledger, verify every record, and recover a torn
        tail. Raises LedgerCorrupt if a record before the last one is bad."""
        directory = _make_dir(Path(directory))
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(directory / LEDGER_FILE, flags, 0o600)
        try:
            ledger = cls(directory, fd, signer, now)
            _fsync_dir(directory)  # a newly created file must survive a crash too
            with ledger._locked():
                ledger._sync()
                ledger._record_interrupted_recoveries()
        except BaseException:
            os.close(fd)
            raise
        return ledger

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def size(self) -> int:
        """Records this object has seen (others may have appended since)."""
        return self._next_seq

    @property
    def root(self) -> bytes:
        return self._tree.root()

    def append(self, event: str, fields: dict) -> Record:
        """Sign and durably append one event; returns once it is fsync'd."""
        if event not in EVENT_FIELDS:
            raise LedgerError(f"unknown event {event!r}")
        if type(fields) is not dict:
            raise LedgerError("fields must be a dict")
        missing = EVENT_FIELDS[event] - fields.keys()
        if missing:
            raise LedgerError(f"{event} lacks {', '.join(sorted(missing))}")
        try:
            check_value(fields)
        except ValueError as exc:
            raise LedgerError(str(exc)) from exc
        with self._locked():
            self._sync()
            return self._write(event, fields)

    def checkpoint(self) -> str:
        """Sign the current tree head as a note and keep it in
        checkpoints/<size>.note. One note per size: asking again at the same
        size returns the stored one, whose time says "by then"."""
        with self._locked():
            self._sync()
            path = _make_dir(self.directory / CHECKPOINT_DIR) / f"{self._next_seq}.note"
            if path.exists():
                return path.read_text(encoding="utf-8")
            origin = checkpoint_origin(self._sign_public)
            checkpoint = Checkpoint(origin, self._next_seq, self._tree.root(), self._now())
            note = sign_note(checkpoint.encode(), origin, self._signer)
            _write_atomic(path, note.encode("utf-8"))
            return note

    def latest_checkpoint(self) -> str | None:
        directory = self.directory / CHECKPOINT_DIR
        sizes = [int(m.group(1)) for m in map(_NOTE_NAME.fullmatch, _names(directory)) if m]
        if not sizes:
            return None
        return (directory / f"{max(sizes)}.note").read_text(encoding="utf-8")

    def store_peer_checkpoint(self, peer_name: str, note: str) -> Path:
        """Keep a peer's checkpoint (already verified by the caller) as
        peers/<peer>/<size>.note. A different note for a size already held is
        kept beside it as <size>-<sha256>.note: two heads of one size from
        one peer are evidence, never overwritten."""
        folder = self.directory / PEER_DIR / _check_path_component(peer_name)
        size = unverified_checkpoint(note).size
        data = note.encode("utf-8")
        with self._locked():
            _make_dir(_make_dir(folder.parent) / folder.name)
            path = folder / f"{size}.note"
            if path.exists() and path.read_bytes() != data:
                path = folder / f"{size}-{hashlib.sha256(data).hexdigest()}.note"
            if not path.exists():
                _write_atomic(path, data)
        return path

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # flock excludes other processes (and other Ledger objects); the
        # thread lock excludes threads sharing this object's descriptor.
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def recorded(self, event: str, transfer_id: str) -> bool:
        """Whether a record of `event` for `transfer_id` exists: lets a
        node finishing a transfer after a crash avoid recording it twice."""
        with self._locked():
            self._sync()
            return (event, transfer_id) in self._transfer_events

    def _accept(self, record: Record) -> None:
        transfer_id = record.fields.get("transfer_id")
        if isinstance(transfer_id, str):
            self._transfer_events.add((record.event, transfer_id))
        self._next_seq += 1
        self._prev = record.digest
        self._tree.append(record.leaf_hash)
        self._end = record.end
        if record.event == RECOVERY and type(record.fields.get("dropped_sha256")) is str:
            self._recorded_drops.add(record.fields["dropped_sha256"])

    def _sync(self) -> None:
        """Read what other writers appended since we last looked; cut a torn
        tail away. Holds the lock."""
        eof = os.fstat(self._fd).st_size
        if eof < self._end:
            raise LedgerCorrupt(f"{LEDGER_FILE} shrank from {self._end} to {eof} bytes")
        try:
            for record in scan(self._fd, self._end, eof, self._verify_key):
                reason = link_error(record, self._next_seq, self._prev)
                if reason:
                    detail = f"record {record.seq} at position {self._next_seq}"
                    raise RecordError(reason, detail, record.offset, record.end)
                self._accept(record)
        except RecordError as err:
            if not self._is_torn_tail(err, eof):
                raise LedgerCorrupt(f"record at offset {err.offset}: {err}") from err
            self._recover(err, eof)

    def _is_torn_tail(self, err: RecordError, eof: int) -> bool:
        """Could these bytes be one interrupted append? Then the bad frame is
        the last one; or, with a nonsense length, the rest is the zeros some
        file systems leave in a block allocated before the crash. Never when
        this node already signed a checkpoint covering more records than
        precede the damage: those were acknowledged, so this is corruption
        (a damaged length can make a middle record look like the last)."""
        latest = self.latest_checkpoint()
        if latest is not None and unverified_checkpoint(latest).size > self._next_seq:
            return False
        if err.frame_end is not None:
            return err.frame_end >= eof
        if eof - err.offset > LENGTH_PREFIX.size + MAX_RECORD_BYTES:
            return False
        return not any(_pread_exact(self._fd, eof - err.offset, err.offset))

    def _recover(self, err: RecordError, eof: int) -> None:
        """Preserve the torn bytes, cut them off, and record that we did.
        The copy is written first so that if we crash before the recovery
        record, the next open still finds it and records it."""
        dropped = _pread_exact(self._fd, eof - err.offset, err.offset)
        digest = hashlib.sha256(dropped).hexdigest()
        torn = _make_dir(self.directory / TORN_DIR)
        _write_atomic(torn / f"{err.offset}-{digest}.bin", dropped)
        os.ftruncate(self._fd, err.offset)
        os.fsync(self._fd)
        self._write_recovery(err.offset, len(dropped), digest, f"{err.reason}: {err.detail}")

    def _record_interrupted_recoveries(self) -> None:
        for name in _names(self.directory / TORN_DIR):
            match = _TORN_NAME.fullmatch(name)
            if match and match.group(2) not in self._recorded_drops:
                size = (self.directory / TORN_DIR / name).stat().st_size
                reason = "the node stopped before this recovery was recorded"
                self._write_recovery(int(match.group(1)), size, match.group(2), reason)

    def _write_recovery(self, offset: int, size: int, digest: str, reason: str) -> None:
        fields = {"offset": offset, "dropped_bytes": size, "dropped_sha256": digest, "reason": reason}
        self.recoveries.append(self._write(RECOVERY, fields))

    def _write(self, event: str, fields: dict) -> Record:
        try:
            time = format_utc(self._now())
        except ValueError as exc:
            raise LedgerError(f"the clock gave a bad time: {exc}") from exc
        body = {"seq": self._next_seq, "time": time, "event": event, "fields": fields, "prev": self._prev}
        # A record of 10,000 files is megabytes: keep one copy at a time.
        signed = SIGNATURE_DOMAIN + msgpack.packb(body, use_bin_type=True)
        signature = self._signer.sign(signed)
        payload = msgpack.packb([memoryview(signed)[len(SIGNATURE_DOMAIN) :], signature], use_bin_type=True)
        del signed
        if len(payload) > MAX_RECORD_BYTES:
            raise LedgerError(f"record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
        # Verify the signature we are about to write, as any reader will: a
        # signer whose key is not the one we verify with fails here, not at
        # audit. The body is not decoded again: it is msgpack's encoding of
        # values check_value passed, which decode_record accepts as it is
        # (tests/test_ledger.py checks that), and decoding a record of
        # 50,000 files cost 30 MiB of objects at the peak.
        try:
            body_view, _ = _split_envelope(payload)  # refuses a signature of the wrong length
            record = Record(self._next_seq, time, event, fields, self._prev, signature, body_view, payload, self._end)
            check_signature(record, self._verify_key)
        except (ValueError, RecordError) as exc:
            raise LedgerError(f"refusing to write an unverifiable record: {exc}") from exc
        try:
            _write_all(self._fd, LENGTH_PREFIX.pack(len(payload)))
            _write_all(self._fd, payload)
            os.fsync(self._fd)
        except OSError:
            # Best effort: whatever stays on disk is a torn tail that the
            # next _sync recovers, so a failed rollback loses nothing.
            with suppress(OSError):
                os.ftruncate(self._fd, self._end)
                os.fsync(self._fd)
            raise
        self._accept(record)
        return record


def _names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []
