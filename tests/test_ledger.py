"""dorothyd/ledger.py and dorothyd/audit.py: tamper detection, crash
recovery, concurrent writers, checkpoints, proofs, export and reconcile."""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgpack
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dorothy.dorothyd import audit, ledger as ledger_mod, merkle
from dorothy.dorothyd.audit import AuditError
from dorothy.dorothyd.ledger import (
    BAD_SIGNATURE,
    BROKEN_CHAIN,
    GAP,
    REORDERED,
    TRUNCATED_BEFORE_CHECKPOINT,
    TRUNCATED_RECORD,
    Ledger,
    LedgerCorrupt,
    LedgerError,
)
from dorothy.dorothyd.note import unverified_checkpoint, verify_checkpoint

T0 = datetime(2026, 11, 29, 6, 40, tzinfo=timezone.utc)
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Signer:
    """Stand-in for keys/'s node identity: the duck-typed signer interface."""

    def __init__(self, seed: int = 1):
        self.signing_key = nacl.signing.SigningKey(bytes([seed]) * 32)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    @property
    def public(self) -> bytes:
        return self.signing_key.verify_key.encode()


class Clock:
    """Deterministic time: each reading is a millisecond after the last."""

    def __init__(self):
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


SIGNER = Signer()

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=12) | st.binary(max_size=24),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def events(draw):
    name = draw(st.sampled_from(sorted(ledger_mod.EVENT_FIELDS)))
    fields = {key: draw(values) for key in sorted(ledger_mod.EVENT_FIELDS[name])}
    fields.update(draw(st.dictionaries(st.text(min_size=1, max_size=6), values, max_size=2)))
    return name, fields


def _open(directory: Path, signer: Signer = SIGNER, clock: Clock | None = None) -> Ledger:
    return Ledger.open(directory, signer, now=clock or Clock())


def _build(directory: Path, items) -> tuple[Ledger, list]:
    ledger = _open(directory)
    return ledger, [ledger.append(name, fields) for name, fields in items]


def _frames(records) -> list[tuple[int, int]]:
    return [(r.offset, r.end) for r in records]


def _verify(data: bytes, checkpoints=()) -> audit.VerifyResult:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "copy.bin"
        path.write_bytes(data)
        return audit.verify_ledger(path, SIGNER.public, checkpoints=list(checkpoints))


def _transfer(tid: str, peer: str, peer_key: str, receipt: bytes, sha: str = "ab" * 32) -> dict:
    files = [{"path": "case/1.e01", "size": 10, "sha256": sha}]
    return {"transfer_id": tid, "peer": peer, "peer_node_key": peer_key, "manifest_hash": "cd" * 32,
            "files": files, "receipt": receipt}


@settings(deadline=None)  # each example fsyncs up to 7 times
@given(st.lists(events(), min_size=1, max_size=6))
def test_the_record_append_returns_is_what_any_reader_decodes(items):
    # append builds its Record from what it packed instead of decoding the
    # payload again: that is only sound if a reader decodes the same.
    with tempfile.TemporaryDirectory() as tmp:
        ledger, records = _build(Path(tmp), items)
        ledger.close()
    for written in records:
        read = ledger_mod.decode_record(written.payload, written.offset)
        assert read == written
        assert bytes(read.body) == bytes(written.body)


# --- tamper detection -------------------------------------------------------

@SLOW
@given(st.lists(events(), min_size=1, max_size=6), st.data())
def test_any_changed_byte_is_caught_at_its_record(items, data):
    with tempfile.TemporaryDirectory() as tmp:
        ledger, records = _build(Path(tmp), items)
        original = (Path(tmp) / "ledger.bin").read_bytes()
        ledger.close()
    assert _verify(original).ok
    position = data.draw(st.integers(0, len(original) - 1))
    mask = data.draw(st.integers(1, 255))
    changed = bytearray(original)
    changed[position] ^= mask
    result = _verify(bytes(changed))
    index = next(i for i, (start, end) in enumerate(_frames(records)) if start <= position < end)
    assert not result.ok
    assert (result.seq, result.offset) == (index, records[index].offset)


@SLOW
@given(st.lists(events(), min_size=1, max_size=6), st.data())
def test_truncation_at_any_offset(items, data):
    with tempfile.TemporaryDirectory() as tmp:
        ledger, records = _build(Path(tmp), items)
        original = (Path(tmp) / "ledger.bin").read_bytes()
        full = ledger.checkpoint()
        ledger.close()
    cut = data.draw(st.integers(0, len(original) - 1))
    boundaries = [start for start, _ in _frames(records)]
    result = _verify(original[:cut])
    if cut in boundaries:
        # A clean cut looks like a shorter ledger: only a checkpoint tells.
        assert result.ok and result.records == boundaries.index(cut)
        caught = _verify(original[:cut], [full])
        assert (caught.ok, caught.reason) == (False, TRUNCATED_BEFORE_CHECKPOINT)
        assert caught.seq == boundaries.index(cut)
    else:
        index = max(i for i, b in enumerate(boundaries) if b < cut)
        assert (result.ok, result.reason, result.seq) == (False, TRUNCATED_RECORD, index)


@SLOW
@given(st.lists(events(), min_size=2, max_size=6), st.data())
def test_deleted_duplicated_or_swapped_records_are_caught(items, data):
    with tempfile.TemporaryDirectory() as tmp:
        ledger, records = _build(Path(tmp), items)
        original = (Path(tmp) / "ledger.bin").read_bytes()
        full = ledger.checkpoint()
        ledger.close()
    frames = [original[start:end] for start, end in _frames(records)]
    k = data.draw(st.integers(0, len(frames) - 2))

    deleted = _verify(b"".join(frames[:k] + frames[k + 1 :]))
    assert (deleted.ok, deleted.reason, deleted.seq) == (False, GAP, k)
    last_deleted = b"".join(frames[:-1])
    assert _verify(last_deleted).ok
    assert _verify(last_deleted, [full]).reason == TRUNCATED_BEFORE_CHECKPOINT

    j = data.draw(st.integers(0, len(frames) - 1))
    duplicated = _verify(b"".join(frames[: j + 1] + [frames[j]] + frames[j + 1 :]))
    assert (duplicated.ok, duplicated.reason, duplicated.seq) == (False, REORDERED, j + 1)

    swapped = _verify(b"".join(frames[:k] + [frames[k + 1], frames[k]] + frames[k + 2 :]))
    assert (swapped.ok, swapped.reason, swapped.seq) == (False, REORDERED, k)


def test_spliced_history_is_a_broken_chain(tmp_path):
    _, ours = _build(tmp_path / "a", [("daemon_started", {"listen": "x", "version": "1"})] * 3)
    _, theirs = _build(tmp_path / "b", [("daemon_started", {"listen": "y", "version": "1"})] * 3)
    data_a = (tmp_path / "a" / "ledger.bin").read_bytes()
    data_b = (tmp_path / "b" / "ledger.bin").read_bytes()
    spliced = data_a[: ours[2].offset] + data_b[theirs[2].offset :]  # seq 2 signed, but not chained to ours
    result = _verify(spliced)
    assert (result.ok, result.reason, result.seq, result.offset) == (False, BROKEN_CHAIN, 2, ours[2].offset)


def test_checkpoint_of_another_history_is_caught(tmp_path):
    ours, _ = _build(tmp_path / "a", [("daemon_started", {"listen": "x", "version": "1"})] * 3)
    theirs, _ = _build(tmp_path / "b", [("daemon_started", {"listen": "y", "version": "1"})] * 3)
    result = audit.verify_ledger(tmp_path / "a" / "ledger.bin", SIGNER.public, checkpoints=[theirs.checkpoint()])
    assert (result.ok, result.reason, result.seq) == (False, TRUNCATED_BEFORE_CHECKPOINT, None)
    assert audit.verify_ledger(tmp_path / "a" / "ledger.bin", SIGNER.public, checkpoints=[ours.checkpoint()]).ok


def test_checkpoint_by_another_key_is_a_bad_signature(tmp_path):
    _build(tmp_path / "a", [("daemon_stopped", {})])
    other = _open(tmp_path / "b", Signer(2))
    other.append("daemon_stopped", {})
    result = audit.verify_ledger(tmp_path / "a" / "ledger.bin", SIGNER.public, checkpoints=[other.checkpoint()])
    assert (result.ok, result.reason) == (False, BAD_SIGNATURE)


def test_ledger_signed_by_another_key_fails(tmp_path):
    _build(tmp_path, [("daemon_stopped", {})])
    result = audit.verify_ledger(tmp_path / "ledger.bin", Signer(2).public)
    assert (result.ok, result.reason, result.seq, result.offset) == (False, BAD_SIGNATURE, 0, 0)


# --- crash recovery ---------------------------------------------------------

def test_torn_last_record_is_recovered_at_every_offset(tmp_path):
    items = [("daemon_started", {"listen": "0.0.0.0:7000", "version": "0.1"}),
             ("peer_added", {"name": "bob", "address": "10.0.0.2", "node_key": "dnk1x", "fingerprint": "f"}),
             ("daemon_stopped", {})]
    ledger, records = _build(tmp_path / "orig", items[:-1])
    checkpoint_before = ledger.checkpoint()  # must still verify after recovery
    records.append(ledger.append(*items[-1]))
    ledger.close()
    before_last = records[-1].offset
    for cut in range(before_last + 1, records[-1].end):
        work = tmp_path / f"cut{cut}"
        shutil.copytree(tmp_path / "orig", work)
        torn = (work / "ledger.bin").read_bytes()[before_last:cut]
        os.truncate(work / "ledger.bin", cut)
        with _open(work) as reopened:
            [recovery] = reopened.recoveries
            assert recovery.seq == len(items) - 1
            assert recovery.fields["offset"] == before_last
            assert recovery.fields["dropped_bytes"] == cut - before_last
            assert recovery.fields["dropped_sha256"] == hashlib.sha256(torn).hexdigest()
        kept = work / "torn" / f"{before_last}-{hashlib.sha256(torn).hexdigest()}.bin"
        assert kept.read_bytes() == torn
        result = audit.verify_ledger(work / "ledger.bin", SIGNER.public, checkpoints=[checkpoint_before])
        assert result.ok and result.records == len(items)
        with _open(work) as again:  # recovery happens once
            assert again.recoveries == [] and again.size == len(items)
        shutil.rmtree(work)


def test_cut_at_a_boundary_needs_no_recovery(tmp_path):
    ledger, records = _build(tmp_path, [("daemon_stopped", {})] * 3)
    ledger.close()
    os.truncate(tmp_path / "ledger.bin", records[-1].offset)
    with _open(tmp_path) as reopened:
        assert reopened.recoveries == [] and reopened.size == 2


def test_zero_filled_tail_is_recovered(tmp_path):
    ledger, _ = _build(tmp_path, [("daemon_stopped", {})] * 2)
    ledger.close()
    with open(tmp_path / "ledger.bin", "ab") as f:
        f.write(bytes(4096))
    with _open(tmp_path) as reopened:
        [recovery] = reopened.recoveries
        assert recovery.fields["dropped_bytes"] == 4096
    assert audit.verify_ledger(tmp_path / "ledger.bin", SIGNER.public).ok


def test_final_record_with_bad_signature_is_recovered(tmp_path):
    ledger, records = _build(tmp_path, [("daemon_stopped", {})] * 2)
    ledger.close()
    data = bytearray((tmp_path / "ledger.bin").read_bytes())
    data[-1] ^= 1  # the last byte is in the last record's signature
    (tmp_path / "ledger.bin").write_bytes(bytes(data))
    with _open(tmp_path) as reopened:
        assert BAD_SIGNATURE in reopened.recoveries[0].fields["reason"]
        assert reopened.size == 2


def test_damage_before_the_last_record_refuses_to_open(tmp_path):
    ledger, records = _build(tmp_path, [("daemon_stopped", {})] * 3)
    ledger.close()
    data = bytearray((tmp_path / "ledger.bin").read_bytes())
    data[records[0].end - 1] ^= 1
    (tmp_path / "ledger.bin").write_bytes(bytes(data))
    with pytest.raises(LedgerCorrupt):
        _open(tmp_path)
    assert (tmp_path / "ledger.bin").read_bytes() == bytes(data)  # nothing cut


def test_recovery_interrupted_before_its_record_is_recorded_next_open(tmp_path):
    ledger, records = _build(tmp_path, [("daemon_stopped", {})] * 2)
    ledger.close()
    # As if the node crashed after preserving and cutting, before recording.
    dropped = b"\x00\x00\x01\x00torn"
    (tmp_path / "torn").mkdir()
    digest = hashlib.sha256(dropped).hexdigest()
    (tmp_path / "torn" / f"{records[-1].end}-{digest}.bin").write_bytes(dropped)
    with _open(tmp_path) as reopened:
        [recovery] = reopened.recoveries
        assert recovery.fields["dropped_sha256"] == digest
    with _open(tmp_path) as again:
        assert again.recoveries == []


def test_failed_write_is_rolled_back(tmp_path, monkeypatch):
    ledger = _open(tmp_path)
    ledger.append("daemon_stopped", {})
    real_write = os.write

    def half_then_fail(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ledger_mod.os, "write", half_then_fail)
    with pytest.raises(OSError):
        ledger.append("daemon_stopped", {})
    monkeypatch.undo()
    ledger.append("daemon_stopped", {})
    assert ledger.recoveries == []
    result = audit.verify_ledger(tmp_path / "ledger.bin", SIGNER.public)
    assert result.ok and result.records == 2


# --- writers ----------------------------------------------------------------

def test_two_ledger_objects_interleave_gaplessly(tmp_path):
    a, b = _open(tmp_path), _open(tmp_path)
    for i in range(6):
        (a if i % 2 else b).append("daemon_stopped", {})
    assert [r.seq for r in audit.read_records(tmp_path / "ledger.bin")] == list(range(6))
    assert audit.verify_ledger(tmp_path / "ledger.bin", SIGNER.public).ok
    a.append("daemon_stopped", {})
    assert a.size == 7 and b.size == 5  # b catches up at its next append
    assert b.append("daemon_stopped", {}).seq == 7


def test_concurrent_appends_from_threads_keep_the_chain(tmp_path):
    writers = [_open(tmp_path) for _ in range(3)]
    errors = []

    def work(ledger):
        try:
            for _ in range(15):
                ledger.append("daemon_stopped", {})
        except Exception as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = audit.verify_ledger(tmp_path / "ledger.bin", SIGNER.public)
    assert result.ok and result.records == 45


WRITER_SCRIPT = """
import sys
from datetime import datetime, timezone
import nacl.signing
from dorothy.dorothyd.ledger import Ledger

class Signer:
    signing_key = nacl.signing.SigningKey(bytes([1]) * 32)
    def sign(self, message):
        return self.signing_key.sign(message).signature

ledger = Ledger.open(sys.argv[1], Signer(), now=lambda: datetime.now(timezone.utc))
for i in range(20):
    ledger.append("daemon_stopped", {"writer": sys.argv[2], "i": i})
"""


def test_appends_from_two_processes_keep_the_chain(tmp_path):
    # The daemon and the CLI are separate processes sharing the directory.
    writers = [subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path), name]) for name in "ab"]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    result = audit.verify_ledger(tmp_path / "ledger.bin", SIGNER.public)
    assert result.ok and result.records == 40
    records = audit.read_records(tmp_path / "ledger.bin")
    for name in "ab":
        assert [r.fields["i"] for r in records if r.fields["writer"] == name] == list(range(20))


def test_files_are_private(tmp_path):
    directory = tmp_path / "ledger"
    ledger = _open(directory)
    ledger.append("daemon_stopped", {})
    ledger.store_peer_checkpoint("bob", ledger.checkpoint())
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / "ledger.bin").stat().st_mode & 0o777 == 0o600
    assert (directory / "checkpoints" / "1.note").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "event, fields",
    [
        ("no_such_event", {}),
        ("recovery", {}),  # only the ledger writes these
        ("peer_removed", {"name": "bob"}),  # node_key missing
        ("daemon_stopped", {"x": 1.5}),  # floats are refused
        ("daemon_stopped", {1: "x"}),
        ("daemon_stopped", "not a dict"),
    ],
)
def test_bad_events_are_refused(tmp_path, event, fields):
    ledger = _open(tmp_path)
    with pytest.raises(LedgerError):
        ledger.append(event, fields)
    assert ledger.size == 0


def test_naive_clock_and_oversized_records_are_refused(tmp_path, monkeypatch):
    ledger = Ledger.open(tmp_path, SIGNER, now=lambda: datetime(2026, 1, 1))
    with pytest.raises(LedgerError):
        ledger.append("daemon_stopped", {})
    monkeypatch.setattr(ledger_mod, "MAX_RECORD_BYTES", 300)
    ledger = _open(tmp_path)
    with pytest.raises(LedgerError):
        ledger.append("daemon_stopped", {"pad": b"x" * 300})
    assert os.path.getsize(tmp_path / "ledger.bin") == 0


@pytest.mark.parametrize("signature", [lambda message: Signer(9).sign(message), lambda message: b"short"])
def test_signer_with_a_different_key_or_a_bad_signature_is_refused(tmp_path, signature):
    class Mismatched(Signer):
        def sign(self, message: bytes) -> bytes:
            return signature(message)

    ledger = _open(tmp_path, Mismatched())
    with pytest.raises(LedgerError, match="unverifiable"):
        ledger.append("daemon_stopped", {})
    assert os.path.getsize(tmp_path / "ledger.bin") == 0


class _HidingList(list):
    def __iter__(self):  # what a walk sees; msgpack packs the stored items
        return iter([])


class _HidingDict(dict):
    def items(self):
        return iter([])


@pytest.mark.parametrize("value", [_HidingList([1.5]), _HidingDict(x=1.5), [_HidingList([1.5])], {"a": _HidingDict()}])
def test_container_subclasses_are_refused(tmp_path, value):
    # A subclass could show check_value other contents than msgpack packs,
    # and the writer does not decode what it packed: such a record would be
    # signed and written, and no reader could verify it.
    ledger = _open(tmp_path)
    with pytest.raises(LedgerError, match="not allowed"):
        ledger.append("daemon_stopped", {"x": value})
    assert os.path.getsize(tmp_path / "ledger.bin") == 0


def test_record_encoding_is_as_specified(tmp_path):
    ledger = _open(tmp_path)
    first = ledger.append("daemon_started", {"listen": "l", "version": "v"})
    second = ledger.append("daemon_stopped", {})
    data = (tmp_path / "ledger.bin").read_bytes()
    (length,) = struct.unpack(">I", data[:4])
    assert data[4 : 4 + length] == first.payload and len(data) == 8 + length + len(second.payload)
    assert first.prev == bytes(32) and second.prev == hashlib.sha256(first.payload).digest()
    assert first.time == "2026-11-29T06:40:00.001000Z"
    SIGNER.signing_key.verify_key.verify(b"dorothy ledger v1\x00" + first.body, first.sig)


def _signed_payload(body: bytes, envelope_header: bytes | None = None) -> bytes:
    sig = SIGNER.sign(b"dorothy ledger v1\x00" + body)
    if envelope_header is None:
        return msgpack.packb([body, sig], use_bin_type=True)
    return b"\x92" + envelope_header + body + b"\xc4\x40" + sig


def test_non_canonical_records_are_malformed_even_when_signed():
    good = {"seq": 0, "time": "2026-11-29T06:40:00.000000Z", "event": "daemon_stopped", "fields": {},
            "prev": bytes(32)}
    body = msgpack.packb(good, use_bin_type=True)
    assert ledger_mod.decode_record(_signed_payload(body)).seq == 0
    # The same map with "seq" twice: decoders disagree on which one counts.
    repeated = b"\x86" + msgpack.packb("seq") + msgpack.packb(5) + body[1:]
    # The body's length in a bin16 header where bin8 suffices.
    long_header = b"\xc5" + struct.pack(">H", len(body))
    for payload in (_signed_payload(repeated), _signed_payload(body, long_header)):
        with pytest.raises(ledger_mod.RecordError) as caught:
            ledger_mod.decode_record(payload)
        assert caught.value.reason == ledger_mod.MALFORMED



def _split_generically(payload: bytes) -> tuple[bytes, bytes] | None:
    """What the envelope means to any msgpack decoder, held to its one spelling."""
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.UnpackException):
        return None
    shaped = type(obj) is list and len(obj) == 2 and all(type(part) is bytes for part in obj) and len(obj[1]) == 64
    return (obj[0], obj[1]) if shaped and msgpack.packb(obj, use_bin_type=True) == payload else None


@st.composite
def envelopes(draw):
    """Payloads near the canonical one: every body header width against
    lengths on either side of its limits, wrong signature sizes, extra or
    missing bytes, and arbitrary bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=80))
    size = draw(st.sampled_from([0, 1, 200, 255, 256, 300, 65535, 65536]))
    marker, width = draw(st.sampled_from([(0xC4, 1), (0xC5, 2), (0xC6, 4), (0xD9, 1), (0xC7, 1)]))
    claimed = (size + draw(st.sampled_from([0, 0, 0, -1, 1]))) % (1 << (8 * width))
    sig_size = draw(st.sampled_from([64, 64, 63, 65]))
    tail = draw(st.sampled_from([b"", b"", b"\x00"]))
    first = draw(st.sampled_from([b"\x92", b"\x92", b"\x93", b"\xdc\x00\x02"]))
    body = draw(st.binary(min_size=min(size, 8), max_size=min(size, 8))).ljust(size, b"\x07")
    return first + bytes([marker]) + claimed.to_bytes(width, "big") + body + bytes([0xC4, sig_size]) + bytes(sig_size) + tail


@settings(max_examples=400, deadline=None)
@given(envelopes())
def test_envelope_is_split_in_place_exactly_as_decoders_read_it(payload):
    expected = _split_generically(payload)
    try:
        body, sig = ledger_mod._split_envelope(payload)
    except ValueError:
        assert expected is None
    else:
        assert (bytes(body), sig) == expected

# --- checkpoints and proofs -------------------------------------------------

def test_checkpoints_are_signed_stored_and_stable(tmp_path):
    ledger = _open(tmp_path)
    empty = verify_checkpoint(ledger.checkpoint(), SIGNER.public)
    assert (empty.size, empty.root_hash) == (0, merkle.EMPTY_ROOT)
    for _ in range(5):
        ledger.append("daemon_stopped", {})
    note = ledger.checkpoint()
    head = verify_checkpoint(note, SIGNER.public)
    assert head.size == 5 and head.root_hash == ledger.root
    assert head.root_hash == audit.verify_ledger(tmp_path / "ledger.bin", SIGNER.public).root
    assert ledger.checkpoint() == note  # same size, same note
    assert ledger.latest_checkpoint() == note
    assert (tmp_path / "checkpoints" / "5.note").read_text() == note


def test_peer_checkpoints_are_kept_never_overwritten(tmp_path):
    bob = _open(tmp_path / "bob", Signer(2))
    bob.append("daemon_stopped", {})
    first = bob.checkpoint()
    ours = _open(tmp_path / "ours")
    assert ours.store_peer_checkpoint("bob", first) == tmp_path / "ours" / "peers" / "bob" / "1.note"
    assert ours.store_peer_checkpoint("bob", first).name == "1.note"
    fork = _open(tmp_path / "fork", Signer(2))
    fork.append("daemon_started", {"listen": "x", "version": "y"})
    second = ours.store_peer_checkpoint("bob", fork.checkpoint())
    assert second.name.startswith("1-") and len(list(second.parent.iterdir())) == 2
    for bad in ["", ".", "..", "a/b", ".hidden", "x\n"]:
        with pytest.raises(LedgerError):
            ours.store_peer_checkpoint(bad, first)


def test_inclusion_and_consistency_proofs(tmp_path):
    ledger = _open(tmp_path)
    path = tmp_path / "ledger.bin"
    zero = ledger.checkpoint()
    for _ in range(3):
        ledger.append("daemon_stopped", {})
    small = ledger.checkpoint()
    for _ in range(4):
        ledger.append("daemon_started", {"listen": "l", "version": "v"})
    large = ledger.checkpoint()
    for seq in range(7):
        proof = json.loads(json.dumps(audit.inclusion_proof_for(path, seq, large)))
        assert audit.verify_inclusion_json(proof, SIGNER.public).seq == seq
    proof = audit.inclusion_proof_for(path, 2, small)
    for tampered in [
        {**proof, "record": audit.inclusion_proof_for(path, 1, small)["record"]},
        {**proof, "proof": proof["proof"][1:]},
        {**proof, "checkpoint": large},
        {**proof, "extra": 1},
    ]:
        with pytest.raises(AuditError):
            audit.verify_inclusion_json(tampered, SIGNER.public)
    with pytest.raises(AuditError):
        audit.verify_inclusion_json(proof, Signer(2).public)
    with pytest.raises(AuditError):
        audit.inclusion_proof_for(path, 3, small)

    for old, new in [(small, large), (zero, large), (zero, zero), (small, small)]:
        consistency = json.loads(json.dumps(audit.consistency_proof_for(path, old, new)))
        audit.verify_consistency_json(consistency, SIGNER.public)
    consistency = audit.consistency_proof_for(path, small, large)
    with pytest.raises(AuditError):
        audit.verify_consistency_json({**consistency, "proof": consistency["proof"][:-1]}, SIGNER.public)
    with pytest.raises(AuditError):
        audit.verify_consistency_json({**consistency, "old": large, "new": small}, SIGNER.public)
    with pytest.raises(AuditError):
        audit.consistency_proof_for(path, large, small)


# --- reading, export, reconcile ---------------------------------------------

def test_read_records_is_strict(tmp_path):
    ledger, records = _build(tmp_path, [("daemon_stopped", {})] * 2)
    with open(tmp_path / "ledger.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(AuditError):
        audit.read_records(tmp_path / "ledger.bin")
    with pytest.raises(AuditError):
        audit.read_records(tmp_path / "missing.bin")


def test_filter_and_export(tmp_path):
    ledger = _open(tmp_path)
    ledger.append("peer_added", {"name": "bob", "address": "a", "node_key": "dnk1b", "fingerprint": "f"})
    ledger.append("transfer_delivered", _transfer("11" * 16, "=bob", "dnk1b", b"\x01\x02"))
    ledger.append("transfer_failed", {"transfer_id": "22" * 16, "peer": "carol", "direction": "out", "error": "e"})
    records = audit.read_records(tmp_path / "ledger.bin")
    assert [r.seq for r in audit.filter_records(records, peer="dnk1b")] == [0, 1]
    assert [r.seq for r in audit.filter_records(records, transfer_id="22" * 16)] == [2]
    assert [r.seq for r in audit.filter_records(records, since=records[1].timestamp)] == [1, 2]
    assert [r.seq for r in audit.filter_records(records, until=records[1].timestamp)] == [0]
    lines = audit.export_jsonl(records).splitlines()
    assert json.loads(lines[1])["fields"]["receipt"] == "0102"
    assert json.loads(lines[1])["sha256"] == records[1].digest.hex()
    csv_text = audit.export_csv(records)
    assert ",'=bob," in csv_text  # a formula-looking cell is defused
    assert csv_text.splitlines()[0] == "seq,time,event,transfer_id,peer,sha256,fields"


def _pair(tmp_path, receipt_b=b"receipt", sha_b="ab" * 32, received=True):
    a, b = _open(tmp_path / "a"), _open(tmp_path / "b", Signer(2))
    a.append("node_created", {"name": "alice", "node_key": "dnk1alice"})
    b.append("node_created", {"name": "bob", "node_key": "dnk1bob"})
    tid = "0f" * 16
    a.append("transfer_delivered", _transfer(tid, "bob", "dnk1bob", b"receipt"))
    if received:
        b.append("transfer_received", {**_transfer(tid, "alice", "dnk1alice", receipt_b, sha_b), "manifest": b"m"})
    return audit.read_records(tmp_path / "a" / "ledger.bin"), audit.read_records(tmp_path / "b" / "ledger.bin"), tid


def test_reconcile_agrees(tmp_path):
    records_a, records_b, _ = _pair(tmp_path)
    assert audit.reconcile(records_a, records_b) == []
    assert audit.reconcile(records_b, records_a) == []


@pytest.mark.parametrize(
    "change, words",
    [
        ({"receipt_b": b"forged"}, "receipt"),
        ({"sha_b": "ee" * 32}, "case/1.e01"),
        ({"received": False}, "no transfer_received"),
    ],
)
def test_reconcile_finds_differences(tmp_path, change, words):
    records_a, records_b, tid = _pair(tmp_path, **change)
    [line] = audit.reconcile(records_a, records_b)
    assert tid in line and words in line


def test_reconcile_finds_received_without_delivery(tmp_path):
    records_a, records_b, tid = _pair(tmp_path)
    records_a = [r for r in records_a if r.event != "transfer_delivered"]
    [line] = audit.reconcile(records_a, records_b)
    assert tid in line and "no transfer_delivered" in line


def test_reconcile_needs_node_created(tmp_path):
    records_a, records_b, _ = _pair(tmp_path)
    with pytest.raises(AuditError):
        audit.reconcile(records_a[1:], records_b)
