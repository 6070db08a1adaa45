"""What the figures were measured on: they mean little without it."""

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _first_line(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    result = subprocess.run(cmd, capture_output=True, text=True)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else None


def _versions() -> dict:
    import nacl
    import trio
    import zstandard

    return {
        "python": sys.version.split()[0],
        "pynacl": nacl.__version__,
        "trio": trio.__version__,
        "zstandard": zstandard.__version__,
        "ssh": _first_line(["ssh", "-V"]),
        "rsync": _first_line(["rsync", "--version"]),
    }


def _git() -> dict:
    """The commit measured, and the files that differed from it."""
    repo = Path(__file__).resolve().parent.parent
    if not shutil.which("git"):
        return {}
    run = lambda *args: subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout  # noqa: E731
    changed = [line[3:] for line in run("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return {"commit": run("rev-parse", "--short", "HEAD").strip(), "modified": changed}


def load() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg": [one, five, fifteen]}


def describe() -> dict:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "memory_GiB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "versions": _versions(),
        "git": _git(),
        "load_at_start": load(),
    }


def one_line(info: dict) -> str:
    la = info["load_at_start"]["loadavg"]
    git = info.get("git") or {}
    tree = f"; code {git.get('commit')}" + (f" + uncommitted changes to {', '.join(git['modified'])}" if git.get("modified") else "")
    return (
        f"{info['nproc']} CPUs ({info['cpu_model']}), kernel {info['kernel']}, {info['memory_GiB']} GiB RAM, "
        f"Python {info['versions']['python']}; load average at start {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
        + (tree if git else "")
    )
