"""scp and rsync over SSH, through a throwaway sshd on 127.0.0.1.

Adapted from /work/shared/peers/ssh_bench.py (see bench/README.md). The
sshd, its host key, a client key, authorized_keys, known_hosts and both
configs live under WORK/ssh; the system's ssh configuration is never read
or touched (ssh -F, IdentitiesOnly, IdentityAgent none, GlobalKnownHostsFile
/dev/null). The sshd is stopped by the PID it was started with.
"""

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .link import FaultProxy, ProxyThread
from .measure import Group, run_command

INSTALL_HINT = "apt-get install -y openssh-server openssh-client rsync"
SSHD = "/usr/sbin/sshd"
SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server")
HOST = "benchpeer"  # direct to the sshd
LINK_HOST = "benchpeer-link"  # through the rate-limited link (a FaultProxy) in front of it

# name -> (program, extra arguments)
TOOLS = {
    "scp": ("scp", []),  # OpenSSH 9.x scp speaks SFTP; default cipher chacha20-poly1305
    "scp-gcm": ("scp", ["-c", "aes128-gcm@openssh.com"]),
    "rsync": ("rsync", []),
    "rsync-z": ("rsync", ["-z"]),  # rsync >= 3.2 negotiates zstd
}

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/ssh_host_ed25519_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PermitTunnel no
PrintMotd no
MaxStartups 50:30:100
Subsystem sftp {sftp}
LogLevel INFO
"""

SSH_HOST = """\
Host {alias}
  HostName 127.0.0.1
  Port {port}
  HostKeyAlias {host}
  User {user}
  IdentityFile {dir}/id_ed25519
  IdentitiesOnly yes
  IdentityAgent none
  UserKnownHostsFile {dir}/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  Compression no
  ControlMaster no
  ControlPath none
  LogLevel ERROR
"""


def missing_programs() -> list[str]:
    needed = ["ssh", "scp", "ssh-keygen", "rsync"]
    missing = [p for p in needed if not shutil.which(p)]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    if not any(os.path.exists(p) for p in SFTP_SERVERS):
        missing.append("sftp-server")
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Sshd:
    def __init__(self, work: Path):
        self.dir = work / "ssh"
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.config = self.dir / "ssh_config"

    def _setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        host_key, client_key = self.dir / "ssh_host_ed25519_key", self.dir / "id_ed25519"
        for key, comment in ((host_key, "dorothy-bench-host"), (client_key, "dorothy-bench-client")):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)], check=True)
        (self.dir / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
        host_public = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
        (self.dir / "known_hosts").write_text(f"{HOST} {host_public}\n")
        sftp = next(p for p in SFTP_SERVERS if os.path.exists(p))
        (self.dir / "sshd_config").write_text(SSHD_CONFIG.format(port=self.port, dir=self.dir, sftp=sftp))
        self.route_link(None)
        for p in ("authorized_keys", "ssh_config", "id_ed25519"):
            os.chmod(self.dir / p, 0o600)
        os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation directory sshd insists on

    def route_link(self, port: int | None) -> None:
        """(Re)write ssh_config: HOST direct, LINK_HOST via a proxy port."""
        fields = {"host": HOST, "user": getpass.getuser(), "dir": self.dir}
        text = SSH_HOST.format(alias=HOST, port=self.port, **fields)
        if port:
            text += SSH_HOST.format(alias=LINK_HOST, port=port, **fields)
        self.config.write_text(text)

    def start(self, log) -> None:
        self._setup()
        config = str(self.dir / "sshd_config")
        subprocess.run([SSHD, "-t", "-f", config], check=True)
        self.process = subprocess.Popen([SSHD, "-D", "-f", config, "-E", str(self.dir / "sshd.log")])
        end = time.monotonic() + 10
        while not _listening(self.port):
            if time.monotonic() > end or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"sshd did not start; see {self.dir / 'sshd.log'}")
            time.sleep(0.05)
        login = subprocess.run(self.ssh(HOST, "true"), capture_output=True, text=True, timeout=30)
        if login.returncode:
            self.stop()
            raise RuntimeError(f"ssh login to the bench sshd failed: {login.stderr.strip()}")
        log(f"  sshd pid {self.process.pid} on 127.0.0.1:{self.port}, config under {self.dir}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def ssh(self, host: str, *args: str) -> list[str]:
        return ["ssh", "-F", str(self.config), host, *args]

    def cipher(self, extra: list[str]) -> str:
        """The cipher and MAC the client negotiates, from `ssh -v`."""
        result = subprocess.run(
            ["ssh", "-F", str(self.config), "-v", *extra, HOST, "true"], capture_output=True, text=True, timeout=30
        )
        found = re.findall(r"kex: client->server cipher: (\S+) MAC: (\S+)", result.stderr)
        return " ".join(found[0]) if found else "?"

    def command(self, tool: str, source: Path, dest_dir: Path, host: str = HOST) -> list[str]:
        program, extra = TOOLS[tool]
        recursive = source.is_dir()
        target = f"{host}:{dest_dir}/"
        if program == "scp":
            return ["scp", "-q", "-F", str(self.config), *extra, *(["-r"] if recursive else []), str(source), target]
        ssh = f"ssh -F {self.config}"
        return ["rsync", *extra, *(["-r"] if recursive else []), "--stats", "-e", ssh, str(source), target]

    def run(self, tool: str, source: Path, dest_dir: Path, host: str = HOST, kill_when=None) -> dict:
        """One measured copy; client = scp/rsync and its ssh, server = the
        sshd listener's descendants (session sshd plus sftp-server or rsync)."""
        groups = {"server": Group(self.process.pid, with_root=False)}
        return run_command(self.command(tool, source, dest_dir, host), groups, kill_when=kill_when)


def rsync_stats(text: str) -> dict:
    out = {}
    for key in ("Total bytes sent", "Total bytes received", "Literal data", "Matched data"):
        found = re.search(rf"{key}: ([\d,]+)", text)
        if found:
            out[key] = int(found.group(1).replace(",", ""))
    return out


def wait_sessions_gone(sshd: Sshd, timeout: float = 15.0) -> None:
    """Until the sshd listener has no session children (a killed rsync's
    remote end finished writing its partial file)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(sshd.process.pid)], capture_output=True, text=True)
        if not children.stdout.split():
            return
        time.sleep(0.1)


def rsync_resume(sshd: Sshd, source: Path, dest_dir: Path, log) -> dict:
    """The comparison for Dorothy's resume: rsync --partial stopped (SIGINT)
    at ~50% of the destination, then rerun with --partial --append-verify.
    Both runs go through a counting FaultProxy (no faults), so re-sent
    bytes are measured the same way as Dorothy's: all bytes up - file size."""
    size = source.stat().st_size
    target = dest_dir / source.name

    def partial_bytes() -> int:
        sizes = [p.stat().st_size for p in dest_dir.glob(f".{source.name}.*")]
        if target.exists():
            sizes.append(target.stat().st_size)
        return max(sizes, default=0)

    shutil.rmtree(dest_dir, ignore_errors=True)
    dest_dir.mkdir(parents=True)
    ssh = f"ssh -F {sshd.config}"
    server = {"server": Group(sshd.process.pid, with_root=False)}
    proxy = FaultProxy(("127.0.0.1", sshd.port))
    with ProxyThread(proxy):
        sshd.route_link(proxy.port)
        try:
            first = run_command(
                ["rsync", "--partial", "-e", ssh, str(source), f"{LINK_HOST}:{dest_dir}/"],
                server,
                kill_when=lambda _: partial_bytes() >= size // 2,
            )
            wait_sessions_gone(sshd)
            kept = partial_bytes()
            second = run_command(
                ["rsync", "--partial", "--append-verify", "--stats", "-e", ssh, str(source), f"{LINK_HOST}:{dest_dir}/"],
                server,
            )
        finally:
            sshd.route_link(None)
    stats = rsync_stats(second["stdout"])
    ok = second["rc"] == 0 and target.exists() and target.stat().st_size == size
    result = {
        "ok": ok,
        "size": size,
        "first_killed": first["killed"],
        "partial_kept_bytes": kept,
        "up_bytes_total": proxy.up.passed,
        "resent_bytes": proxy.up.passed - size,
        "second_wall_s": second["wall_s"],
        "second_bytes_sent": stats.get("Total bytes sent"),
        "wall_s": round(first["wall_s"] + second["wall_s"], 2),
        "cpu_s": second["cpu_s"],
    }
    shutil.rmtree(dest_dir, ignore_errors=True)
    log(
        f"  rsync resume: partial kept {kept / 2**20:.0f} MiB, re-sent {result['resent_bytes'] / 2**20:.2f} MiB, "
        f"second run {second['wall_s']:.2f}s, ok={ok}"
    )
    return result


def rate_limited(sshd: Sshd, tool: str, source: Path, dest_dir: Path, faults) -> dict:
    """One copy through a rate-limited link (rate and delay both ways) in front of the sshd."""
    shutil.rmtree(dest_dir, ignore_errors=True)
    dest_dir.mkdir(parents=True)
    link = FaultProxy(("127.0.0.1", sshd.port))
    with ProxyThread(link):
        link.plan(up=faults, down=faults)
        sshd.route_link(link.port)
        try:
            run = sshd.run(tool, source, dest_dir, host=LINK_HOST)
        finally:
            sshd.route_link(None)
    target = dest_dir / source.name
    run["ok"] = run["rc"] == 0 and target.exists() and target.stat().st_size == source.stat().st_size
    run["wire_up_bytes"] = link.up.passed
    shutil.rmtree(dest_dir, ignore_errors=True)
    return run
