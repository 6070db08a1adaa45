"""Throughput runs, alternated: run 1 of every tool, then run 2 of every
tool..., so drift on a shared machine spreads over all tools alike.

Every tool is a callable (source path, destination folder) -> raw result
from measure.run_command; `record` turns that into one row with the same
fields for Dorothy and for scp/rsync:

- sender / receiver RSS: Dorothy's alpha / bravo daemon (VmHWM); scp or
  rsync with its ssh / the sshd session with sftp-server or rsync (summed
  over the tree, sampled every 50 ms);
- sender / receiver CPU: the daemons' utime + stime deltas; the client
  tree exactly (wait4), the server tree from samples (approximate).
"""

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .data import tree_size
from .measure import MiB, cpu_busy, drop_page_cache, median, timed_sync, warm


@dataclass
class Dataset:
    scenario: str  # random, text, small
    path: Path
    bytes: int
    files: int


def _received(dest: Path, dataset: Dataset) -> tuple[int, int]:
    target = dest / dataset.path.name
    if target.is_dir():
        return tree_size(target)
    return (1, target.stat().st_size) if target.exists() else (0, 0)


def record(tool: str, dataset: Dataset, run: int, raw: dict, received: tuple[int, int]) -> dict:
    dorothy = tool == "dorothy"
    rss = raw.get("peak_rss_hwm_MiB") if dorothy else raw["peak_rss_sampled_MiB"]
    sender, receiver = ("sender", "receiver") if dorothy else ("client", "server")
    ok = raw["rc"] == 0 and received == (dataset.files, dataset.bytes)
    sync_after = raw.get("sync_after_s")  # None: not measured (the memory run)
    durable_s = None if sync_after is None else raw["wall_s"] + sync_after
    row = {
        "tool": tool,
        "scenario": dataset.scenario,
        "run": run,
        "ok": ok,
        "wall_s": raw["wall_s"],
        "bytes": dataset.bytes,
        "files": dataset.files,
        "MiB_s": round(dataset.bytes / MiB / raw["wall_s"], 1),
        "files_s": round(dataset.files / raw["wall_s"], 1),
        # An optimistic bound on the rate had the tool, like Dorothy, made
        # its copy durable before it was done: one sync after it exited.
        "sync_after_s": sync_after,
        "durable_MiB_s": durable_s and round(dataset.bytes / MiB / durable_s, 1),
        "durable_files_s": durable_s and round(dataset.files / durable_s, 1),
        "rss_sender_MiB": rss.get(sender),
        "rss_receiver_MiB": rss.get(receiver),
        "cpu_sender_s": raw["cpu_s"].get(sender),
        "cpu_receiver_s": raw["cpu_s"].get(receiver),
        "cpu_client_s": raw["cpu_s"].get("cli") if dorothy else None,
        "machine_cpu_s": raw["machine_cpu_s"],
        "others_cpu_s": raw["others_cpu_s"],
        "load1": round(os.getloadavg()[0], 2),
    }
    if dorothy:
        row["rss_idle_MiB"] = [raw["rss_start_MiB"].get("sender"), raw["rss_start_MiB"].get("receiver")]
    if not ok:
        row["error"] = (raw.get("stderr") or "")[-400:] or f"received {received}, expected {(dataset.files, dataset.bytes)}"
    return row


def run_all(
    datasets: list[Dataset], tools: dict, runs: int, dest_root: Path, quiet_max: float, drop_caches: bool, log
) -> list[dict]:
    """Each run starts with its data set in the page cache, after an
    untimed send of a tiny file by the same tool (so that its programs and
    their files are in the page cache too) and, with `drop_caches` (where
    permitted), after the page cache was emptied of everything else."""
    rows = []
    warmup = dest_root / "warmup" / "warmup.bin"
    warmup.parent.mkdir(parents=True, exist_ok=True)
    warmup.write_bytes(b"warm-up\n")
    for dataset in datasets:
        warm(str(dataset.path))
        # The copies of a folder are deleted after its last run, not between
        # runs: ext4 without a journal avoids reusing recently freed inodes,
        # and searching past the 10,000 a run had just freed was half of the
        # next run's receiver CPU (perf: recently_deleted under ext4_create),
        # whichever tool that was. It costs disk space for runs x tools copies.
        kept = []
        try:
            for run in range(1, runs + 1):
                for tool, send in tools.items():
                    dest = dest_root / tool / f"run-{run}"
                    shutil.rmtree(dest, ignore_errors=True)
                    dest.mkdir(parents=True)
                    kept.append(dest)
                    timed_sync()
                    dropped = drop_caches and drop_page_cache()
                    if dropped:
                        warm(str(dataset.path))
                    _warm_up(send, warmup, dest_root / "warmup" / tool)
                    busy = settle(quiet_max, log)
                    raw = send(dataset.path, dest)
                    raw["sync_after_s"] = timed_sync()
                    row = record(tool, dataset, run, raw, raw.pop("received", None) or _received(dest, dataset))
                    row["busy_before"] = round(busy, 2)
                    row["page_cache_dropped"] = dropped
                    rows.append(row)
                    if dataset.files == 1:
                        shutil.rmtree(dest, ignore_errors=True)
                    rate = f"{row['MiB_s']:7.1f} MiB/s" + (f" {row['files_s']:7.0f} files/s" if dataset.files > 1 else "")
                    log(
                        f"  {dataset.scenario:6s} run {run} {tool:8s} {rate}  wall {row['wall_s']:6.2f}s  "
                        f"RSS {row['rss_sender_MiB']}/{row['rss_receiver_MiB']} MiB  "
                        f"CPU {row['cpu_sender_s']}/{row['cpu_receiver_s']} s  others {row['others_cpu_s']}s  ok={row['ok']}"
                    )
        finally:
            for dest in kept:
                shutil.rmtree(dest, ignore_errors=True)
    return rows


def _warm_up(send, path: Path, dest: Path) -> None:
    dest.mkdir(exist_ok=True)
    try:
        if send(path, dest)["rc"] != 0:
            raise RuntimeError(f"the warm-up send to {dest} failed")
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def settle(quiet_max: float, log, threshold: float = 0.25) -> float:
    """Wait up to quiet_max s for the machine to be below `threshold` busy
    (other work on a shared machine); returns the last busy fraction."""
    end = time.monotonic() + quiet_max
    busy = cpu_busy(0.5)
    if busy >= threshold and quiet_max > 0:
        log(f"    machine {busy * 100:.0f}% busy, waiting up to {quiet_max:.0f}s")
        while busy >= threshold and time.monotonic() < end:
            busy = cpu_busy(1.0)
    return busy


def summarize(rows: list[dict]) -> list[dict]:
    """Median per (scenario, tool) over its runs."""
    out = []
    keys = []
    for row in rows:
        if (row["scenario"], row["tool"]) not in keys:
            keys.append((row["scenario"], row["tool"]))
    for scenario, tool in keys:
        mine = [r for r in rows if (r["scenario"], r["tool"]) == (scenario, tool)]
        good = [r for r in mine if r["ok"]] or mine
        out.append(
            {
                "scenario": scenario,
                "tool": tool,
                "runs": len(mine),
                "all_ok": all(r["ok"] for r in mine),
                "bytes": mine[0]["bytes"],
                "files": mine[0]["files"],
                "MiB_s": median([r["MiB_s"] for r in good]),
                "MiB_s_min_max": [min(r["MiB_s"] for r in good), max(r["MiB_s"] for r in good)],
                "files_s": median([r["files_s"] for r in good]),
                "durable_MiB_s": median([r["durable_MiB_s"] for r in good]),
                "durable_files_s": median([r["durable_files_s"] for r in good]),
                "wall_s": median([r["wall_s"] for r in good]),
                "rss_sender_MiB": max((r["rss_sender_MiB"] or 0) for r in good),
                "rss_receiver_MiB": max((r["rss_receiver_MiB"] or 0) for r in good),
                "cpu_sender_s": median([r["cpu_sender_s"] for r in good]),
                "cpu_receiver_s": median([r["cpu_receiver_s"] for r in good]),
                "machine_cpu_s": median([r["machine_cpu_s"] for r in good]),
                # Both ends share the machine's cores: a tool's rate is its
                # CPU per byte divided into how many cores it keeps busy.
                "busy_cores": median([r["machine_cpu_s"] / r["wall_s"] for r in good]),
                "sync_after_s": median([r["sync_after_s"] for r in good]),
                "others_cpu_s_max": max(r["others_cpu_s"] for r in mine),
            }
        )
    return out
