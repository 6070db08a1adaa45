"""Wall time, CPU seconds and peak RSS of process trees, read from /proc.

Adapted from /work/shared/peers/benchlib.py (see bench/README.md). A
`Watch` samples /proc every SAMPLE_SECONDS while something runs and keeps,
per named group of processes:

- the peak of the group's *summed* VmRSS over the samples;
- CPU seconds (utime + stime from /proc/PID/stat, last sample minus first;
  a process started during the window counts from zero, and one that exits
  loses at most one sampling interval);
- for long-lived processes (the daemons) the true peak, VmHWM, which
  `reset_peak` rewinds to the current RSS before a run.

It also records whole-machine busy CPU seconds (/proc/stat, minus the
sampler's own) and CPU used by processes outside every group: interference
from whatever else runs on the machine.
"""

import os
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass

CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
# 50 ms: short enough to catch an scp's peak, cheap enough (~2% of a core)
# not to disturb a 2-core machine.
SAMPLE_SECONDS = 0.05


def read_stat(pid: int) -> tuple[int, float, int, str] | None:
    """(ppid, CPU seconds, RSS bytes, command name), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    close = text.rfind(")")
    fields = text[close + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK
    return int(fields[1]), cpu, int(fields[21]) * PAGE, text[text.find("(") + 1 : close]


def status_bytes(pid: int, key: str) -> int | None:
    """A kB field of /proc/PID/status (VmRSS, VmHWM...) in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def io_counters(pid: int) -> dict[str, int]:
    """/proc/PID/io: rchar counts every read() and pread() (files and
    sockets, page cache or not); read_bytes only what came from storage."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f)}
    except OSError:
        return {}


def reset_peak(pid: int) -> bool:
    """Rewind VmHWM to the current RSS (Linux >= 4.0, same user or root)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _machine_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = list(map(int, f.readline().split()[1:]))
    return sum(values[:8]), values[3] + values[4]


def cpu_busy(interval: float) -> float:
    """Fraction (0..1) of all CPUs busy over the next `interval` seconds."""
    total0, idle0 = _machine_ticks()
    time.sleep(interval)
    total1, idle1 = _machine_ticks()
    return 0.0 if total1 == total0 else 1.0 - (idle1 - idle0) / (total1 - total0)


def _process_table() -> dict[int, tuple[int, float, int, str]]:
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat(int(name))
            if stat:
                table[int(name)] = stat
    return table


def _tree(root: int, table: dict) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return found


@dataclass
class Group:
    root: int
    with_root: bool = True  # False: only the root's descendants (an sshd listener's sessions)
    track_peak: bool = False  # long-lived: reset and read VmHWM


class Watch:
    def __init__(self, groups: dict[str, Group]):
        self.groups = groups
        self.peak_rss = {name: 0 for name in groups}
        self.start_rss = {name: 0 for name in groups}
        self.members: dict[str, set[int]] = {name: set() for name in groups}
        self.first_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.born: set[int] = set()
        self.ours: set[int] = {os.getpid()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._sampled = False
        self.sampler_cpu_s = 0.0

    def _sample(self) -> None:
        table = _process_table()
        for name, group in list(self.groups.items()):
            pids = _tree(group.root, table) if group.root in table else set()
            if not group.with_root:
                pids.discard(group.root)
            self.ours |= pids
            self.members[name] |= pids
            total = sum(table[pid][2] for pid in pids)
            if not self._sampled:
                self.start_rss[name] = total
            self.peak_rss[name] = max(self.peak_rss[name], total)
        for pid, (_, cpu, _, _) in table.items():
            if pid not in self.first_cpu:
                self.first_cpu[pid] = cpu
                if self._sampled:
                    self.born.add(pid)
            self.last_cpu[pid] = cpu
        self._sampled = True

    def _loop(self) -> None:
        start = time.thread_time()
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()
        self.sampler_cpu_s = time.thread_time() - start

    def __enter__(self) -> "Watch":
        for group in self.groups.values():
            if group.track_peak:
                reset_peak(group.root)
        self._ticks = _machine_ticks()
        self.started = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.window_s = time.perf_counter() - self.started
        total0, idle0 = self._ticks
        total1, idle1 = _machine_ticks()
        self.machine_cpu_s = ((total1 - total0) - (idle1 - idle0)) / CLK - self.sampler_cpu_s
        # VmHWM of the long-lived processes, read while they still live
        self.hwm = {
            name: status_bytes(group.root, "VmHWM") for name, group in self.groups.items() if group.track_peak
        }

    def cpu(self, name: str) -> float:
        total = 0.0
        for pid in self.members[name]:
            base = 0.0 if pid in self.born else self.first_cpu.get(pid, 0.0)
            total += max(0.0, self.last_cpu.get(pid, 0.0) - base)
        return total

    def others_cpu(self) -> float:
        total = 0.0
        for pid, last in self.last_cpu.items():
            if pid not in self.ours:
                base = 0.0 if pid in self.born else self.first_cpu[pid]
                total += max(0.0, last - base)
        return total

    def summary(self) -> dict:
        out = {
            "cpu_s": {name: round(self.cpu(name), 2) for name in self.groups},
            "rss_start_MiB": {name: round(v / MiB, 1) for name, v in self.start_rss.items()},
            "peak_rss_sampled_MiB": {name: round(v / MiB, 1) for name, v in self.peak_rss.items()},
            "machine_cpu_s": round(self.machine_cpu_s, 2),
            "others_cpu_s": round(self.others_cpu(), 2),
            "sampler_cpu_s": round(self.sampler_cpu_s, 2),
        }
        if self.hwm:
            out["peak_rss_hwm_MiB"] = {name: round(v / MiB, 1) if v else None for name, v in self.hwm.items()}
        return out


def run_command(
    cmd: list[str],
    groups: dict[str, Group] | None = None,
    *,
    client: str = "client",
    kill_when=None,
    timeout: float = 3600.0,
    cwd: str | None = None,
) -> dict:
    """Run cmd in its own session under a Watch. The command's tree is the
    group `client`, its CPU exact from wait4's rusage. kill_when(elapsed) ->
    True sends SIGINT to the command's process group once."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, cwd=cwd
    )
    output: dict[str, bytes] = {}
    pumps = [
        threading.Thread(target=lambda: output.__setitem__("out", proc.stdout.read())),
        threading.Thread(target=lambda: output.__setitem__("err", proc.stderr.read())),
    ]
    for pump in pumps:
        pump.start()
    killed = False
    with Watch({client: Group(proc.pid), **(groups or {})}) as watch:
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            now = time.perf_counter()
            if kill_when and not killed and kill_when(now - started):
                os.killpg(proc.pid, signal.SIGINT)
                killed = True
            if now > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.01)
        wall = time.perf_counter() - started
    for pump in pumps:
        pump.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {
        "rc": proc.returncode,
        "wall_s": round(wall, 3),
        "client_cpu_exact_s": round(usage.ru_utime + usage.ru_stime, 2),
        "killed": killed,
        "stdout": output.get("out", b"").decode(errors="replace"),
        "stderr": output.get("err", b"").decode(errors="replace"),
        **watch.summary(),
    }
    result["cpu_s"][client] = result["client_cpu_exact_s"]
    return result


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def timed_sync() -> float:
    """Flush dirty pages; returns seconds. Before a run so the previous
    run's writeback does not land in it; after, to show what scp and rsync
    left unwritten (Dorothy fsyncs before its receipt)."""
    started = time.perf_counter()
    os.sync()
    return round(time.perf_counter() - started, 3)


def drop_page_cache() -> bool:
    """Empty the page cache (clean pages only: call timed_sync first); False
    where this process may not. On this kind of virtual machine a page the
    page cache takes from the free list can cost a fault in the host, and
    what the runs before had cached decided how many it took: 10,000 files
    of 32 KiB took 1.5-2.0 s to write with 10 GiB cached, 0.6 s just after
    a drop, and Dorothy's folder runs fell from 101 to 47 MiB/s over four
    runs that kept their copies (the receiver's CPU doubled)."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("1\n")
    except OSError:
        return False
    return True


def warm(path: str) -> None:
    """Read a file (or a tree) once so every tool starts from the page cache."""
    if os.path.isdir(path):
        for folder, _, names in os.walk(path):
            for name in names:
                warm(os.path.join(folder, name))
        return
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass
