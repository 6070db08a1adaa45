"""`python -m bench` (`make bench BENCH_ARGS=...`): Dorothy side by side
with scp and rsync on this machine. See bench/README.md."""

import argparse
import contextlib
import errno
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from . import data, dorothy_runs, machine, micro, peers, report, throughput
from .link import link_faults
from .measure import MiB, warm

PEERS = ["dorothy", "scp", "scp-gcm", "rsync", "rsync-z"]
SCENARIOS = ["random", "text", "small", "resume", "ratelimited", "memory", "micro"]
RATE_LIMITED_PEERS = ("scp", "rsync-z")
QUICK = {"size_mib": 4, "small_files": 200, "runs": 1, "ratelimited_mib": 4, "micro_seconds": 0.1, "quiet_max": 0}

NOTES = [
    "Dorothy's time is `dorothy send --wait` from start to exit, CLI start-up (~0.15 s of Python) included; "
    "it returns when the daemon records the receipt, which comes after the receiver fsync'd and "
    "SHA-256-verified every file. scp and rsync do not fsync: 'sync after s' is what flushing their "
    "output took after they exited.",
    "Dorothy RSS is VmHWM of each daemon (rewound before each run); scp/rsync RSS is the summed RSS of the "
    "client tree (scp or rsync + ssh) and the server tree (sshd session + sftp-server or rsync), sampled every 50 ms.",
    "Server-side CPU of scp/rsync is sampled (a process that exits loses up to 50 ms); others_cpu_s is CPU used "
    "during a run by processes outside the measured trees (interference on a shared machine).",
    "Single runs on a 2-core machine move by tens of percent between sets; compare tools within one run.",
]
CACHE_KEPT_NOTE = (
    "The page cache was not emptied before each throughput run (that needs root, or --keep-page-cache was "
    "given): on a virtual machine, later runs may pay for what earlier ones cached (bench/README.md)."
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024, help="random and text file size (default 1024)")
    ap.add_argument("--small-files", type=int, default=10000, help="files of 1-64 KiB in the folder (default 10000)")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool and data set; medians are reported (default 3)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"which tools (default {','.join(PEERS)})")
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"which scenarios (default {','.join(SCENARIOS)})")
    ap.add_argument("--memory-gib", type=float, default=0, help="send a file this big and record peak RSS (off by default; e.g. 4)")
    ap.add_argument("--ratelimited-mib", type=int, default=256, help="text size for the rate-limited link (default 256)")
    ap.add_argument("--rate-mbit", type=float, default=100.0, help="rate-limited link, Mbit/s each way (default 100)")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="rate-limited link, one-way delay (default 20)")
    ap.add_argument("--micro-seconds", type=float, default=0.5, help="length of each single-core microbenchmark")
    ap.add_argument("--quiet-max", type=float, default=10.0, help="wait at most this long for a quieter machine before a run")
    ap.add_argument("--work", default="/tmp/dorothy-bench", help="data, daemons' homes, sshd (default /tmp/dorothy-bench)")
    ap.add_argument("--out", help="JSON of every run (default bench/out/results.json, with --quick bench/out/quick.json)")
    ap.add_argument("--keep-page-cache", action="store_true",
                    help="do not empty the page cache before each throughput run (it is emptied where permitted: root)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and one run: a smoke test of the harness")
    args = ap.parse_args(argv)
    args.out = args.out or ("bench/out/quick.json" if args.quick else "bench/out/results.json")
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.peers = _choices(args.peers, PEERS, "--peers")
    args.only = _choices(args.only, SCENARIOS, "--only")
    return args


def _choices(text: str, allowed: list[str], option: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in allowed]
    if unknown:
        raise SystemExit(f"{option}: unknown {', '.join(unknown)}; choose from {','.join(allowed)}")
    return chosen


def log(*parts) -> None:
    print(*parts, flush=True)


def prepare_data(args, data_dir: Path) -> dict:
    data_dir.mkdir(parents=True, exist_ok=True)
    only, size = set(args.only), args.size_mib * MiB
    sets = {}
    log(f"data under {data_dir}:")
    if only & {"random", "resume"}:
        sets["random"] = throughput.Dataset("random", data.random_file(data_dir, size, log), size, 1)
    if "text" in only:
        sets["text"] = throughput.Dataset("text", data.text_file(data_dir, size, log), size, 1)
    if "small" in only:
        folder, total = data.small_files(data_dir, args.small_files, log)
        sets["small"] = throughput.Dataset("small", folder, total, args.small_files)
    if "ratelimited" in only:
        limited = args.ratelimited_mib * MiB
        sets["ratelimited"] = throughput.Dataset("ratelimited", data.text_file(data_dir, limited, log), limited, 1)
    if "memory" in only and args.memory_gib:
        big = 16 * MiB if args.quick else int(args.memory_gib * 1024) * MiB
        sets["memory"] = throughput.Dataset("memory", data.random_file(data_dir, big, log), big, 1)
    return sets


def space_needed(args, sets: dict) -> int:
    """Bytes the runs write under WORK at their peak: every copy of the
    folder stays until its last run (see bench/README.md), any other copy
    only until the next run. Files of 1-64 KiB take a sixth more on disk
    than their bytes, in whole blocks; the nodes' homes and logs are the
    margin."""
    peak = max((d.bytes for name, d in sets.items() if name != "small"), default=0)
    if "small" in sets and "small" in args.only:
        peak = max(peak, args.runs * len(args.peers) * sets["small"].bytes * 7 // 6)
    return peak + 256 * MiB


def check_space(args, sets: dict, work: Path) -> None:
    needed, free = space_needed(args, sets), shutil.disk_usage(work).free
    if free < needed:
        raise SystemExit(
            f"not enough free space under {work}: the runs need about {needed / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB is free. Free some, or give --work a larger file system "
            f"(or fewer --runs, --peers or --small-files)."
        )


def run_throughput(args, sets: dict, sshd, work: Path, stack: contextlib.ExitStack) -> dict:
    datasets = [sets[name] for name in ("random", "text", "small") if name in sets and name in args.only]
    if not datasets:
        return {}
    tools = {}
    if "dorothy" in args.peers:
        nodes = stack.enter_context(dorothy_runs.Pair(work, "throughput"))
        tools["dorothy"] = lambda path, dest: nodes.timed_send(path, keep_in=dest)
    if sshd:
        for tool in args.peers:
            if tool != "dorothy":
                tools[tool] = lambda path, dest, tool=tool: sshd.run(tool, path, dest)
    log(f"\nthroughput: {', '.join(d.scenario for d in datasets)} x {', '.join(tools)}, {args.runs} run(s) each, alternating")
    rows = throughput.run_all(datasets, tools, args.runs, work / "recv", args.quiet_max, not args.keep_page_cache, log)
    return {"runs": rows, "summary": throughput.summarize(rows)}


def run_resume(args, sets: dict, sshd, work: Path) -> dict:
    dataset, out = sets["random"], {}
    warm(str(dataset.path))
    log(f"\nresume: {dataset.path.name}, fault at ~50%")
    if "dorothy" in args.peers:
        out["dorothy_cut"] = dorothy_runs.resume_after_cut(work, dataset.path, log)
        out["dorothy_restart"] = dorothy_runs.resume_after_restart(work, dataset.path, log)
    if sshd and any(p.startswith("rsync") for p in args.peers):
        out["rsync"] = peers.rsync_resume(sshd, dataset.path, work / "recv" / "rsync-resume", log)
    return out


def run_rate_limited(args, sets: dict, sshd, work: Path) -> dict:
    dataset = sets["ratelimited"]
    faults = link_faults(args.rate_mbit, args.delay_ms)
    out = {"link": f"{args.rate_mbit:g} Mbit/s and {args.delay_ms:g} ms each way", "size": dataset.bytes, "runs": {}}
    log(f"\nrate-limited link ({out['link']}): {dataset.path.name}")
    warm(str(dataset.path))
    if "dorothy" in args.peers:
        run = dorothy_runs.rate_limited(work, dataset.path, args.rate_mbit, args.delay_ms, log)
        run["ok"] = run["rc"] == 0 and run.get("received") == (1, dataset.bytes)
        out["runs"]["dorothy"] = run
    if sshd:
        for tool in (t for t in RATE_LIMITED_PEERS if t in args.peers):
            out["runs"][tool] = peers.rate_limited(sshd, tool, dataset.path, work / "recv" / tool, faults)
    for tool, run in out["runs"].items():
        run["MiB_s"] = round(dataset.bytes / MiB / run["wall_s"], 1)
        for key in ("stdout", "stderr"):
            run.pop(key, None)
        log(f"  {tool:8s} {run['MiB_s']:6.1f} MiB/s  wall {run['wall_s']:.2f}s  ok={run['ok']}")
    return out


def run_memory(args, sets: dict, work: Path) -> dict:
    dataset = sets["memory"]
    log(f"\nmemory: dorothy sends {dataset.path.name}")
    with dorothy_runs.Pair(work, "memory") as nodes:
        raw = nodes.timed_send(dataset.path)
    row = throughput.record("dorothy", dataset, 1, raw, raw.pop("received", None) or (0, 0))
    log(f"  peak RSS sender {row['rss_sender_MiB']} MiB, receiver {row['rss_receiver_MiB']} MiB "
        f"(idle before: {row['rss_idle_MiB']}), {row['MiB_s']} MiB/s, ok={row['ok']}")
    return row


def start_sshd(args, work: Path, results: dict):
    wanted = [p for p in args.peers if p != "dorothy"]
    needs = set(args.only) & {"random", "text", "small", "resume", "ratelimited"}
    if not wanted or not needs:
        return None
    missing = peers.missing_programs()
    if missing:
        log(f"\nscp/rsync comparison skipped: {', '.join(missing)} not found. Install with:\n"
            f"  {peers.INSTALL_HINT}\nRunning Dorothy alone.")
        results["peers_skipped"] = {"missing": missing, "install": peers.INSTALL_HINT}
        return None
    sshd = peers.Sshd(work)
    sshd.start(log)
    results["ssh_ciphers"] = {"default": sshd.cipher([]), "scp-gcm": sshd.cipher(["-c", "aes128-gcm@openssh.com"])}
    return sshd


def print_report(results: dict) -> None:
    log("\n" + "=" * 100)
    log(f"machine: {machine.one_line(results['machine'])}")
    log(f"load average at end: {' '.join(f'{x:.2f}' for x in results['load_at_end']['loadavg'])}")
    if "ssh_ciphers" in results:
        log(f"ssh ciphers negotiated: default {results['ssh_ciphers']['default']}; scp-gcm {results['ssh_ciphers']['scp-gcm']}")
    if results.get("throughput"):
        log("\n" + report.matrix(results["throughput"]["summary"]))
        log("\n" + report.throughput(results["throughput"]["summary"]))
    if results.get("resume"):
        log("\n" + report.resume(results["resume"]))
    if results.get("ratelimited"):
        log(f"\nrate-limited link, {results['ratelimited']['link']}, {results['ratelimited']['size'] / MiB:.0f} MiB of log-like text")
        log(report.ratelimited(results["ratelimited"]))
    if results.get("memory"):
        m = results["memory"]
        log(f"\nmemory check: {m['bytes'] / MiB:.0f} MiB file, peak RSS sender {m['rss_sender_MiB']} MiB / receiver "
            f"{m['rss_receiver_MiB']} MiB (idle {m['rss_idle_MiB'][0]} / {m['rss_idle_MiB'][1]} MiB), ok={m['ok']}")
    if results.get("micro"):
        log(f"\n{report.micro(results['micro'])}")
        log(f"zstd-1 ratio on 1 MiB of the log-like text: {results['micro']['zstd1_text_ratio']}x")
    for note in results["notes"]:
        log(f"note: {note}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(args.work)
    results = {"machine": machine.describe(), "args": vars(args), "notes": list(NOTES)}
    log(f"machine: {machine.one_line(results['machine'])}")
    started = time.perf_counter()
    sshd = None
    failed = True
    try:
        with contextlib.ExitStack() as stack:
            sets = prepare_data(args, work / "data")
            check_space(args, sets, work)
            if "micro" in args.only:
                log("\nsingle-core limits ...")
                results["micro"] = micro.run(args.micro_seconds)
            sshd = start_sshd(args, work, results)
            results["throughput"] = run_throughput(args, sets, sshd, work, stack)
            if not all(row["page_cache_dropped"] for row in results["throughput"].get("runs", [])):
                results["notes"].append(CACHE_KEPT_NOTE)
            stack.close()  # the throughput daemons are not needed any more
            if "resume" in args.only:
                results["resume"] = run_resume(args, sets, sshd, work)
            if "ratelimited" in args.only:
                results["ratelimited"] = run_rate_limited(args, sets, sshd, work)
            if "memory" in sets and "dorothy" in args.peers:
                results["memory"] = run_memory(args, sets, work)
            elif "memory" in args.only:
                log("\nmemory check: off (use --memory-gib 4)")
        failed = False
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        results["notes"].append(f"the file system under {work} filled up: {exc}")
        log(f"\nrun stopped: the file system under {work} is full ({exc.filename})")
    finally:
        if sshd:
            sshd.stop()
        results["load_at_end"] = machine.load()
        results["elapsed_s"] = round(time.perf_counter() - started, 1)
        # a failed run keeps what it measured, beside the last good results
        out = Path(args.out).with_suffix(".failed.json") if failed else Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))
        if failed:
            log(f"run failed; what was measured is in {out}")
    print_report(results)
    log(f"\nwrote {out} ({results['elapsed_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
