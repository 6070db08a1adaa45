"""The local attacker and safe display.

What stops another user of the same machine: the home is 0700, node.key and
the control socket 0600, and the control server checks the caller's uid
(SO_PEERCRED). These tests run real daemons (cli/localnodes.py) and, when
they run as root, act as the `nobody` user (uid/gid 65534) through
subprocess's user=/group=; run as anyone else they check the modes and the
owner instead. Nothing is skipped.

Names from the evidence (files) and from operators (peers) may hold shell
and terminal control characters: every human-facing output shows them
escaped, and the JSON outputs carry them exactly.
"""

import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from dorothy.cli.localnodes import CLI_DEADLINE, START_DEADLINE, LocalNode, pair, poll
from dorothy.cli.main import main
from dorothy.keys.identity import NodeIdentity
from dorothy.protocol.paths import escape

NOBODY = 65534
AS_ROOT = os.geteuid() == 0
EVIL_NAME = "evil\x1b]0;pwned\x07\n;rm -rf ~.txt"
BIDI_NAME = "invoice\u202etxt.exe"  # renders as "invoiceexe.txt"
RAW_CONTROLS = ("\x1b", "\x07", "\u202e")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def owner(path: Path) -> int:
    return os.lstat(path).st_uid


runner = CliRunner()


def cli(*args):
    return runner.invoke(main, [str(a) for a in args], env={"DOROTHY_HOME": None, "DOROTHY_PASSPHRASE": None})


def one_line_error(returncode, stderr, *needles) -> str:
    assert returncode not in (0, None)
    assert "Traceback" not in stderr
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli_fails(result, *needles) -> str:
    assert type(result.exception) is SystemExit, f"unhandled {result.exception!r}"
    return one_line_error(result.exit_code, result.stderr, *needles)


@pytest.fixture(scope="module")
def open_dir():
    """A world-traversable (0755) directory outside pytest's owner-only
    tmp root: whatever stops another user below it is the home's own mode."""
    path = Path(tempfile.mkdtemp(prefix="dorothy-local-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(uid: int | None = None):
    """subprocess.run/Popen keywords that drop to `uid` (nobody when root)."""
    if uid is None:
        return {}
    return {"user": uid, "group": uid, "extra_groups": [], "cwd": "/"}


def _runs_for(uid: int, python: str) -> bool:
    try:
        result = subprocess.run(
            [python, "-s", "-c", "import sys; print(tuple(sys.version_info[:2]))"],
            capture_output=True, text=True, timeout=60, **as_user(uid),
        )
    except OSError:
        return False
    return result.returncode == 0 and result.stdout.strip() == str(tuple(sys.version_info[:2]))


def _interpreter_for(uid: int) -> str:
    """This Python, or the same minor version elsewhere on the machine when
    this one sits where `uid` cannot go (a pyenv under a 0700 /root)."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", sys.executable)]
    candidates += [shutil.which(version, path="/usr/local/bin:/usr/bin:/bin") or version]
    for python in dict.fromkeys(candidates):
        if _runs_for(uid, python):
            return python
    raise AssertionError(f"no {version} that uid {uid} can run; tried {candidates}")


def _runtime_for(dest: Path) -> Path:
    """Dorothy and its runtime dependencies, copied where any user can read
    them: the same source files and installed wheels, importable with
    PYTHONPATH wherever this checkout and its venv happen to live."""
    import importlib
    import importlib.metadata as metadata
    import re

    lib = dest / "pylib"
    skip = shutil.ignore_patterns("__pycache__")
    package = importlib.import_module("dorothy")
    shutil.copytree(Path(package.__file__).parent, lib / "dorothy", ignore=skip)
    for sub in ("cli", "dorothyd", "keys", "protocol"):
        module = importlib.import_module(f"dorothy.{sub}")
        shutil.copytree(Path(module.__file__).parent, lib / "dorothy" / sub, ignore=skip)
    wanted, todo = set(), ["dorothy"]
    while todo:
        for requirement in metadata.distribution(todo.pop()).requires or []:
            if "extra ==" in requirement:
                continue
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
            try:
                metadata.distribution(name)
            except metadata.PackageNotFoundError:
                continue  # a marker for another platform or Python
            if name not in wanted:
                wanted.add(name)
                todo.append(name)
    for name in wanted:
        dist = metadata.distribution(name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            source = Path(dist.locate_file(top))
            if source.is_dir():
                shutil.copytree(source, lib / top, ignore=skip, dirs_exist_ok=True)
            elif source.is_file():
                shutil.copy2(source, lib / top)
    for directory, dirnames, filenames in os.walk(lib):
        os.chmod(directory, 0o755)
        for filename in filenames:
            path = os.path.join(directory, filename)
            os.chmod(path, 0o755 if os.access(path, os.X_OK) else 0o644)
    return lib


class User:
    """Runs commands as another local user (nobody, when the tests run as
    root), or as this user (uid None)."""

    def __init__(self, uid: int | None, python: str, pythonpath: Path | None):
        self.uid, self.python = uid, python
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DOROTHY_", "PYTHON"))}
        if uid is not None:
            self.env["HOME"] = "/nonexistent"
        if pythonpath is not None:
            self.env["PYTHONPATH"] = str(pythonpath)

    def argv(self, *args) -> list[str]:
        return [self.python, "-s", *map(str, args)]

    def run(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=CLI_DEADLINE, env=self.env, **as_user(self.uid)
        )

    def dorothy(self, *args) -> subprocess.CompletedProcess:
        return self.run("-m", "dorothy.cli", *args)

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), env=self.env, **as_user(self.uid), **kwargs)


@pytest.fixture(scope="module")
def other(open_dir) -> User:
    """nobody, with a Python and a copy of Dorothy that nobody can use."""
    if not AS_ROOT:
        return User(None, sys.executable, None)
    runtime = open_dir / "runtime"
    runtime.mkdir(mode=0o755)
    user = User(NOBODY, _interpreter_for(NOBODY), _runtime_for(runtime))
    probe = user.run("-c", "import os, dorothy.dorothyd.main, dorothy.cli.main; print(os.getuid())")
    assert probe.returncode == 0 and probe.stdout.strip() == str(NOBODY), probe.stderr
    return user


me = User(None, sys.executable, None)


# --- a real daemon, run by this user, for the other user to attack ------------


@pytest.fixture(scope="module")
def daemon(open_dir):
    node = LocalNode(open_dir, "alpha")
    node.init()
    node.run("peer", "add", "bravo", "127.0.0.1:9", str(NodeIdentity.generate().node_key))
    node.start()
    yield node
    node.stop()


# --- modes -------------------------------------------------------------------


def test_init_makes_the_home_and_key_owner_only(tmp_path):
    home = tmp_path / "home"
    result = cli("init", "--home", home, "--name", "alpha")
    assert result.exit_code == 0, result.stderr
    assert mode(home) == 0o700
    assert mode(home / "node.key") == 0o600
    assert owner(home) == owner(home / "node.key") == os.geteuid()
    ledger = home / "ledger"
    assert mode(ledger) == 0o700 and mode(ledger / "ledger.bin") == 0o600  # SPEC 6.1
    key = str(NodeIdentity.generate().node_key)
    assert cli("peer", "add", "--home", home, "bravo", "127.0.0.1:9", key).exit_code == 0
    assert mode(home / "peers.json") & 0o022 == 0
    assert mode(home / "peers.json") == 0o600


def test_init_under_a_permissive_umask_still_makes_owner_only_files(tmp_path):
    old = os.umask(0)
    try:
        assert cli("init", "--home", tmp_path / "home", "--name", "alpha").exit_code == 0
        assert cli("peer", "add", "--home", tmp_path / "home", "bravo", "127.0.0.1:9",
                   str(NodeIdentity.generate().node_key)).exit_code == 0
    finally:
        os.umask(old)
    home = tmp_path / "home"
    assert mode(home) == 0o700 and mode(home / "node.key") == 0o600
    assert mode(home / "peers.json") & 0o022 == 0
    assert mode(home / "ledger") == 0o700 and mode(home / "ledger" / "ledger.bin") == 0o600


def test_control_socket_is_owner_only(daemon):
    sock = daemon.home / "control.sock"
    info = os.lstat(sock)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    assert mode(daemon.home) == 0o700


@pytest.mark.parametrize("key_mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused(tmp_path, key_mode):
    home = tmp_path / "home"
    assert cli("init", "--home", home, "--name", "alpha").exit_code == 0
    os.chmod(home / "node.key", key_mode)
    line = cli_fails(cli("id", "--home", home), f"{key_mode:04o}", "too open", "chmod 600")
    assert line.startswith("dorothy: ")
    assert str(home / "node.key") in line


def test_a_trust_store_others_can_write_is_refused(tmp_path):
    home = tmp_path / "home"
    assert cli("init", "--home", home, "--name", "alpha").exit_code == 0
    assert cli("peer", "add", "--home", home, "bravo", "127.0.0.1:9", str(NodeIdentity.generate().node_key)).exit_code == 0
    os.chmod(home / "peers.json", 0o666)
    cli_fails(cli("peer", "list", "--home", home), "too open", "chmod")


# --- another local user -----------------------------------------------------------

ATTACK = r"""
import json, os, socket, sys
key, sock_path, target = sys.argv[1:4]
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
try:
    with open(key, "rb") as f:
        f.read()
    out["key"] = "read"
except OSError as exc:
    out["key"] = type(exc).__name__
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(sock_path)
except OSError as exc:
    out["socket"] = type(exc).__name__
else:
    try:
        s.sendall(json.dumps({"op": "send", "peer": "bravo", "paths": [target]}).encode() + b"\n")
    except OSError as exc:
        out["send"] = type(exc).__name__  # the reply may still be waiting
    reply = b""
    try:
        while not reply.endswith(b"\n"):
            data = s.recv(65536)
            if not data:
                break
            reply += data
    except OSError as exc:
        out["recv"] = type(exc).__name__
    out["socket"] = json.loads(reply) if reply else "no reply"
print(json.dumps(out))
"""


def attack(other: User, daemon, target: Path) -> dict:
    result = other.run("-c", ATTACK, daemon.home / "node.key", daemon.home / "control.sock", target)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["uid"], out["gid"], out["groups"]) == (NOBODY, NOBODY, [])
    return out


def nothing_queued(daemon) -> None:
    assert daemon.status() == []
    events = [r["event"] for r in json.loads(daemon.run("ledger", "show", "--json").stdout)]
    assert "transfer_queued" not in events


def test_another_user_cannot_read_the_key_or_queue_a_send(other, daemon, open_dir):
    target = open_dir / "bait.txt"
    target.write_text("a world-readable file\n")
    os.chmod(target, 0o644)
    key, sock = daemon.home / "node.key", daemon.home / "control.sock"
    if not AS_ROOT:
        # No other account to act as: the same protection, stated as modes.
        assert owner(daemon.home) == owner(key) == owner(sock) == os.geteuid()
        assert mode(daemon.home) == 0o700 and mode(key) == 0o600 and mode(sock) == 0o600
        assert mode(open_dir) & 0o005 == 0o005  # the parent does not do the job
        nothing_queued(daemon)
        return
    assert mode(open_dir) == 0o755
    # 1. The 0700 home stops nobody at the door.
    out = attack(other, daemon, target)
    assert out["key"] == "PermissionError"
    assert out["socket"] == "PermissionError"
    nothing_queued(daemon)
    home_mode = mode(daemon.home)
    try:
        # 2. Behind a traversable home, the 0600 key and socket still do.
        os.chmod(daemon.home, 0o711)
        out = attack(other, daemon, target)
        assert out["key"] == "PermissionError"
        assert out["socket"] == "PermissionError"
        nothing_queued(daemon)
        # 3. And with the socket opened up too, the daemon checks the caller.
        os.chmod(sock, 0o666)
        out = attack(other, daemon, target)
        assert out["socket"] == {"ok": False, "error": "permission denied: the daemon belongs to another user"}
        nothing_queued(daemon)
    finally:
        os.chmod(sock, 0o600)
        os.chmod(daemon.home, home_mode)
    # The owner still can.
    transfer_id = json.loads(daemon.run("send", "bravo", target, "--json").stdout)["id"]
    assert daemon.status(transfer_id)["files"][0]["path"] == "bait.txt"
    daemon.run("cancel", transfer_id)


@pytest.fixture(scope="module")
def daemon_as_nobody(other, open_dir):
    """A node whose home and daemon belong to nobody (to this user when not
    root), driven by a CLI running as that user too."""
    base = Path(tempfile.mkdtemp(dir=open_dir))
    os.chmod(base, 0o755)
    if AS_ROOT:
        os.chown(base, NOBODY, NOBODY)
    home = base / "home"
    log_path = open_dir / f"{base.name}.log"
    init = other.dorothy("init", "--home", home, "--name", "nemo", "--listen", "127.0.0.1:0")
    assert init.returncode == 0, init.stderr
    added = other.dorothy("peer", "add", "--home", home, "bravo", "127.0.0.1:9", str(NodeIdentity.generate().node_key))
    assert added.returncode == 0, added.stderr
    if AS_ROOT:
        assert owner(home) == owner(home / "node.key") == NOBODY
    with open(log_path, "ab") as log:
        process = other.popen("-m", "dorothy.dorothyd", "--home", home, stdout=subprocess.DEVNULL, stderr=log)
    try:
        def started():
            assert process.poll() is None, log_path.read_text()
            return other.dorothy("status", "--json", "--home", home).returncode == 0

        poll(started, START_DEADLINE, "dorothyd as nobody listening")
        if AS_ROOT:
            assert owner(home / "control.sock") == NOBODY and mode(home / "control.sock") == 0o600
        yield home
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_daemon_as_nobody_names_an_unreadable_source(other, daemon_as_nobody, open_dir):
    home = daemon_as_nobody
    secret = open_dir / "secret-evidence.dd"
    secret.write_bytes(b"root's only\n")
    os.chmod(secret, 0o600 if AS_ROOT else 0o000)
    assert owner(secret) == os.geteuid()
    result = other.dorothy("send", "--home", home, "bravo", secret)
    line = one_line_error(result.returncode, result.stderr, "secret-evidence.dd", "cannot read", "Permission denied")
    assert result.returncode == 1 and line.startswith("dorothy: ")
    # Inside a directory too.
    folder = open_dir / "case-folder"
    folder.mkdir()
    os.chmod(folder, 0o755)
    inner = folder / "locked.bin"
    inner.write_bytes(b"x")
    os.chmod(inner, 0o600 if AS_ROOT else 0o000)
    result = other.dorothy("send", "--home", home, "bravo", folder)
    one_line_error(result.returncode, result.stderr, "locked.bin", "cannot read", "Permission denied")
    # Nothing was queued; a readable file is.
    assert json.loads(other.dorothy("status", "--json", "--home", home).stdout) == []
    readable = open_dir / "readable.txt"
    readable.write_text("anyone may read this\n")
    os.chmod(readable, 0o644)
    sent = other.dorothy("send", "--home", home, "bravo", readable, "--json")
    assert sent.returncode == 0, sent.stderr
    assert len(json.loads(other.dorothy("status", "--json", "--home", home).stdout)) == 1


def test_root_is_refused_by_another_users_daemon(daemon_as_nobody):
    """SO_PEERCRED: even root, who can open any socket file, is not the
    daemon's user (run as anyone else: this user is the owner, and is served)."""
    result = me.dorothy("status", "--json", "--home", daemon_as_nobody)
    if AS_ROOT:
        one_line_error(result.returncode, result.stderr)
        assert result.stdout == ""
    else:
        assert json.loads(result.stdout) == []


class SlowSocket(socket.socket):
    """A client that is slow between connecting and sending its request, as
    on a loaded machine: the daemon has answered and closed by then."""

    def connect(self, address):
        super().connect(address)
        # Give the daemon its chance to answer (or close) before any request:
        # wait for the socket to turn readable, for at most 0.3 s.
        select.select([self], [], [], 0.3)


def test_a_refused_client_is_told_permission_denied(daemon_as_nobody, monkeypatch):
    """SPEC 7: the server answers {"ok": false, "error": "permission denied: the daemon belongs to another user"}
    to any other user. The answer must reach the CLI however quickly the
    daemon closes, instead of "dorothy: Broken pipe"."""
    from dorothy.cli import client

    fake = types.SimpleNamespace(
        socket=SlowSocket, AF_UNIX=socket.AF_UNIX, SOCK_STREAM=socket.SOCK_STREAM, timeout=socket.timeout
    )
    monkeypatch.setattr(client, "socket", fake)
    result = cli("status", "--home", daemon_as_nobody)
    if AS_ROOT:
        cli_fails(result, "permission denied")
    else:
        assert result.exit_code == 0, result.stderr


# --- names shown escaped ------------------------------------------------------------


@pytest.fixture(scope="module")
def running_pair(tmp_path_factory):
    alpha, bravo = pair(tmp_path_factory.mktemp("pair"), "alpha", "bravo")
    alpha.configure(retry={"initial_seconds": 0.05, "max_seconds": 0.5})
    try:
        alpha.start()
        bravo.start()
        yield alpha, bravo
    finally:
        for node in (alpha, bravo):
            node.stop()


def read_log(node) -> str:
    return node.log_path.read_text(encoding="utf-8", errors="backslashreplace")


def assert_escaped(text: str, *names: str) -> None:
    for raw in RAW_CONTROLS:
        assert raw not in text, f"raw {raw!r} in output"
    assert "\n;rm -rf" not in text
    for name in names:
        assert escape(name) in text, f"{escape(name)!r} not shown"


def test_names_with_control_characters_are_shown_escaped(running_pair, tmp_path):
    alpha, bravo = running_pair
    src = tmp_path / "src"
    src.mkdir()
    (src / EVIL_NAME).write_bytes(b"terminal title attack\n")
    (src / BIDI_NAME).write_bytes(b"MZ\n")
    sent = alpha.run("send", "bravo", src / EVIL_NAME, src / BIDI_NAME, "--json", "--wait")
    transfer_id = json.loads(sent.stdout)["id"]
    bravo.wait_state(transfer_id, ("done",))
    assert (bravo.home / "inbox" / "alpha" / transfer_id / EVIL_NAME).read_bytes() == b"terminal title attack\n"
    for node in (alpha, bravo):
        # Human-facing: escaped, one line per file.
        assert_escaped(node.run("status", transfer_id).stdout, EVIL_NAME, BIDI_NAME)
        assert_escaped(node.run("ledger", "show").stdout, EVIL_NAME, BIDI_NAME)
        # Machine-facing: valid JSON that round-trips the exact names.
        status = json.loads(node.run("status", "--json", transfer_id).stdout)
        assert sorted(f["path"] for f in status["files"]) == sorted([EVIL_NAME, BIDI_NAME])
        shown = json.loads(node.run("ledger", "show", "--json", "--transfer", transfer_id).stdout)
        for record in shown:
            assert sorted(f["path"] for f in record["fields"]["files"]) == sorted([EVIL_NAME, BIDI_NAME])
        for fmt in ("jsonl", "csv"):
            exported = node.run("ledger", "export", "--format", fmt).stdout
            assert "\x1b" not in exported and "\x07" not in exported and "\n;rm -rf" not in exported
    for node in (alpha, bravo):
        log = read_log(node)
        assert transfer_id in log  # the log does talk about this transfer
        for raw in RAW_CONTROLS:
            assert raw not in log, f"raw {raw!r} in {node.name}'s log"
        assert "\n;rm -rf" not in log


def test_a_name_in_a_daemon_error_is_escaped_in_the_log_and_the_ledger(running_pair, tmp_path):
    """A file that changes after it was queued fails the transfer with an
    error naming it: in the log, in `status` and in `ledger show`."""
    alpha, bravo = running_pair
    bravo.stop()
    try:
        source = tmp_path / EVIL_NAME
        source.write_bytes(b"before\n")
        transfer_id = json.loads(alpha.run("send", "bravo", source, "--json").stdout)["id"]
        alpha.wait_state(transfer_id, ("waiting",))  # bravo is down
        source.write_bytes(b"after, and longer\n")
    finally:
        bravo.start()
    failed = alpha.wait_state(transfer_id, ("failed",))
    assert escape(EVIL_NAME) in failed["error"]  # the daemon's message is already escaped
    assert_escaped(alpha.run("status", transfer_id).stdout, EVIL_NAME)
    shown = alpha.run("ledger", "show", "--transfer", transfer_id).stdout
    assert_escaped(shown, EVIL_NAME)
    assert "transfer_failed" in shown
    log = read_log(alpha)
    assert transfer_id in log
    assert_escaped(log, EVIL_NAME)


@pytest.mark.parametrize(
    "name", ["evil\x1b[31m", "two\nlines", "bell\x07", "tab\tname", "del\x7f", "bidi\u202eexe", "-rf"]
)
def test_a_peer_name_with_control_characters_is_refused(tmp_path, name):
    home = tmp_path / "home"
    assert cli("init", "--home", home, "--name", "alpha").exit_code == 0
    before = (home / "ledger" / "ledger.bin").read_bytes()
    trust_before = (home / "peers.json").read_bytes() if (home / "peers.json").exists() else None
    result = cli("peer", "add", "--home", home, "--", name, "127.0.0.1:9", str(NodeIdentity.generate().node_key))
    line = cli_fails(result, "invalid peer name")
    assert result.exit_code == 1
    for raw in ("\x1b", "\x07", "\t", "\x7f", "\u202e"):
        assert raw not in result.stderr
    assert escape(name) in line
    assert ((home / "peers.json").read_bytes() if (home / "peers.json").exists() else None) == trust_before
    assert (home / "ledger" / "ledger.bin").read_bytes() == before
