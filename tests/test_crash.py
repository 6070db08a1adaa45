"""Crashes: SIGKILL a daemon in the middle of transfers, and a ledger whose
last append was torn.

The kills are seeded like tests/test_faults.py (same pair of daemons, same
checks, `DOROTHY_SOAK=N` for N extra seeds): the files, the link's rate, the
number of kills and each kill's moment (after a random share of the data is
durable at the receiver, or a random delay) all come from
`random.Random(seed)`. The link is throttled through the proxy so that
there is a window to kill in; the throttle is lifted once the kills are
over.

The ledger tests write what an interrupted append leaves (a prefix of the
next record's frame, or the zero-filled block some file systems leave) and
check that the node cuts it, records the cut and carries on; and that damage
anywhere else is refused, never cut away.
"""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from dorothy.cli.localnodes import LocalNode
from dorothy.dorothyd.ledger import Ledger
from dorothy.dorothyd.clock import utc_now
from dorothy.keys.identity import NodeIdentity

from faultproxy import Faults
from test_faults import CONFIG, KiB, MiB, link, make_files, poll, seed_params, show, state, transfer  # noqa: F401

CASES = [(101, "receiver"), (102, "receiver"), (103, "receiver"), (201, "sender"), (202, "sender"), (203, "sender")]
KILLS: list[dict] = []


def crash_params() -> list:
    """The fixed cases, then soak and replayed seeds (see test_faults.seed_params),
    whose victim is the receiver for even seeds and the sender for odd ones."""
    fixed = [pytest.param(seed, victim, id=f"seed{seed}-{victim}") for seed, victim in CASES]
    more = [pytest.param(p.values[0], ("receiver", "sender")[p.values[0] % 2], id=p.id) for p in seed_params([])]
    return fixed + more


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    if KILLS:
        lines = [f"crash runs: {len(KILLS)}"]
        lines += [
            f"  seed {k['seed']} ({k['victim']}): {k['moments']}; {k['transfers']} transfer(s), {k['seconds']:.1f}s"
            for k in KILLS
        ]
        show(request, lines)


@pytest.mark.parametrize("seed,victim", crash_params())
def test_sigkill_mid_transfer_resumes_bit_identical(link, seed, victim, tmp_path):
    started = time.monotonic()
    rng = random.Random(seed)
    folders = [tmp_path / f"case{n}" for n in range(rng.choice([1, 1, 2]))]
    # Incompressible, so the throttle holds: received chunks become durable
    # (and show in status) about once a second (dorothyd/receiving.py
    # FLUSH_SECONDS), and a slow link leaves several such moments to kill between.
    batches = [make_files(rng, folder, 2 * MiB, 5 * MiB, compressible=0) for folder in folders]
    rate = rng.choice([1.0, 1.5, 2.0]) * MiB
    kills = rng.choice([1, 1, 2])
    tag = f"seed {seed} (kill the {victim} {kills}x, link {rate / MiB:.1f} MiB/s)"

    link.begin()
    node = link.bravo if victim == "receiver" else link.alpha
    link.proxy.plan(up=Faults(rate=rate))
    ids = [link.send(folder, files) for folder, files in zip(folders, batches)]
    first = ids[0]
    total = transfer(link.alpha, first)["bytes_total"]
    tag += f" transfers {ids}"
    moments = []
    for _ in range(kills):
        received = lambda: (transfer(link.bravo, first) or {"bytes_done": 0})["bytes_done"]  # noqa: E731
        if rng.random() < 0.5:
            start = received()
            target = start + int(rng.uniform(0.05, 0.8) * (total - start))
            moment = f"after {target / total:.0%} durable at bravo"
            poll(
                lambda: received() >= target or state(link.alpha, first) == "done",
                60,
                f"{tag}: {target} bytes durable at bravo",
            )
        else:
            delay = rng.uniform(0.0, 1.5)
            moment = f"{delay:.2f}s into the attempt"
            poll(lambda: state(link.alpha, first) in ("active", "done"), 30, f"{tag}: alpha at work")
            since = time.monotonic()
            poll(lambda: state(link.alpha, first) and time.monotonic() - since >= delay, 30, f"{tag}: {moment}")
        durable = received()
        node.kill()
        moments.append(f"{moment} ({durable} of {total} bytes held)")
        node.start()
        if victim == "receiver":
            # What bravo reported held before the kill was fsync'd and committed.
            after = (transfer(link.bravo, first) or {"bytes_done": 0})["bytes_done"]
            assert after >= durable, f"{tag}: bravo held {durable} bytes before SIGKILL and {after} after"
        for tid in ids:
            link.check_states(tag, tid)
        link.check_inbox(tag, settled=False)

    link.proxy.plan()
    for tid in ids:
        link.wait_done(tag, tid)
    link.check_inbox(tag, settled=True)
    link.check_ledgers(tag)
    link.end()
    KILLS.append(
        {"seed": seed, "victim": victim, "moments": moments, "transfers": len(ids), "seconds": time.monotonic() - started}
    )


# --- the ledger after a crash ----------------------------------------------


def ledger_file(node: LocalNode):
    return node.home / "ledger" / "ledger.bin"


def next_frame(node: LocalNode) -> bytes:
    """The exact bytes the node's next append would write (a signed, chained
    `daemon_stopped` record), without leaving them in the file. The node must
    be stopped."""
    path = ledger_file(node)
    end = path.stat().st_size
    identity = NodeIdentity.load(node.home / "node.key")
    with Ledger.open(path.parent, identity, now=utc_now) as ledger:
        ledger.append("daemon_stopped", {})
    frame = path.read_bytes()[end:]
    os.truncate(path, end)
    return frame


def records(node: LocalNode) -> list[dict]:
    return json.loads(node.run("ledger", "show", "--json").stdout)


def small_transfer(link, tmp_path, tag: str) -> str:
    folder = tmp_path / "after"
    files = make_files(random.Random(tag), folder, 1, 200 * KiB)
    tid = link.send(folder, files)
    link.wait_done(tag, tid, deadline=30)
    return tid


TORN = [
    pytest.param("bravo", "length", id="bravo-2-bytes-of-a-length-prefix"),
    pytest.param("alpha", "prefix", id="alpha-a-prefix-of-the-next-frame"),
    pytest.param("bravo", "all-but-one", id="bravo-all-but-the-last-byte"),
    pytest.param("alpha", "zeros", id="alpha-a-zero-filled-block"),
    # Killed during recovery itself: the torn bytes were copied to torn/ and
    # cut from ledger.bin, but the recovery record was never appended.
    pytest.param("bravo", "cut-unrecorded", id="bravo-cut-but-not-recorded"),
]


@pytest.mark.parametrize("who,torn", TORN)
def test_torn_ledger_tail_is_cut_recorded_and_the_node_carries_on(link, tmp_path, who, torn):
    tag = f"torn tail ({torn}) on {who}"
    link.begin()
    node = getattr(link, who)
    node.stop()
    path = ledger_file(node)
    frame = next_frame(node)
    rng = random.Random(tag)
    tail = {
        "length": frame[:2],
        "prefix": frame[: rng.randrange(4, len(frame) - 1)],
        "all-but-one": frame[:-1],
        "zeros": bytes(4096),
        "cut-unrecorded": frame[: len(frame) // 2],
    }[torn]
    kept = path.read_bytes()
    digest = hashlib.sha256(tail).hexdigest()
    kept_copy = path.parent / "torn" / f"{len(kept)}-{digest}.bin"
    if torn == "cut-unrecorded":
        kept_copy.parent.mkdir(mode=0o700, exist_ok=True)
        kept_copy.write_bytes(tail)
    else:
        with open(path, "ab") as f:
            f.write(tail)

    node.start()  # raises if the daemon exits
    verify = node.run("ledger", "verify", check=False)
    assert verify.returncode == 0, f"{tag}: {verify.stderr.strip()}"
    assert path.read_bytes().startswith(kept), f"{tag}: records before the torn tail changed"
    recoveries = [r for r in records(node) if r["event"] == "recovery" and r["fields"]["offset"] == len(kept)]
    assert len(recoveries) == 1, f"{tag}: recovery records at offset {len(kept)}: {recoveries}"
    fields = recoveries[0]["fields"]
    assert fields["dropped_bytes"] == len(tail) and fields["dropped_sha256"] == digest, f"{tag}: {fields}"
    assert fields["reason"], f"{tag}: a recovery record says why"
    assert kept_copy.read_bytes() == tail, f"{tag}: the cut bytes are kept in {kept_copy}"

    small_transfer(link, tmp_path, tag)
    link.check_inbox(tag, settled=True)
    link.check_ledgers(tag)
    link.end()


def copy_home(node: LocalNode, root) -> LocalNode:
    """A stopped copy of `node` (identity, trust store, ledger) on a new port."""
    copy = LocalNode(root, node.name)
    copy.home.mkdir(parents=True)
    for name in ("node.key", "peers.json"):
        shutil.copy2(node.home / name, copy.home / name)
    shutil.copytree(node.home / "ledger", copy.home / "ledger")
    copy.configure(**CONFIG)
    return copy


@pytest.mark.parametrize("damage", ["signature", "length"])
def test_damage_before_the_last_record_is_refused_not_cut(link, tmp_path, damage):
    """A record in the middle that fails is not a torn append: the daemon
    must refuse to start, with one line naming the ledger, and change
    nothing; `dorothy ledger verify` names the record."""
    link.begin()
    checkpoints = link.bravo.home / "ledger" / "checkpoints"
    if not checkpoints.is_dir():
        small_transfer(link, tmp_path, "a checkpoint to damage under")
    link.end()
    copy = copy_home(link.bravo, tmp_path / "copy")
    path = ledger_file(copy)
    listed = json.loads(copy.run("ledger", "show", "--json").stdout)
    signed = max(int(p.stem) for p in (copy.home / "ledger" / "checkpoints").glob("*.note"))
    seq = signed // 2  # a record the node's own signed checkpoint covers
    frames, offset = [], 0
    data = bytearray(path.read_bytes())
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        frames.append((offset, length))
        offset += 4 + length
    assert len(frames) == len(listed) >= signed > seq + 1
    start, length = frames[seq]
    if damage == "signature":
        data[start + 4 + length - 1] ^= 0x01  # the last byte of its Ed25519 signature
        reason = "bad signature"
    else:
        data[start] ^= 0x01  # its length grows by 16 MiB: the frame now "runs past the end"
        reason = "truncated record"
    path.write_bytes(bytes(data))
    tag = f"{damage} of record {seq} of {len(frames)} (the node signed a checkpoint of {signed})"

    verify = copy.run("ledger", "verify", check=False)
    assert verify.returncode == 1, f"{tag}: verify: {verify.stdout} {verify.stderr}"
    assert f"record {seq} (offset {start}): {reason}" in verify.stderr, f"{tag}: {verify.stderr.strip()}"

    torn_before = sorted(os.listdir(copy.home / "ledger" / "torn")) if (copy.home / "ledger" / "torn").is_dir() else []
    try:
        copy.start()
    except RuntimeError:
        if copy.process.poll() is None:  # neither serving nor gone
            copy.kill()
            pytest.fail(f"{tag}: dorothyd neither started nor exited: {copy.log_path.read_text()[-2000:]}")
        assert copy.stop() != 0, f"{tag}: dorothyd exited with status 0"
    else:
        copy.kill()
        after = copy.run("ledger", "verify", check=False)
        cut = [r["fields"] for r in records(copy) if r["event"] == "recovery" and r["fields"]["offset"] == start]
        pytest.fail(
            f"{tag}: dorothyd started anyway: it cut the ledger at offset {start} as a torn tail, dropping"
            f" {len(frames) - seq} acknowledged records that its own checkpoint of {signed} records covers"
            f" (recovery record: {cut}); the ledger now fails its own verification: {after.stderr.strip()}"
        )
    stderr = copy.log_path.read_text()
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == 1, f"{tag}: dorothyd's error is not one line:\n{stderr[-3000:]}"
    assert "ledger" in lines[0], f"{tag}: {lines[0]}"
    assert path.read_bytes() == bytes(data), f"{tag}: the refused ledger was changed"
    torn_after = sorted(os.listdir(copy.home / "ledger" / "torn")) if (copy.home / "ledger" / "torn").is_dir() else []
    assert torn_after == torn_before, f"{tag}: bytes were cut as a 'torn tail': {torn_after}"


# Four worker threads compressing chunks at once, as the daemon's sender does
# when it runs several outgoing transfers (dorothyd/sending.py, Outgoing._prepare,
# runs in trio worker threads; limits.max_active_total defaults to 8).
CONCURRENT_COMPRESSION = """
import random, sys, threading
from dorothy.protocol.compression import compress_if_smaller, decompress_exact
bad = []
def work(seed):
    rng = random.Random(seed)
    for i in range(1000):
        data = rng.randbytes(65536) if i % 2 else rng.randbytes(64) * 1024
        compressed, payload = compress_if_smaller(data)
        try:
            if (decompress_exact(payload, len(data)) if compressed else payload) != data:
                bad.append(f"chunk {i} of thread {seed} comes back different")
        except Exception as exc:
            bad.append(f"chunk {i} of thread {seed}: {exc}")
threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(bad), bad[:1])
sys.exit(1 if bad else 0)
"""


def test_chunks_compressed_on_concurrent_worker_threads_survive():
    """Concurrent outgoing transfers compress in several worker threads at
    once; that must neither crash the process nor send a damaged chunk (the
    receiver would fail the transfer for good with bad_chunk). Run in a child
    process, since the failure can be a segfault."""
    result = subprocess.run([sys.executable, "-c", CONCURRENT_COMPRESSION], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (
        f"exit {result.returncode} (-11 is SIGSEGV): {result.stdout.strip()} {result.stderr.strip()[-500:]}"
    )
