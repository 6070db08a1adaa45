"""Run real nodes on this machine: separate `dorothyd` processes on
127.0.0.x ports, driven only through the `dorothy` CLI. Used by
`dorothy demo`, the end-to-end tests and the benchmarks."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# How long a daemon may take to start listening: a process boundary, where
# polling with a deadline is the only way to know.
START_DEADLINE = 20.0


def poll(predicate, deadline: float = 60.0, what: str = "condition", interval: float = 0.05):
    """The predicate's first true value, checked every `interval` seconds;
    TimeoutError naming `what` after `deadline`. Only for process
    boundaries, where there is nothing else to wait on."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not reached within {deadline:.0f}s")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# No CLI call in a demo or test should take longer; a hang becomes an error.
CLI_DEADLINE = 300.0


def dorothy(*args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "dorothy.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=CLI_DEADLINE,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"dorothy {' '.join(map(str, args))} failed: {result.stderr.strip()}")
    return result


class LocalNode:
    def __init__(self, root: Path, name: str, host: str = "127.0.0.1", port: int | None = None):
        self.home = root / name
        self.name = name
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen | None = None
        self.log_path = root / f"{name}.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def init(self) -> None:
        dorothy("init", "--home", self.home, "--name", self.name, "--listen", self.address)

    def configure(self, **sections: dict) -> None:
        """Rewrite dorothy.toml: [node] as created, plus the given sections."""
        lines = ["[node]", f'name = "{self.name}"', f'listen = "{self.address}"']
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        (self.home / "dorothy.toml").write_text("\n".join(lines) + "\n")

    def run(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return dorothy(*args, "--home", self.home, check=check)

    def node_key(self) -> str:
        return json.loads(self.run("id", "--json").stdout)["node_key"]

    def trust(self, other: "LocalNode", address: str | None = None) -> None:
        self.run("peer", "add", other.name, address or other.address, other.node_key())

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dorothy.dorothyd", "--home", str(self.home)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"dorothyd {self.name} exited: {self.log_path.read_text()[-2000:]}")
            if self.run("status", "--json", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"dorothyd {self.name} did not start within {START_DEADLINE}s")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code, self.process = self.process.returncode, None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def status(self, transfer_id: str | None = None):
        args = ["status", "--json"] + ([transfer_id] if transfer_id else [])
        return json.loads(self.run(*args).stdout)

    def wait_state(self, transfer_id: str, states: tuple[str, ...], deadline: float = 60.0) -> dict:
        end = time.monotonic() + deadline
        while True:
            result = self.run("status", "--json", transfer_id, check=False)
            if result.returncode == 0:
                t = json.loads(result.stdout)
                if t["state"] in states:
                    return t
            if time.monotonic() > end:
                raise TimeoutError(f"{self.name}: transfer {transfer_id} not in {states} after {deadline}s")
            time.sleep(0.05)


def pair(root: Path, *names: str) -> list[LocalNode]:
    """Initialised nodes that trust each other (not yet started)."""
    nodes = [LocalNode(root, name, host=f"127.0.0.{i + 1}") for i, name in enumerate(names)]
    for node in nodes:
        node.init()
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.trust(other)
    return nodes
