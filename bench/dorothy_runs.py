"""Dorothy's side: two real daemons on loopback, driven through the CLI.

alpha (127.0.0.1) sends, bravo (127.0.0.2) receives. A timed run is one
`dorothy send --wait` from start to exit, which is when alpha holds
bravo's verified, signed receipt. Both daemons stay up across runs; each
run's peak RSS is VmHWM (rewound before the run, see measure.reset_peak)
and its CPU the delta of utime + stime.
"""

import errno
import json
import re
import shutil
import sqlite3
import sys
import threading
import time
from pathlib import Path

from dorothy.cli.client import ClientError, call
from dorothy.cli.localnodes import LocalNode, pair, poll

from .data import tree_size
from .link import Faults, FaultProxy, ProxyThread, link_faults
from .measure import MiB, Group, io_counters, run_command

# For the fault scenarios only: reconnect within 0.05-0.5 s (the default
# backoff starts at up to 2 s), so the figures show Dorothy's resume and
# not the retry schedule. The throughput pair keeps every default.
FAST_RETRY = {"initial_seconds": 0.05, "max_seconds": 0.5}
POLL = 0.005  # how often the bench looks at a proxy's counters
STATUS_POLL = 0.02  # and asks a daemon for a transfer's progress
DONE_POLL = 0.1  # or only whether it finished


class Pair:
    """Fresh homes under WORK/nodes/<label>; both daemons running inside `with`."""

    def __init__(self, work: Path, label: str, **config):
        self.root = work / "nodes" / label
        self.config = config

    def __enter__(self) -> "Pair":
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.alpha, self.bravo = pair(self.root, "alpha", "bravo")
        for node in (self.alpha, self.bravo):
            if self.config:
                node.configure(**self.config)
            node.start()
        return self

    def __exit__(self, *exc) -> None:
        for node in (self.alpha, self.bravo):
            node.stop()

    def route_via(self, port: int) -> None:
        """alpha reaches bravo through a proxy on 127.0.0.1:port."""
        self.alpha.run("peer", "remove", "bravo")
        self.alpha.run("peer", "add", "bravo", f"127.0.0.1:{port}", self.bravo.node_key())

    def groups(self) -> dict[str, Group]:
        return {
            "sender": Group(self.alpha.process.pid, track_peak=True),
            "receiver": Group(self.bravo.process.pid, track_peak=True),
        }

    def send_command(self, path: Path, wait: bool = True) -> list[str]:
        cmd = [sys.executable, "-m", "dorothy.cli", "send", "bravo", str(path), "--json", "--home", str(self.alpha.home)]
        return cmd + (["--wait"] if wait else [])

    def inbox(self, transfer_id: str) -> Path:
        return self.bravo.home / "inbox" / "alpha" / transfer_id

    def transfer(self, node: LocalNode, transfer_id: str) -> dict | None:
        try:
            return call(node.home, {"op": "status", "id": transfer_id})["transfer"]
        except ClientError:
            return None

    def timed_send(self, path: Path, keep_in: Path | None = None) -> dict:
        """One measured `dorothy send --wait`; the received copy is then
        moved into `keep_in` (for the caller to delete later) or removed."""
        result = run_command(self.send_command(path), self.groups(), client="cli")
        transfer_id = None
        if result["rc"] == 0:
            transfer_id = json.loads(result["stdout"])["id"]
            received = self.inbox(transfer_id) / path.name
            result["received"] = tree_size(received) if received.is_dir() else (1, received.stat().st_size)
            if keep_in is not None:
                try:
                    self.inbox(transfer_id).rename(keep_in / transfer_id)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    print(f"note: {keep_in} is on another file system than the inbox: deleting the copy now", file=sys.stderr)
                    keep_in = None
            if keep_in is None:
                shutil.rmtree(self.inbox(transfer_id), ignore_errors=True)
        result["transfer_id"] = transfer_id
        return result


class ProxyMonitor(threading.Thread):
    """Samples a proxy's counters every POLL seconds: (t, connections, up, down)."""

    def __init__(self, proxy: FaultProxy, on_sample=None):
        super().__init__(daemon=True)
        self.proxy = proxy
        self.samples: list[tuple[float, int, int, int]] = []
        self.on_sample = on_sample
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            sample = (time.perf_counter(), self.proxy.connections, self.proxy.up.passed, self.proxy.down.passed)
            self.samples.append(sample)
            if self.on_sample:
                self.on_sample(sample)
            self._halt.wait(POLL)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def first(self, predicate):
        return next((s for s in self.samples if predicate(s)), None)


def resume_after_cut(work: Path, path: Path, log) -> dict:
    """Cut alpha's first connection once half the file passed upward; the
    sender reconnects and finishes. Re-sent = bytes up in total - file size.
    What each daemon read() (/proc/PID/io rchar; sockets do not count): the
    sender, the file once plus what was in flight at the cut; the receiver,
    none of its held chunks again (its state db and ledger, a little)."""
    size = path.stat().st_size
    with Pair(work, "resume-cut", retry=FAST_RETRY) as nodes:
        proxy = FaultProxy((nodes.bravo.host, nodes.bravo.port))
        with ProxyThread(proxy):
            nodes.route_via(proxy.port)
            proxy.plan(up=Faults(cut_at=size // 2))

            def clear_after_first(sample):
                if sample[1] >= 1 and proxy.up.faults.cut_at is not None:
                    proxy.plan()  # the first connection keeps its plan; later ones run clean

            monitor = ProxyMonitor(proxy, clear_after_first)
            monitor.start()
            read_before = io_counters(nodes.alpha.process.pid).get("rchar", 0)
            receiver_read_before = io_counters(nodes.bravo.process.pid).get("rchar", 0)
            run = run_command(nodes.send_command(path), nodes.groups(), client="cli")
            monitor.stop()
            read_after = io_counters(nodes.alpha.process.pid).get("rchar", 0)
            receiver_read = io_counters(nodes.bravo.process.pid).get("rchar", 0) - receiver_read_before
            start = monitor.samples[0][0]
            reconnect = monitor.first(lambda s: s[1] >= 2)
            up_at_reconnect = reconnect[2] if reconnect else None
            result = {
                "ok": run["rc"] == 0,
                "size": size,
                "cut_at": size // 2,
                "connections": proxy.connections,
                "wall_s": run["wall_s"],
                "up_bytes_total": proxy.up.passed,
                "resent_bytes": proxy.up.passed - size,
                "reconnect_after_s": round(reconnect[0] - start, 2) if reconnect else None,
                "after_reconnect_s": round(start + run["wall_s"] - reconnect[0], 2) if reconnect else None,
                "up_bytes_before_reconnect": up_at_reconnect,
                "sender_read_bytes": read_after - read_before,
                "receiver_read_bytes": receiver_read,
                "cpu_s": run["cpu_s"],
            }
            if run["rc"] != 0:
                result["stderr"] = run["stderr"][-500:]
    log(
        f"  resume after cut: {result['wall_s']:.2f}s, re-sent {result['resent_bytes'] / MiB:.2f} MiB, "
        f"sender read {result['sender_read_bytes'] / MiB:.0f} MiB for a {size / MiB:.0f} MiB file, "
        f"receiver read {result['receiver_read_bytes'] / MiB:.1f} MiB, ok={result['ok']}"
    )
    return result


def _durable_bytes(node: LocalNode, transfer_id: str) -> int | None:
    """bytes_done in a stopped node's state db: what its held chunks add up to."""
    try:
        db = sqlite3.connect(f"file:{node.home / 'state.db'}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT bytes_done FROM transfers WHERE id = ?", (transfer_id,)).fetchone()
        finally:
            db.close()
        return row[0] if row else None
    except sqlite3.Error:
        return None


def resume_after_restart(work: Path, path: Path, log, deadline: float = 1800.0) -> dict:
    """SIGKILL bravo once half the file is durable there, start it again,
    and time what the restart costs: bravo re-reads every held chunk (its
    check compared, SHA-256 prefix rebuilt) before it answers the offer."""
    size = path.stat().st_size
    with Pair(work, "resume-restart", retry=FAST_RETRY) as nodes:
        proxy = FaultProxy((nodes.bravo.host, nodes.bravo.port))
        with ProxyThread(proxy):
            nodes.route_via(proxy.port)
            started = time.perf_counter()
            transfer_id = json.loads(nodes.alpha.run("send", "bravo", path, "--json").stdout)["id"]
            poll(
                lambda: (t := nodes.transfer(nodes.bravo, transfer_id)) and t["bytes_done"] >= size // 2,
                deadline, "half the file durable at the receiver", interval=STATUS_POLL,
            )
            alpha_pid = nodes.alpha.process.pid
            killed_at = time.perf_counter()
            nodes.bravo.kill()
            sender_read_at_kill = io_counters(alpha_pid).get("rchar", 0)
            up_at_kill = proxy.up.passed
            durable = _durable_bytes(nodes.bravo, transfer_id)
            nodes.bravo.start()
            ready_at = time.perf_counter()
            resumed = _watch_resume(nodes, proxy, transfer_id, size - (durable or size // 2), deadline)
            finished = time.perf_counter()
            sender_read = io_counters(alpha_pid).get("rchar", 0) - sender_read_at_kill
            received = nodes.inbox(transfer_id) / path.name
            ok = resumed["state"] == "done" and received.exists() and received.stat().st_size == size
    reverified = _reverified(nodes.bravo, transfer_id)
    result = {
        "ok": ok,
        "size": size,
        "durable_at_kill": durable,
        "up_bytes_at_kill": up_at_kill,
        "resent_bytes": proxy.up.passed - size,
        "wall_s": round(finished - started, 2),
        "kill_to_done_s": round(finished - killed_at, 2),
        "kill_to_daemon_ready_s": round(ready_at - killed_at, 2),
        # what bravo's log says re-verifying its held chunks read and took
        # (before it answers the offer); else, seen on the link, from the
        # resumed connection's first bytes to chunk data flowing
        "reverified_bytes": reverified and reverified[0],
        "restart_cost_s": (reverified and reverified[1]) or resumed["restart_cost_s"],
        # everything bravo read from its start until chunk data flowed again:
        # its held chunks, state db and ledger, and its own Python modules
        "receiver_read_bytes_before_flowing": resumed["receiver_read_bytes"],
        # of which from storage rather than the page cache (/proc/PID/io read_bytes)
        "receiver_disk_read_bytes_before_flowing": resumed["receiver_disk_read_bytes"],
        "sender_read_bytes_after_kill": sender_read,
    }
    cost = "nothing was left to send"
    if result["restart_cost_s"] is not None:
        cost = f"restart cost {result['restart_cost_s']}s"
        if reverified:
            cost += f" re-verifying {reverified[0] / MiB:.0f} MiB"
    log(
        f"  resume after receiver restart: durable {(durable or 0) / MiB:.0f} MiB at kill, {cost}, "
        f"re-sent {result['resent_bytes'] / MiB:.1f} MiB, kill to done {result['kill_to_done_s']}s, ok={ok}"
    )
    return result


def _reverified(node, transfer_id: str) -> tuple[int, float] | None:
    """(bytes, seconds) of the last 're-verified N held chunks, B bytes, in
    S s' that node logged for the transfer."""
    pattern = rf"transfer {transfer_id}: re-verified \d+ held chunks, (\d+) bytes, in ([0-9.]+) s"
    found = re.findall(pattern, node.log_path.read_text())
    return (int(found[-1][0]), float(found[-1][1])) if found else None


def _watch_resume(nodes: Pair, proxy: FaultProxy, transfer_id: str, remaining: int, deadline: float) -> dict:
    """After bravo's restart, until alpha reports the transfer final: when
    the resumed connection's first bytes pass the proxy, when chunk data
    flows again (half the remainder, at most 1 MiB, more up), and how much
    bravo had read() by then (/proc/PID/io rchar; read_bytes: what came
    from storage). Counted from bravo's start, not from its readiness: the
    sender may reconnect, and bravo start re-reading, before a first
    sample here (one run's count had missed 48 MiB that way)."""
    pid = nodes.bravo.process.pid
    up_at_ready = proxy.up.passed
    threshold = up_at_ready + max(1, min(MiB, remaining // 2))
    first_bytes = flowing = None
    end = time.perf_counter() + deadline
    next_status = 0.0
    while True:
        now, up = time.perf_counter(), proxy.up.passed
        if first_bytes is None and up > up_at_ready:
            first_bytes = now
        if flowing is None and up >= threshold:
            flowing, read_at_flowing = now, io_counters(pid)
        if now >= next_status:
            transfer = nodes.transfer(nodes.alpha, transfer_id)
            if transfer and transfer["state"] in ("done", "failed", "cancelled"):
                break
            next_status = now + DONE_POLL
        if now > end:
            raise TimeoutError(f"transfer {transfer_id} not finished within {deadline:.0f}s of the restart")
        time.sleep(POLL)
    return {
        "state": transfer["state"],
        "restart_cost_s": round(flowing - first_bytes, 2) if flowing and first_bytes else None,
        "receiver_read_bytes": read_at_flowing.get("rchar") if flowing else None,
        "receiver_disk_read_bytes": read_at_flowing.get("read_bytes") if flowing else None,
    }


def rate_limited(work: Path, path: Path, mbit: float, delay_ms: float, log) -> dict:
    """One timed send through a rate-limited link in front of bravo (both directions)."""
    with Pair(work, "ratelimited") as nodes:
        link = FaultProxy((nodes.bravo.host, nodes.bravo.port))
        with ProxyThread(link):
            link.plan(up=link_faults(mbit, delay_ms), down=link_faults(mbit, delay_ms))
            nodes.route_via(link.port)
            run = nodes.timed_send(path)
            run["wire_up_bytes"] = link.up.passed
    return run
