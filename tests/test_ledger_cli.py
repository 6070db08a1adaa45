"""The auditor's CLI, `dorothy ledger ...`, driven in-process with click's
CliRunner on ledgers written by real transfers (the sender and receiver code
of tests/test_transfer_e2e.py over trio in-memory streams).

One module-scoped world is built once and never modified: two homes, alpha
and bravo, made with `dorothy init` and `dorothy peer add`, then

    t1     alpha -> bravo   delivered (bravo signs checkpoint n1)
    tc     alpha -> charlie queued only (charlie never runs)
    t2     alpha -> bravo   delivered (bravo signs checkpoint n2 > n1)
    t3     bravo -> alpha   delivered (alpha signs its own checkpoint)

Every tampering test works on a copy in its own tmp_path.
"""

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from dorothy.cli.main import main
from dorothy.dorothyd import audit
from dorothy.dorothyd.home import Home
from dorothy.dorothyd.ledger import Ledger
from dorothy.dorothyd.main import load_node
from dorothy.dorothyd.clock import utc_now
from dorothy.dorothyd.note import unverified_checkpoint
from dorothy.dorothyd.queueing import queue_transfer
from dorothy.keys.identity import NodeIdentity

from test_transfer_e2e import CHUNK, attempt

EXPORT_KEYS = {"seq", "time", "event", "fields", "prev", "sig", "sha256"}
CSV_HEADER = ["seq", "time", "event", "transfer_id", "peer", "sha256", "fields"]


# --- running the CLI ---------------------------------------------------------

runner = CliRunner()  # click >= 8.2 keeps stderr apart from stdout


def cli(*args):
    return runner.invoke(main, [str(a) for a in args], env={"DOROTHY_HOME": None, "DOROTHY_PASSPHRASE": None})


def ok(result):
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert result.stderr == "", result.stderr
    return result


def fails(result, *needles) -> str:
    """A refusal: non-zero exit, exactly one line on stderr, no traceback."""
    assert result.exit_code not in (0, None), result.stdout
    # CliRunner swallows tracebacks: an exception that is not SystemExit is
    # one the CLI let escape, which a real run would print as a traceback.
    assert type(result.exception) is SystemExit, f"unhandled {result.exception!r}"
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def stdout_json(result):
    return json.loads(ok(result).stdout)


# --- the world: real transfers between two in-process nodes -------------------


@dataclasses.dataclass
class World:
    alpha: Path  # homes
    bravo: Path
    keys: dict  # name -> node key string
    t1: str
    t2: str
    t3: str
    tc: str
    n1: int  # bravo's checkpoint sizes
    n2: int
    na: int  # alpha's checkpoint size

    def ledger(self, name: str) -> Path:
        return getattr(self, name) / "ledger" / "ledger.bin"

    def records(self, name: str):
        return audit.read_records(self.ledger(name))

    def own_note(self, name: str, size: int) -> Path:
        return getattr(self, name) / "ledger" / "checkpoints" / f"{size}.note"

    def held_note(self, holder: str, peer: str, size: int) -> Path:
        """A checkpoint of `peer` as `holder` keeps it."""
        return getattr(self, holder) / "ledger" / "peers" / peer / f"{size}.note"


def _source(root: Path, name: str, size: int) -> str:
    path = root / name
    path.write_bytes(os.urandom(size))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    homes = {name: root / name for name in ("alpha", "bravo")}
    for name, home in homes.items():
        ok(cli("init", "--home", home, "--name", name, "--listen", "127.0.0.1:0"))
    keys = {name: stdout_json(cli("id", "--json", "--home", home))["node_key"] for name, home in homes.items()}
    keys["charlie"] = str(NodeIdentity.generate().node_key)
    ok(cli("peer", "add", "--home", homes["alpha"], "bravo", "127.0.0.1:9", keys["bravo"]))
    ok(cli("peer", "add", "--home", homes["alpha"], "charlie", "127.0.0.1:9", keys["charlie"]))
    ok(cli("peer", "add", "--home", homes["bravo"], "alpha", "127.0.0.1:9", keys["alpha"]))
    src = root / "src"
    (src / "case").mkdir(parents=True)
    _source(src / "case", "disk.img", 2 * CHUNK + 17)
    (src / "case" / "notes.txt").write_text("seized 06:40\n")
    nodes = {name: load_node(Home(home), "text") for name, home in homes.items()}
    for node in nodes.values():
        node.config = dataclasses.replace(node.config, chunk_size=CHUNK)
    alpha, bravo = nodes["alpha"], nodes["bravo"]

    async def transfers():
        async def deliver(sender, receiver, paths):
            tid = await queue_transfer(sender, receiver.config.name, paths)
            _, _, errors = await attempt(sender, receiver, tid)
            assert errors == []
            assert sender.store.get(tid)["state"] == receiver.store.get(tid)["state"] == "done"
            return tid

        t1 = await deliver(alpha, bravo, [str(src / "case")])
        tc = await queue_transfer(alpha, "charlie", [_source(src, "for-charlie.bin", 1000)])
        t2 = await deliver(alpha, bravo, [_source(src, "second.bin", CHUNK + 5)])
        t3 = await deliver(bravo, alpha, [_source(src, "reply.bin", 3000)])
        return t1, t2, t3, tc

    try:
        t1, t2, t3, tc = trio.run(transfers)
    finally:
        for node in nodes.values():
            node.store.close()
            node.ledger.close()
    # The checkpoints each node sent with its receipts, as the other holds
    # them (nodes also checkpoint after their own deliveries).
    bravo_sizes = sorted(int(p.stem) for p in (homes["alpha"] / "ledger" / "peers" / "bravo").glob("*.note"))
    alpha_sizes = sorted(int(p.stem) for p in (homes["bravo"] / "ledger" / "peers" / "alpha").glob("*.note"))
    assert len(bravo_sizes) == 2 and len(alpha_sizes) == 1, (bravo_sizes, alpha_sizes)
    w = World(homes["alpha"], homes["bravo"], keys, t1, t2, t3, tc, *bravo_sizes, alpha_sizes[0])
    # The sender keeps each checkpoint that came with a receipt, byte for byte.
    for size in (w.n1, w.n2):
        assert w.held_note("alpha", "bravo", size).read_bytes() == w.own_note("bravo", size).read_bytes()
    assert w.held_note("bravo", "alpha", w.na).read_bytes() == w.own_note("alpha", w.na).read_bytes()
    return w


# --- helpers for copies and forgeries -----------------------------------------


def copy_ledger(w: World, name: str, dest: Path, *, records: int | None = None, cut: int | None = None) -> Path:
    """A copy of a node's ledger.bin in a fresh directory: whole, cut after
    `records` records (a record boundary), or cut at byte `cut`."""
    data = w.ledger(name).read_bytes()
    if records is not None:
        recs = w.records(name)
        data = data[: recs[records - 1].end if records else 0]
    if cut is not None:
        data = data[:cut]
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "ledger.bin"
    path.write_bytes(data)
    return path


def frames(path: Path) -> list[bytes]:
    """The ledger's frames (length prefix and payload), in file order."""
    data = path.read_bytes()
    return [data[r.offset : r.end] for r in audit.read_records(path)]


def forge(w: World, name: str, dest: Path, keep: int, event: str, fields: dict) -> Path:
    """What a node rewriting its history can make: its first `keep` records,
    then a different record, signed with its own key and properly chained."""
    path = copy_ledger(w, name, dest, records=keep)
    identity = NodeIdentity.load(getattr(w, name) / "node.key", None)
    with Ledger.open(dest, identity, now=utc_now) as ledger:
        ledger.append(event, fields)
    return path


def verify_file(w: World, path: Path, key_of: str, *checkpoints: Path):
    args = ["ledger", "verify", "--file", path, "--node-key", w.keys[key_of]]
    for note in checkpoints:
        args += ["--checkpoint", note]
    return cli(*args)


def bad_record_line(result, seq: int, offset: int, *reasons: str) -> str:
    line = fails(result, "ledger NOT intact", f"record {seq} (offset {offset})")
    assert result.exit_code == 1
    assert any(f": {reason}: " in line for reason in reasons), line
    return line


# --- verify ------------------------------------------------------------------


def test_verify_both_homes(world):
    for name in ("alpha", "bravo"):
        records = world.records(name)
        out = ok(cli("ledger", "verify", "--home", getattr(world, name))).stdout
        assert out.startswith(f"ledger intact: {len(records)} records, root ")
        assert out.count("\n") == 1


def test_verify_a_copy_without_the_home(world, tmp_path):
    for name in ("alpha", "bravo"):
        copy = copy_ledger(world, name, tmp_path / name)
        home_out = ok(cli("ledger", "verify", "--home", getattr(world, name))).stdout
        assert ok(verify_file(world, copy, name)).stdout == home_out
    # The auditor's copy also verifies against every checkpoint its peer holds.
    copy = tmp_path / "bravo" / "ledger.bin"
    held = [world.held_note("alpha", "bravo", n) for n in (world.n1, world.n2)]
    ok(verify_file(world, copy, "bravo", *held))


def test_verify_json_fields(world, tmp_path):
    records = world.records("alpha")
    report = stdout_json(cli("ledger", "verify", "--home", world.alpha, "--json"))
    assert report.keys() == {"ok", "records", "root", "bad_record", "offset", "reason", "detail"}
    assert report["ok"] is True and report["records"] == len(records)
    assert report["bad_record"] is None and report["offset"] is None and report["reason"] is None
    from dorothy.dorothyd import merkle

    assert report["root"] == merkle.root([r.leaf_hash for r in records]).hex()
    # A failing verify in JSON: the report on stdout, exit 1.
    copy = copy_ledger(world, "alpha", tmp_path)
    data = bytearray(copy.read_bytes())
    data[records[2].end - 1] ^= 0x01  # the last byte of record 2's signature
    copy.write_bytes(bytes(data))
    result = cli("ledger", "verify", "--file", copy, "--node-key", world.keys["alpha"], "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["records"] == 2
    assert (report["bad_record"], report["offset"], report["reason"]) == (2, records[2].offset, "bad signature")


@pytest.mark.parametrize("name", ["alpha", "bravo"])
def test_a_flipped_byte_in_any_record_names_that_record(world, tmp_path, name):
    records = world.records(name)
    original = world.ledger(name).read_bytes()
    copy = tmp_path / "ledger.bin"
    for r in records:
        start = r.offset + 4  # the payload, after the length prefix
        body = start + r.payload.index(r.body)
        positions = {
            "envelope header": start,
            "first body byte": body,
            "in the body": body + len(r.body) // 2,
            "last body byte": body + len(r.body) - 1,
            "in the signature": r.end - 33,
            "last byte": r.end - 1,
        }
        for where, pos in positions.items():
            data = bytearray(original)
            data[pos] ^= 0x40
            copy.write_bytes(bytes(data))
            reasons = ("bad signature",) if "signature" in where or where == "last byte" else (
                "bad signature",
                "malformed record",
            )
            try:
                bad_record_line(verify_file(world, copy, name), r.seq, r.offset, *reasons)
            except AssertionError as exc:
                raise AssertionError(f"{name} record {r.seq} ({r.event}), byte {where}: {exc}") from None


def test_a_deleted_record(world, tmp_path):
    path = world.ledger("alpha")
    parts = frames(path)
    records = world.records("alpha")
    for k in range(len(parts) - 1):  # deleting the last record is a clean cut (below)
        copy = tmp_path / f"deleted-{k}.bin"
        copy.write_bytes(b"".join(parts[:k] + parts[k + 1 :]))
        line = bad_record_line(verify_file(world, copy, "alpha"), k, records[k].offset, "gap in sequence")
        assert f"carries sequence number {k + 1}" in line


def test_a_duplicated_record(world, tmp_path):
    parts = frames(world.ledger("bravo"))
    records = world.records("bravo")
    for k in range(len(parts)):
        copy = tmp_path / f"dup-{k}.bin"
        copy.write_bytes(b"".join(parts[: k + 1] + [parts[k]] + parts[k + 1 :]))
        # The copy sits where record k+1 belongs: it starts where record k ends.
        line = bad_record_line(verify_file(world, copy, "bravo"), k + 1, records[k].end, "reordered")
        assert f"carries sequence number {k}" in line


def test_two_records_swapped(world, tmp_path):
    parts = frames(world.ledger("alpha"))
    records = world.records("alpha")
    for k in range(len(parts) - 1):
        swapped = parts[:k] + [parts[k + 1], parts[k]] + parts[k + 2 :]
        copy = tmp_path / f"swap-{k}.bin"
        copy.write_bytes(b"".join(swapped))
        bad_record_line(verify_file(world, copy, "alpha"), k, records[k].offset, "reordered")


def test_truncation_inside_a_record(world, tmp_path):
    records = world.records("bravo")
    for r in records:
        for cut, where in ((r.offset + 2, "length prefix"), (r.offset + 4 + len(r.payload) // 2, "payload"), (r.end - 1, "last byte")):
            copy = copy_ledger(world, "bravo", tmp_path / f"{r.seq}-{cut}", cut=cut)
            try:
                bad_record_line(verify_file(world, copy, "bravo"), r.seq, r.offset, "truncated record")
            except AssertionError as exc:
                raise AssertionError(f"cut in record {r.seq}'s {where}: {exc}") from None


def test_clean_truncation_is_caught_only_by_a_checkpoint_the_peer_holds(world, tmp_path):
    """Bravo cuts its ledger at a record boundary: the shorter file verifies
    on its own; the checkpoint alpha holds from bravo contradicts it."""
    held = world.held_note("alpha", "bravo", world.n2)
    assert unverified_checkpoint(held.read_text()).size == world.n2
    size_of = {r.seq + 1: r.end for r in world.records("bravo")}
    for keep in range(1, world.n2):
        copy = copy_ledger(world, "bravo", tmp_path / str(keep), records=keep)
        alone = ok(verify_file(world, copy, "bravo")).stdout
        assert alone.startswith(f"ledger intact: {keep} records")
        line = bad_record_line(
            verify_file(world, copy, "bravo", held), keep, size_of[keep], "truncated before checkpoint"
        )
        assert f"commits to {world.n2} records; the file holds {keep}" in line
    # The older checkpoint alpha holds is still consistent with a cut after it.
    ok(verify_file(world, tmp_path / str(world.n1) / "ledger.bin", "bravo", world.held_note("alpha", "bravo", world.n1)))


def test_a_truncated_home_is_caught_by_its_own_checkpoints(world, tmp_path):
    home = tmp_path / "bravo"
    shutil.copytree(world.bravo, home)
    copy_ledger(world, "bravo", home / "ledger", records=world.n1)
    result = cli("ledger", "verify", "--home", home)
    bad_record_line(result, world.n1, world.records("bravo")[world.n1 - 1].end, "truncated before checkpoint")


def _received(w: World, name: str, transfer_id: str):
    return next(r for r in w.records(name) if r.event == "transfer_received" and r.fields["transfer_id"] == transfer_id)


def forged_bravo(w: World, dest: Path) -> Path:
    """Bravo rewrites history: t2's transfer_received, re-signed with a
    different SHA-256 for the file, at the same position, with a valid chain."""
    original = _received(w, "bravo", w.t2)
    fields = dict(original.fields)
    fields["files"] = [dict(f, sha256="00" * 32) for f in fields["files"]]
    return forge(w, "bravo", dest, original.seq, "transfer_received", fields)


def test_rewritten_history_contradicts_the_checkpoint_the_peer_holds(world, tmp_path):
    forged = forged_bravo(world, tmp_path)
    assert len(audit.read_records(forged)) == world.n2
    ok(verify_file(world, forged, "bravo"))  # signed, chained: fine on its own
    line = fails(verify_file(world, forged, "bravo", world.held_note("alpha", "bravo", world.n2)))
    assert "truncated before checkpoint" in line and f"first {world.n2} records" in line
    # The checkpoint before the rewrite still matches.
    ok(verify_file(world, forged, "bravo", world.held_note("alpha", "bravo", world.n1)))


def test_verify_failure_without_a_record_does_not_print_none(world, tmp_path):
    """For rewritten history (and a checkpoint that does not verify) no
    single record is to blame (SPEC 6.6); the line must not say
    'record None (offset None)'."""
    forged = forged_bravo(world, tmp_path)
    line = fails(verify_file(world, forged, "bravo", world.held_note("alpha", "bravo", world.n2)))
    assert "None" not in line, line
    line = fails(verify_file(world, world.ledger("bravo"), "bravo", world.own_note("alpha", world.na)))
    assert "bad signature" in line and "None" not in line, line


def test_wrong_node_key_fails(world, tmp_path):
    copy = copy_ledger(world, "bravo", tmp_path)
    bad_record_line(verify_file(world, copy, "alpha"), 0, 0, "bad signature")
    result = cli("ledger", "verify", "--home", world.bravo, "--node-key", world.keys["charlie"])
    bad_record_line(result, 0, 0, "bad signature")


def test_a_checkpoint_by_another_node_fails(world):
    result = verify_file(world, world.ledger("bravo"), "bravo", world.own_note("alpha", world.na))
    line = fails(result, "bad signature")
    assert result.exit_code == 1 and "checkpoint 1" in line


# --- show --------------------------------------------------------------------


def shown(world, name, *args):
    return stdout_json(cli("ledger", "show", "--home", getattr(world, name), "--json", *args))


def test_show_text(world):
    records = world.records("alpha")
    out = ok(cli("ledger", "show", "--home", world.alpha)).stdout
    lines = out.splitlines()
    heads = [line for line in lines if not line.startswith("        ")]
    assert len(heads) == len(records)
    for r, line in zip(records, heads):
        assert line.startswith(f"{r.seq:>6}  {r.time}  {r.event}"), line
    delivered = next(r for r in records if r.event == "transfer_delivered" and r.fields["transfer_id"] == world.t1)
    head = heads[delivered.seq]
    assert f"transfer_id={world.t1}" in head and "peer=bravo" in head
    for f in delivered.fields["files"]:
        assert any(f["sha256"] in line and f["path"] in line and str(f["size"]) in line for line in lines)


def test_show_json(world):
    records = world.records("bravo")
    shown_records = shown(world, "bravo")
    assert [s["seq"] for s in shown_records] == [r.seq for r in records]
    for s, r in zip(shown_records, records):
        assert s.keys() == EXPORT_KEYS
        assert (s["time"], s["event"], s["prev"], s["sig"]) == (r.time, r.event, r.prev.hex(), r.sig.hex())
        assert s["sha256"] == hashlib.sha256(r.payload).hexdigest()


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_show_since_until(world):
    records = world.records("alpha")
    seqs = [r.seq for r in records]
    show = lambda *a: [s["seq"] for s in shown(world, "alpha", *a)]  # noqa: E731
    assert show("--since", "2000-01-01") == seqs
    assert show("--until", "2000-01-01") == []
    assert show("--since", "2999-12-31") == []
    assert show("--until", "2999-12-31T23:59:59Z") == seqs
    for r in records[1:]:
        at = _at(r.time)
        expected_since = [x.seq for x in records if _at(x.time) >= at]
        expected_until = [x.seq for x in records if _at(x.time) < at]
        assert show("--since", r.time) == expected_since
        assert show("--until", r.time) == expected_until
        # The same instant in another zone, and naive times read as UTC.
        plus_two = at.astimezone(timezone(timedelta(hours=2))).isoformat()
        assert show("--since", plus_two) == expected_since
        assert show("--since", r.time.rstrip("Z")) == expected_since
    first, last = records[1], records[-2]
    window = show("--since", first.time, "--until", last.time)
    assert window == [x.seq for x in records if _at(first.time) <= _at(x.time) < _at(last.time)]


def test_show_peer_filter(world):
    records = world.records("alpha")
    charlie = shown(world, "alpha", "--peer", "charlie")
    assert [(s["event"], s["fields"].get("transfer_id")) for s in charlie] == [
        ("peer_added", None),
        ("transfer_queued", world.tc),
    ]
    assert shown(world, "alpha", "--peer", world.keys["charlie"]) == charlie
    bravo = [s["seq"] for s in shown(world, "alpha", "--peer", "bravo")]
    expected = [
        r.seq
        for r in records
        if r.fields.get("peer") == "bravo" or (r.event == "peer_added" and r.fields["name"] == "bravo")
    ]
    assert bravo == expected and len(expected) == 1 + 2 + 2 + 1  # added, t1, t2, t3
    assert shown(world, "alpha", "--peer", "delta") == []


def test_show_transfer_filter(world):
    assert [s["event"] for s in shown(world, "alpha", "--transfer", world.t1)] == ["transfer_queued", "transfer_delivered"]
    assert [s["event"] for s in shown(world, "bravo", "--transfer", world.t1)] == ["transfer_received"]
    assert [s["event"] for s in shown(world, "bravo", "--transfer", world.t3)] == ["transfer_queued", "transfer_delivered"]
    assert [s["event"] for s in shown(world, "alpha", "--transfer", world.tc)] == ["transfer_queued"]
    for s in shown(world, "alpha", "--transfer", world.t2):
        assert s["fields"]["transfer_id"] == world.t2
    assert shown(world, "alpha", "--transfer", world.t1, "--peer", "charlie") == []
    assert shown(world, "alpha", "--transfer", "0" * 32) == []


def test_show_from_a_copy(world, tmp_path):
    copy = copy_ledger(world, "alpha", tmp_path)
    assert stdout_json(cli("ledger", "show", "--file", copy, "--json")) == shown(world, "alpha")


@pytest.mark.parametrize("option", ["--since", "--until"])
@pytest.mark.parametrize("value", ["yesterday", "2026-13-01", "29/11/2026", ""])
def test_show_bad_time_is_one_line(world, option, value):
    fails(cli("ledger", "show", "--home", world.alpha, option, value), "not an ISO 8601 time")


# --- export ------------------------------------------------------------------


def _binary_fields_as_hex(record, exported_fields):
    for key, value in record.fields.items():
        if isinstance(value, bytes):
            assert exported_fields[key] == value.hex()


def test_export_jsonl(world):
    for name in ("alpha", "bravo"):
        records = world.records(name)
        out = ok(cli("ledger", "export", "--home", getattr(world, name), "--format", "jsonl")).stdout
        assert out.endswith("\n")
        lines = out.splitlines()
        assert len(lines) == len(records)
        for line, r in zip(lines, records):
            obj = json.loads(line)
            assert obj.keys() == EXPORT_KEYS
            assert (obj["seq"], obj["time"], obj["event"]) == (r.seq, r.time, r.event)
            assert obj["prev"] == r.prev.hex() and obj["sig"] == r.sig.hex()
            assert obj["sha256"] == hashlib.sha256(r.payload).hexdigest()
            _binary_fields_as_hex(r, obj["fields"])
        events = [json.loads(line)["event"] for line in lines]
        assert ("transfer_delivered" in events) and ("transfer_received" in events)
    # jsonl is the default format
    assert ok(cli("ledger", "export", "--home", world.bravo)).stdout == ok(
        cli("ledger", "export", "--home", world.bravo, "--format", "jsonl")
    ).stdout


def test_export_receipt_and_manifest_are_hex(world):
    lines = ok(cli("ledger", "export", "--home", world.bravo)).stdout.splitlines()
    got = next(json.loads(line) for line in lines if json.loads(line)["event"] == "transfer_received")
    original = _received(world, "bravo", got["fields"]["transfer_id"])
    assert bytes.fromhex(got["fields"]["receipt"]) == original.fields["receipt"]
    assert bytes.fromhex(got["fields"]["manifest"]) == original.fields["manifest"]


def test_export_csv(world, tmp_path):
    records = world.records("alpha")
    out = ok(cli("ledger", "export", "--file", copy_ledger(world, "alpha", tmp_path), "--format", "csv")).stdout
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == CSV_HEADER
    assert len(rows) == 1 + len(records)
    for row, r in zip(rows[1:], records):
        seq, time, event, transfer_id, peer, sha256, fields = row
        assert (int(seq), time, event) == (r.seq, r.time, r.event)
        assert transfer_id == r.fields.get("transfer_id", "")
        assert peer == r.fields.get("peer", "")
        assert sha256 == hashlib.sha256(r.payload).hexdigest()
        decoded = json.loads(fields)
        assert decoded.keys() == r.fields.keys()
        _binary_fields_as_hex(r, decoded)


# --- prove and verify-proof -----------------------------------------------------


def _flip_hex(text: str) -> str:
    return ("1" if text[0] == "0" else "0") + text[1:]


def spec_form(proof: dict) -> dict:
    """An inclusion or consistency proof in exactly the form of SPEC 6.6."""
    keys = {"format", "seq", "record", "proof", "checkpoint"} if "record" in proof else {"format", "old", "new", "proof"}
    return {k: v for k, v in proof.items() if k in keys}


def test_prove_a_transfer(world):
    records = world.records("alpha")
    proof = stdout_json(cli("ledger", "prove", "--home", world.alpha, world.t1))
    assert proof["transfer_id"] == world.t1 and proof["verified"] is True
    mine = [r for r in records if r.fields.get("transfer_id") == world.t1]
    assert [p["event"] for p in proof["proofs"]] == [r.event for r in mine] == ["transfer_queued", "transfer_delivered"]
    note = world.own_note("alpha", world.na).read_text()
    for p, r in zip(proof["proofs"], mine):
        assert p["format"] == "dorothy-inclusion-v1"
        assert p["seq"] == r.seq and p["record"] == r.payload.hex() and p["checkpoint"] == note
        assert p["proof"] and all(len(h) == 64 for h in p["proof"])


def test_verify_proof_accepts_what_prove_wrote(world, tmp_path):
    """`verify-proof` says it verifies "a proof file written by prove": the
    file exactly as `prove` printed it, extra "event" keys and all."""
    result = ok(cli("ledger", "prove", "--home", world.alpha, world.t1))
    path = tmp_path / "proof.json"
    path.write_text(result.stdout)
    assert ok(cli("ledger", "verify-proof", "--node-key", world.keys["alpha"], path)).stdout == "proof verified\n"


def test_verify_proof_rejects_any_tampering_with_an_inclusion_proof(world, tmp_path):
    proof = stdout_json(cli("ledger", "prove", "--home", world.alpha, world.t1))
    proof = {"proofs": [spec_form(p) for p in proof["proofs"]]}
    path = tmp_path / "proof.json"

    def check(data, *needles):
        path.write_text(json.dumps(data))
        return fails(cli("ledger", "verify-proof", "--node-key", world.keys["alpha"], path), *needles)

    path.write_text(json.dumps(proof))
    assert ok(cli("ledger", "verify-proof", "--node-key", world.keys["alpha"], path)).stdout == "proof verified\n"
    # Every hash of every path matters.
    for i, p in enumerate(proof["proofs"]):
        for j in range(len(p["proof"])):
            bad = json.loads(json.dumps(proof))
            bad["proofs"][i]["proof"][j] = _flip_hex(p["proof"][j])
            check(bad, "inclusion proof rejected")
    # So do the record, its position, the checkpoint and the key.
    bad = json.loads(json.dumps(proof))
    bad["proofs"][1]["record"] = bad["proofs"][1]["record"][:-1] + _flip_hex(bad["proofs"][1]["record"][-1])
    check(bad, "rejected")
    bad = json.loads(json.dumps(proof))
    bad["proofs"][0]["seq"] += 1
    check(bad, "sequence number")
    bad = json.loads(json.dumps(proof))
    bad["proofs"][0]["checkpoint"] = _tamper_note(bad["proofs"][0]["checkpoint"])
    check(bad, "checkpoint")
    bad = json.loads(json.dumps(proof))
    bad["proofs"][0]["proof"] = bad["proofs"][0]["proof"][:-1]
    check(bad, "rejected")
    path.write_text(json.dumps(proof))
    fails(cli("ledger", "verify-proof", "--node-key", world.keys["bravo"], path), "checkpoint")


def test_prove_a_received_transfer_offline_with_the_checkpoint_the_sender_holds(world, tmp_path):
    copy = copy_ledger(world, "bravo", tmp_path)
    held = world.held_note("alpha", "bravo", world.n1)
    proof = stdout_json(
        cli("ledger", "prove", "--file", copy, "--node-key", world.keys["bravo"], "--checkpoint", held, world.t1)
    )
    assert proof["verified"] is True
    assert [p["event"] for p in proof["proofs"]] == ["transfer_received"]
    assert proof["proofs"][0]["checkpoint"] == held.read_text()
    # One inclusion proof on its own (not wrapped in "proofs"), as SPEC 6.6 spells it.
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(spec_form(proof["proofs"][0])))
    ok(cli("ledger", "verify-proof", "--node-key", world.keys["bravo"], path))
    fails(cli("ledger", "verify-proof", "--node-key", world.keys["alpha"], path), "checkpoint")


def test_prove_refuses_what_the_checkpoint_cannot_cover(world, tmp_path):
    # t2 was received after bravo's first checkpoint
    held = world.held_note("alpha", "bravo", world.n1)
    fails(cli("ledger", "prove", "--home", world.bravo, "--checkpoint", held, world.t2), "newer than the checkpoint")
    # ...while t3, which bravo delivered last, is covered: a node signs a
    # checkpoint after each delivery it records, too.
    assert stdout_json(cli("ledger", "prove", "--home", world.bravo, world.t3))["verified"] is True
    fails(cli("ledger", "prove", "--home", world.alpha, "0" * 32), "no records of transfer")
    copy = copy_ledger(world, "bravo", tmp_path / "copy")
    fails(cli("ledger", "prove", "--file", copy, "--node-key", world.keys["bravo"], world.t1), "no checkpoint")
    # A rewritten ledger cannot be proven against what the peer holds.
    forged = forged_bravo(world, tmp_path / "forged")
    fails(
        cli("ledger", "prove", "--file", forged, "--node-key", world.keys["bravo"], "--checkpoint",
            world.held_note("alpha", "bravo", world.n2), world.t1),
        "do not match the checkpoint",
    )


# --- consistency ----------------------------------------------------------------


def test_consistency_between_two_checkpoints(world, tmp_path):
    old, new = world.own_note("bravo", world.n1), world.own_note("bravo", world.n2)
    proof = stdout_json(cli("ledger", "consistency", "--home", world.bravo, old, new))
    assert proof["verified"] is True and proof["format"] == "dorothy-consistency-v1"
    assert proof["old"] == old.read_text() and proof["new"] == new.read_text()
    assert proof["proof"] and all(len(h) == 64 for h in proof["proof"])
    # The auditor's way: a copy, the key, and the notes alpha holds.
    copy = copy_ledger(world, "bravo", tmp_path)
    held_old, held_new = (world.held_note("alpha", "bravo", n) for n in (world.n1, world.n2))
    offline = stdout_json(cli("ledger", "consistency", "--file", copy, "--node-key", world.keys["bravo"], held_old, held_new))
    assert offline == proof


def test_verify_proof_accepts_what_consistency_wrote(world, tmp_path):
    old, new = world.own_note("bravo", world.n1), world.own_note("bravo", world.n2)
    path = tmp_path / "consistency.json"
    path.write_text(ok(cli("ledger", "consistency", "--home", world.bravo, old, new)).stdout)
    assert ok(cli("ledger", "verify-proof", "--node-key", world.keys["bravo"], path)).stdout == "proof verified\n"


def test_verify_proof_rejects_any_tampering_with_a_consistency_proof(world, tmp_path):
    old, new = world.own_note("bravo", world.n1), world.own_note("bravo", world.n2)
    proof = spec_form(stdout_json(cli("ledger", "consistency", "--home", world.bravo, old, new)))
    path = tmp_path / "consistency.json"
    path.write_text(json.dumps(proof))
    ok(cli("ledger", "verify-proof", "--node-key", world.keys["bravo"], path))
    for j, h in enumerate(proof["proof"]):
        bad = dict(proof, proof=[*proof["proof"][:j], _flip_hex(h), *proof["proof"][j + 1 :]])
        path.write_text(json.dumps(bad))
        fails(cli("ledger", "verify-proof", "--node-key", world.keys["bravo"], path), "consistency proof rejected")
    path.write_text(json.dumps(dict(proof, old=proof["new"], new=proof["old"])))
    fails(cli("ledger", "verify-proof", "--node-key", world.keys["bravo"], path))
    path.write_text(json.dumps(proof))
    fails(cli("ledger", "verify-proof", "--node-key", world.keys["alpha"], path), "checkpoint")


def _tamper_note(note: str) -> str:
    """Change the signed time line: still a well-formed checkpoint, no longer signed."""
    lines = note.split("\n")
    assert lines[3].startswith("time ")
    lines[3] = lines[3][:-3] + ("1Z" if lines[3][-2] != "1" else "2Z")
    return "\n".join(lines)


def test_consistency_refuses_swapped_or_tampered_checkpoints(world, tmp_path):
    old, new = world.own_note("bravo", world.n1), world.own_note("bravo", world.n2)
    fails(cli("ledger", "consistency", "--home", world.bravo, new, old), "old checkpoint is larger")
    tampered = tmp_path / "tampered.note"
    tampered.write_text(_tamper_note(new.read_text()))
    fails(cli("ledger", "consistency", "--home", world.bravo, old, tampered), "checkpoint")
    tampered.write_text(_tamper_note(old.read_text()))
    fails(cli("ledger", "consistency", "--home", world.bravo, tampered, new), "checkpoint")
    # A note of another node's ledger, and a ledger rewritten since the note.
    fails(cli("ledger", "consistency", "--home", world.bravo, old, world.own_note("alpha", world.na)))
    forged = forged_bravo(world, tmp_path / "forged")
    fails(
        cli("ledger", "consistency", "--file", forged, "--node-key", world.keys["bravo"], old, new),
        "do not match the checkpoint",
    )
    # A verify-proof whose old note was tampered with.
    proof = spec_form(stdout_json(cli("ledger", "consistency", "--home", world.bravo, old, new)))
    proof["old"] = _tamper_note(proof["old"])
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(proof))
    fails(cli("ledger", "verify-proof", "--node-key", world.keys["bravo"], path), "checkpoint")


# --- reconcile -------------------------------------------------------------------


def test_reconcile_matching_ledgers(world, tmp_path):
    result = ok(cli("ledger", "reconcile", world.ledger("alpha"), world.ledger("bravo")))
    assert "ledgers reconcile" in result.stdout
    ok(cli("ledger", "reconcile", world.ledger("bravo"), copy_ledger(world, "alpha", tmp_path)))


def test_reconcile_names_transfers_one_side_lacks(world, tmp_path):
    received_t2 = _received(world, "bravo", world.t2)
    short = copy_ledger(world, "bravo", tmp_path, records=received_t2.seq)  # verifies on its own
    ok(verify_file(world, short, "bravo"))
    for a, b in ((world.ledger("alpha"), short), (short, world.ledger("alpha"))):
        result = cli("ledger", "reconcile", a, b)
        assert result.exit_code == 1 and type(result.exception) is SystemExit
        lines = result.stdout.splitlines()
        assert lines and all(line.startswith("transfer ") for line in lines)
        # t2: alpha delivered, bravo no longer records it received; t3: alpha
        # received, bravo no longer records it delivered. t1 still matches.
        assert {line.split()[1].rstrip(":") for line in lines} == {world.t2, world.t3}
        assert not any(world.t1 in line for line in lines)
        assert any(world.t2 in line and "has no transfer_received" in line for line in lines)
        assert any(world.t3 in line and "has no transfer_delivered" in line for line in lines)


def test_reconcile_names_a_transfer_whose_hashes_differ(world, tmp_path):
    forged = forged_bravo(world, tmp_path)
    result = cli("ledger", "reconcile", world.ledger("alpha"), forged)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"transfer {world.t2}: file ") and "differs" in line for line in lines), lines
    assert not any(world.t1 in line for line in lines)


def test_reconcile_notices_a_transfer_recorded_twice(world, tmp_path):
    received_t2 = _received(world, "bravo", world.t2)
    dest = tmp_path / "twice"
    path = copy_ledger(world, "bravo", dest)
    identity = NodeIdentity.load(world.bravo / "node.key", None)
    with Ledger.open(dest, identity, now=utc_now) as ledger:
        ledger.append("transfer_received", dict(received_t2.fields))
    result = cli("ledger", "reconcile", world.ledger("alpha"), path)
    assert result.exit_code == 1
    assert any(world.t2 in line and "more than once" in line for line in result.stdout.splitlines())


# --- every error path: one line, non-zero, no traceback ----------------------------


def _error_cases(world, tmp_path):
    bravo_copy = copy_ledger(world, "bravo", tmp_path / "copy")
    corrupt = copy_ledger(world, "bravo", tmp_path / "corrupt")
    data = bytearray(corrupt.read_bytes())
    data[world.records("bravo")[1].offset + 10] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("not a note\n")
    binary = tmp_path / "binary.note"
    binary.write_bytes(b"\xff\xfe\x00")
    missing = tmp_path / "missing"
    key = world.keys["bravo"]
    note = world.own_note("bravo", world.n1)

    def proof_file(name, content):
        path = tmp_path / name
        path.write_text(content)
        return path

    return {
        "verify --file without --node-key": (["ledger", "verify", "--file", bravo_copy], "--node-key"),
        "verify with a malformed node key": (["ledger", "verify", "--file", bravo_copy, "--node-key", "dnk1abc"], "node key"),
        "verify a missing file": (["ledger", "verify", "--file", missing, "--node-key", key], "missing"),
        "verify a home that is not one": (["ledger", "verify", "--home", tmp_path / "nohome"], "not a Dorothy home"),
        "verify with a missing checkpoint file": (["ledger", "verify", "--home", world.bravo, "--checkpoint", missing], "missing"),
        "verify with a garbage checkpoint": (["ledger", "verify", "--home", world.bravo, "--checkpoint", garbage], "checkpoint"),
        "verify with a binary checkpoint": (["ledger", "verify", "--home", world.bravo, "--checkpoint", binary], ""),
        "show a missing file": (["ledger", "show", "--file", missing], "missing"),
        "show a corrupt ledger": (["ledger", "show", "--file", corrupt], "offset"),
        "export a corrupt ledger": (["ledger", "export", "--file", corrupt], "offset"),
        "prove with a garbage checkpoint": (["ledger", "prove", "--home", world.bravo, "--checkpoint", garbage, world.t1], ""),
        "prove on a corrupt ledger": (["ledger", "prove", "--file", corrupt, "--node-key", key, "--checkpoint", note, world.t1], "offset"),
        "verify-proof without a key": (["ledger", "verify-proof", proof_file("p0.json", "{}")], "--node-key"),
        "verify-proof of a missing file": (["ledger", "verify-proof", "--node-key", key, missing], "missing"),
        "verify-proof of non-JSON": (["ledger", "verify-proof", "--node-key", key, garbage], ""),
        "verify-proof of an empty object": (["ledger", "verify-proof", "--node-key", key, proof_file("p1.json", "{}")], "proof"),
        "verify-proof of a JSON list": (["ledger", "verify-proof", "--node-key", key, proof_file("p2.json", "[]")], ""),
        "verify-proof of a JSON string": (["ledger", "verify-proof", "--node-key", key, proof_file("p3.json", '"x"')], ""),
        "verify-proof with a number as a proof": (
            ["ledger", "verify-proof", "--node-key", key, proof_file("p4.json", '{"proofs": [1]}')], ""),
        "verify-proof with proofs not a list": (
            ["ledger", "verify-proof", "--node-key", key, proof_file("p5.json", '{"proofs": 7}')], ""),
        "verify-proof with a non-hex record": (
            ["ledger", "verify-proof", "--node-key", key, proof_file("p6.json", json.dumps(
                {"format": "dorothy-inclusion-v1", "seq": 0, "record": "zz", "proof": [], "checkpoint": note.read_text()}))],
            "inclusion proof rejected"),
        "consistency with a garbage note": (["ledger", "consistency", "--home", world.bravo, note, garbage], "checkpoint"),
        "consistency with a missing note": (["ledger", "consistency", "--home", world.bravo, note, missing], "missing"),
        "reconcile a missing file": (["ledger", "reconcile", missing, bravo_copy], "missing"),
        "reconcile an empty ledger": (["ledger", "reconcile", empty, bravo_copy], "node_created"),
        "reconcile a corrupt ledger": (["ledger", "reconcile", bravo_copy, corrupt], "offset"),
    }


ERROR_CASES = [
    "verify --file without --node-key",
    "verify with a malformed node key",
    "verify a missing file",
    "verify a home that is not one",
    "verify with a missing checkpoint file",
    "verify with a garbage checkpoint",
    "verify with a binary checkpoint",
    "show a missing file",
    "show a corrupt ledger",
    "export a corrupt ledger",
    "prove with a garbage checkpoint",
    "prove on a corrupt ledger",
    "verify-proof without a key",
    "verify-proof of a missing file",
    "verify-proof of non-JSON",
    "verify-proof of an empty object",
    "verify-proof of a JSON list",
    "verify-proof of a JSON string",
    "verify-proof with a number as a proof",
    "verify-proof with proofs not a list",
    "verify-proof with a non-hex record",
    "consistency with a garbage note",
    "consistency with a missing note",
    "reconcile a missing file",
    "reconcile an empty ledger",
    "reconcile a corrupt ledger",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_is_one_line_without_traceback(world, tmp_path, case):
    cases = _error_cases(world, tmp_path)
    assert sorted(cases) == sorted(ERROR_CASES)
    args, needle = cases[case]
    fails(cli(*args), needle)


def test_usage_errors_are_clicks_short_message_without_traceback(world):
    for args in (
        ["ledger", "export", "--home", world.bravo, "--format", "xml"],
        ["ledger", "prove", "--home", world.bravo],
        ["ledger", "reconcile", world.ledger("alpha")],
    ):
        result = cli(*args)
        assert result.exit_code == 2 and type(result.exception) is SystemExit
        assert "Traceback" not in result.stderr and "Error:" in result.stderr
