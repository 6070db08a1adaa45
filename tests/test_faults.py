"""Seeded network faults between two real daemons.

alpha sends to bravo through tests/faultproxy.py; each run draws, from
`random.Random(seed)` alone, the files (sizes and contents) and one to three
fault plans that successive connections suffer (cut, flip, duplicate, stall
or slow, upstream, downstream or both). Whatever happens, a transfer is
either delivered bit-identical or still resuming: never `done` with other
bytes, never a damaged file in the inbox, never a ledger that fails to
verify; and once the faults stop, the transfer and a fresh one complete.

Eight seeds are fixed here, so CI is deterministic; `DOROTHY_SOAK=N` adds N
random seeds, shown in the test ids and the summary. A failure names its
seed: rerun it with `pytest tests/test_faults.py -k seed<N>`, or a soak seed
with `DOROTHY_SEEDS=<N> pytest tests/test_faults.py -k replay`. Status is read from the control socket with the
CLI's own client (a CLI process per poll would cost half a CPU-second);
everything else goes through the `dorothy` CLI.

The pair of daemons is shared by the tests of a module while it stays
healthy; a test that fails leaves it dirty, and the next test builds a
fresh pair.
"""

import contextlib
import hashlib
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from dorothy.cli.client import ClientError, call
from dorothy.cli.localnodes import LocalNode, dorothy, pair, poll
from dorothy.protocol.compression import compress_if_smaller

from faultproxy import Faults, FaultProxy, ProxyThread

MiB = 1 << 20
KiB = 1 << 10
# A stall is only noticed by the idle timeout: keep it short so a run takes
# seconds. Retries are fast for the same reason.
IDLE_TIMEOUT = 2
CONFIG = {
    "retry": {"initial_seconds": 0.05, "max_seconds": 0.5},
    "network": {"idle_timeout_seconds": IDLE_TIMEOUT},
    "transfer": {"chunk_size": 65536},
}
# dorothyd/channel.py: the handshake has its own fixed deadline, so a stall
# during the handshake costs this long whatever IDLE_TIMEOUT is.
HANDSHAKE_TIMEOUT = 10
# A connection on which nothing moves for longer than this is stuck: every
# wait in the daemon is bounded by the handshake or the idle timeout.
STUCK_AFTER = HANDSHAKE_TIMEOUT + IDLE_TIMEOUT + 4
# Bytes a transfer sends downstream in all (message 2, accept, receipt with
# its checkpoint, close): where a downstream fault can land.
DOWNSTREAM_SPAN = 1000
FINAL = ("done", "failed", "cancelled")
RESUMING = ("queued", "active", "waiting")

# Chosen so that every fault kind fires at least once in each direction
# (see the summary printed at the end of the module).
SEEDS = [3, 10, 11, 13, 14, 17, 18, 22]


def seed_params(fixed: list[int]) -> list:
    """The fixed seeds; plus N fresh random ones with DOROTHY_SOAK=N (shown
    in the test ids and printed), and any given as DOROTHY_SEEDS=1,2,3 (to
    replay a soak seed that failed)."""
    count = int(os.environ.get("DOROTHY_SOAK", "0") or 0)
    fresh = random.SystemRandom()
    soak = [fresh.randrange(1 << 32) for _ in range(count)]
    replay = [int(s) for s in os.environ.get("DOROTHY_SEEDS", "").replace(",", " ").split()]
    if soak:
        print(f"DOROTHY_SOAK: extra seeds {soak}")
    return (
        [pytest.param(s, id=f"seed{s}") for s in fixed]
        + [pytest.param(s, id=f"soak{s}") for s in soak]
        + [pytest.param(s, id=f"replay{s}") for s in replay]
    )


def transfer(node: LocalNode, transfer_id: str) -> dict | None:
    """The daemon's view of a transfer; None if it is down or has no such transfer yet."""
    try:
        return call(node.home, {"op": "status", "id": transfer_id}, timeout=10)["transfer"]
    except ClientError:
        return None


def state(node: LocalNode, transfer_id: str) -> str | None:
    t = transfer(node, transfer_id)
    return t and t["state"]


# --- seeded data -------------------------------------------------------------


def make_files(rng: random.Random, folder: Path, low: int, high: int, compressible: float = 0.5) -> dict[str, Path]:
    """1-4 files totalling low..high bytes (one may be empty): incompressible
    images, or with probability `compressible` repetitive logs in a
    subfolder, which zstd shrinks. Returns {path in the transfer: source}."""
    count = rng.randint(1, 4)
    total = rng.randint(low, high)
    cuts = sorted(rng.randrange(total + 1) for _ in range(count - 1))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    files = {}
    for index, size in enumerate(sizes):
        if rng.random() >= compressible:
            data = rng.randbytes(size)
            rel = f"disk{index}.img"
        else:  # compressible: zstd makes these chunks smaller on the wire
            unit = rng.randbytes(rng.randint(16, 4096))
            data = (unit * (size // len(unit) + 1))[:size]
            rel = f"logs/part{index}.log"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[f"{folder.name}/{rel}"] = path
    return files


def wire_bytes(files: dict[str, Path], chunk_size: int = CONFIG["transfer"]["chunk_size"]) -> int:
    """About how many bytes the transfer sends upstream: each chunk as the
    sender will (compressed where that is smaller, dorothy.protocol.compression),
    plus framing, and the handshake and manifest. Upstream faults land in this span."""
    total = 2 * KiB
    for source in files.values():
        data = source.read_bytes()
        for offset in range(0, len(data), chunk_size):
            total += len(compress_if_smaller(data[offset : offset + chunk_size])[1]) + 64
    return total


def draw_plan(rng: random.Random, upstream_span: int) -> tuple[Faults | None, Faults | None]:
    """One connection's faults: upstream (the data), downstream (handshake
    answer, accept, receipt) or both."""
    where = rng.choice(["up", "up", "down", "both"])
    up = Faults.random(rng, upstream_span) if where in ("up", "both") else None
    down = Faults.random(rng, DOWNSTREAM_SPAN) if where in ("down", "both") else None
    return up, down


def describe(faults: Faults | None) -> str | None:
    if faults is None or faults == Faults():
        return None
    if faults.cut_at is not None:
        return f"cut@{faults.cut_at}"
    if faults.stall_at is not None:
        return f"stall@{faults.stall_at}"
    if faults.flip_at:
        return f"flip@{faults.flip_at[0]}"
    if faults.duplicate_at:
        return f"duplicate@{faults.duplicate_at[0]}"
    return f"slow({faults.rate:.0e}B/s,{faults.delay * 1000:.0f}ms)"


def kind(faults: Faults | None) -> str | None:
    text = describe(faults)
    return text and text.split("@")[0].split("(")[0]


# --- the pair of daemons -----------------------------------------------------


class Link:
    """alpha and bravo, alpha's route to bravo through a FaultProxy."""

    def __init__(self, root: Path):
        self.root = root
        self.generation = 0
        self.dirty = True
        self.alpha = self.bravo = self.proxy = self._thread = None
        self.sent: dict[str, dict[str, Path]] = {}  # transfer id -> {path: source}, every transfer sent

    def _build(self) -> None:
        self.close()
        self.generation += 1
        self.sent = {}
        self.alpha, self.bravo = pair(self.root / f"pair{self.generation}", "alpha", "bravo")
        for node in (self.alpha, self.bravo):
            node.configure(**CONFIG)
        self.proxy = FaultProxy((self.bravo.host, self.bravo.port), host="127.0.0.1")
        self._thread = ProxyThread(self.proxy)
        self._thread.__enter__()
        self.alpha.run("peer", "remove", "bravo")
        self.alpha.run("peer", "add", "bravo", f"127.0.0.1:{self.proxy.port}", self.bravo.node_key())
        self.alpha.start()
        self.bravo.start()

    def begin(self) -> None:
        """Ready for a test: a fresh pair if the last test failed, both daemons
        up, no faults planned. The test calls `end()` when it passes."""
        if self.dirty:
            self._build()
        for node in (self.alpha, self.bravo):
            if node.process is None or node.process.poll() is not None:
                node.process = None
                node.start()
        self.proxy.queued.clear()
        self.proxy.plan()
        self.dirty = True

    def end(self) -> None:
        self.dirty = False

    def close(self) -> None:
        for node in (self.alpha, self.bravo):
            if node is not None:
                node.stop()
        if self._thread is not None:
            self._thread.__exit__(None, None, None)
            self._thread = None

    def check_alive(self, tag: str) -> None:
        """Neither daemon died on its own (a crash, say a segfault, would
        otherwise pass for a slow transfer)."""
        for node in (self.alpha, self.bravo):
            code = node.process.poll() if node.process is not None else "not started"
            assert code is None, f"{tag}: dorothyd {node.name} died (exit {code}): {node.log_path.read_text()[-1500:]}"

    def logs(self) -> str:
        return f"logs: {self.alpha.log_path} {self.bravo.log_path}"

    def send(self, folder: Path, files: dict[str, Path]) -> str:
        transfer_id = json.loads(self.alpha.run("send", "bravo", folder, "--json").stdout)["id"]
        self.sent[transfer_id] = files
        return transfer_id

    # -- the properties ------------------------------------------------------

    def check_inbox(self, tag: str, *, settled: bool) -> None:
        """Every entry in bravo's inbox, at any time, is a transfer folder we
        sent, with exactly its files, each bit-identical to its source.
        `settled`: every transfer has ended, so every transfer bravo calls
        done is there."""
        inbox = self.bravo.home / "inbox" / "alpha"
        names = sorted(os.listdir(inbox)) if inbox.is_dir() else []
        for name in names:
            assert name in self.sent, f"{tag}: bravo's inbox holds {name}, which alpha never sent"
            folder = inbox / name
            found = {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()}
            assert found == set(self.sent[name]), f"{tag}: inbox/alpha/{name} holds {sorted(found)}"
            for rel, source in self.sent[name].items():
                got = (folder / rel).read_bytes()
                want = source.read_bytes()
                assert got == want, (
                    f"{tag}: inbox/alpha/{name}/{rel} differs from its source"
                    f" ({len(got)} bytes, sha256 {hashlib.sha256(got).hexdigest()[:16]}"
                    f" vs {len(want)} bytes, {hashlib.sha256(want).hexdigest()[:16]})"
                )
        if settled:
            done = {tid for tid in self.sent if state(self.bravo, tid) == "done"}
            assert set(names) == done, f"{tag}: inbox holds {names}, bravo has done {sorted(done)}"
            for tid in done:
                assert not (self.bravo.home / "partial" / tid).exists(), f"{tag}: partial/{tid} left behind"

    def check_states(self, tag: str, transfer_id: str) -> tuple[str, str | None]:
        """Mid-run: delivered, or still resuming; never given up on."""
        sent, got = transfer(self.alpha, transfer_id), transfer(self.bravo, transfer_id)
        assert sent is not None, f"{tag}: alpha does not know transfer {transfer_id}"
        assert sent["state"] in ("done", *RESUMING), f"{tag}: alpha's transfer is {sent['state']}: {sent['error']}"
        if got is not None:
            assert got["state"] in ("done", *RESUMING), f"{tag}: bravo's transfer is {got['state']}: {got['error']}"
        if sent["state"] == "done":
            assert got is not None and got["state"] == "done", f"{tag}: alpha holds a receipt, bravo is {got}"
        if got is not None and got["state"] == "done":
            self.check_inbox(tag, settled=False)
        return sent["state"], got and got["state"]

    def wait_done(self, tag: str, transfer_id: str, deadline: float = 60) -> None:
        def both_done():
            self.check_alive(tag)
            sent, got = state(self.alpha, transfer_id), state(self.bravo, transfer_id)
            for who, s in (("alpha", sent), ("bravo", got)):
                assert s not in ("failed", "cancelled"), (
                    f"{tag}: {who} gave up on {transfer_id}: {transfer(getattr(self, who), transfer_id)['error']}"
                )
            return sent == got == "done"

        poll(both_done, deadline, f"{tag}: transfer {transfer_id} done on both nodes ({self.logs()})")
        sent, got = transfer(self.alpha, transfer_id), transfer(self.bravo, transfer_id)
        expected = {rel: hashlib.sha256(src.read_bytes()).hexdigest() for rel, src in self.sent[transfer_id].items()}
        for who, t in (("alpha", sent), ("bravo", got)):
            assert {f["path"]: f["sha256"] for f in t["files"]} == expected, f"{tag}: {who}'s hashes"
            assert t["bytes_done"] == t["bytes_total"], f"{tag}: {who}: {t['bytes_done']} of {t['bytes_total']}"

    def check_ledgers(self, tag: str, *, reconcile: bool = True) -> None:
        self.check_alive(tag)
        for node in (self.alpha, self.bravo):
            result = node.run("ledger", "verify", check=False)
            assert result.returncode == 0, f"{tag}: {node.name}'s ledger: {result.stderr.strip()}"
        if reconcile:
            ledgers = [n.home / "ledger" / "ledger.bin" for n in (self.alpha, self.bravo)]
            result = dorothy("ledger", "reconcile", *ledgers, check=False)
            assert result.returncode == 0, f"{tag}: ledgers do not reconcile: {result.stdout.strip()}"


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    shared = Link(tmp_path_factory.mktemp("link"))
    yield shared
    shared.close()


OUTCOMES: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    if not OUTCOMES:
        return
    planned, fired = Counter(), Counter()
    for outcome in OUTCOMES:
        planned.update(outcome["planned"])
        fired.update(outcome["fired"])
    during = sum(o["completed_in_faults"] for o in OUTCOMES)
    lines = [
        f"fault runs: {len(OUTCOMES)} (seeds {[o['seed'] for o in OUTCOMES]})",
        f"  planned faults: {dict(sorted(planned.items()))}",
        f"  faults that fired: {dict(sorted(fired.items()))}",
        f"  completed while faults were planned: {during}; after they were lifted: {len(OUTCOMES) - during}",
    ]
    lines += [
        f"  seed {o['seed']}: {o['plans']} fired {o['fired_by_connection']} connections {o['connections']}"
        f" {'done in faulty phase' if o['completed_in_faults'] else 'done after'} in {o['seconds']:.1f}s"
        for o in OUTCOMES
    ]
    show(request, lines)


def show(request, lines: list[str]) -> None:
    """Print past pytest's output capture, so a normal run shows it too."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines))


# --- the tests ---------------------------------------------------------------


@pytest.mark.parametrize("seed", seed_params(SEEDS))
def test_seeded_faults_never_deliver_wrong_bytes(link, seed, tmp_path):
    started = time.monotonic()
    rng = random.Random(seed)
    files = make_files(rng, tmp_path / "case", 1 * MiB, 6 * MiB)
    plans = [draw_plan(rng, wire_bytes(files)) for _ in range(rng.randint(1, 3))]
    second = make_files(rng, tmp_path / "more", 1, 256 * KiB)
    shown = [" & ".join(f"{d}:{describe(f)}" for d, f in zip(("up", "down"), p) if describe(f)) for p in plans]
    tag = f"seed {seed} (plans {shown})"
    print(tag)

    link.begin()
    proxy = link.proxy
    before = proxy.connections
    proxy.plan_each(plans)
    transfer_id = link.send(tmp_path / "case", files)
    tag += f" transfer {transfer_id}"

    # The faulty phase: until the transfer is done or every planned
    # connection has been used and a clean one has opened.
    watch = {"moved": time.monotonic(), "last": None}

    def faulty_phase_over():
        link.check_alive(tag)
        sent = transfer(link.alpha, transfer_id)
        assert sent is None or sent["state"] not in ("failed", "cancelled"), f"{tag}: alpha gave up: {sent['error']}"
        if sent is not None and sent["state"] == "done":
            return True
        if proxy.connections - before > len(plans):
            return True
        current = proxy.history[-1] if proxy.connections > before else None
        progress = (proxy.connections, current and dict(current.passed), sent and sent["state"])
        if progress != watch["last"]:
            watch["moved"], watch["last"] = time.monotonic(), progress
        elif current and sent and sent["state"] == "active" and time.monotonic() - watch["moved"] > STUCK_AFTER:
            raise AssertionError(
                f"{tag}: alpha has held connection {current.number - before} in 'active' for"
                f" {STUCK_AFTER}s with no byte moving either way (faults fired: {current.fired});"
                f" bravo: {state(link.bravo, transfer_id)}. (Is the sender blocked writing to a peer"
                f" that stopped reading? See test_sender_gives_up_on_a_receiver_that_stops_reading.)"
                f" {link.logs()}"
            )
        return False

    poll(faulty_phase_over, len(plans) * (STUCK_AFTER + 10) + 20, f"{tag}: end of the faulty phase")
    mine = [c for c in proxy.history if c.number > before]
    fired = [c.fired for c in mine[: len(plans)]]
    completed_in_faults = link.check_states(tag, transfer_id)[0] == "done"
    link.check_inbox(tag, settled=False)

    # The faults are lifted: the transfer must complete, and so must a new one.
    proxy.plan()
    link.wait_done(tag, transfer_id)
    link.check_inbox(tag, settled=True)
    again = link.send(tmp_path / "more", second)
    link.wait_done(tag + f", second transfer {again}", again, deadline=30)
    link.check_inbox(tag, settled=True)
    link.check_ledgers(tag)
    link.end()

    OUTCOMES.append(
        {
            "seed": seed,
            "plans": shown,
            "planned": [f"{d} {kind(f)}" for p in plans for d, f in zip(("up", "down"), p) if kind(f)],
            "fired": [event for events in fired for event in events],
            "fired_by_connection": fired,
            "connections": len(mine),
            "completed_in_faults": completed_in_faults,
            "seconds": time.monotonic() - started,
        }
    )


def test_sender_gives_up_on_a_receiver_that_stops_reading(link, tmp_path):
    """A peer that stops reading (frozen, or a stalled path that keeps the
    socket open) must not hold a transfer in `active` for ever: after the
    idle timeout the sender drops the connection and retries."""
    link.begin()
    rng = random.Random(0)
    source = tmp_path / "case" / "image.dd"
    source.parent.mkdir()
    source.write_bytes(rng.randbytes(4 * MiB))
    before = link.proxy.connections
    link.proxy.plan_each([(Faults(stall_at=256 * KiB), None)])
    transfer_id = link.send(tmp_path / "case", {"case/image.dd": source})
    stall = poll(
        lambda: next((c for c in link.proxy.history[before:] if "up stall" in c.fired), None), 20, "the stall upstream"
    )
    poll(
        lambda: state(link.alpha, transfer_id) != "active" or link.proxy.connections > stall.number,
        IDLE_TIMEOUT + 8,
        f"alpha dropping the connection {IDLE_TIMEOUT}s (idle_timeout_seconds) after its peer stopped"
        f" reading, as bravo did ({link.logs()})",
    )
    link.wait_done("stalled peer", transfer_id)
    link.check_inbox("stalled peer", settled=True)
    link.end()
