"""`dorothyd`: run a node in the foreground until SIGINT or SIGTERM.

Wiring only: load the home, then start the listener, the control server and
the outbox in one nursery. Each service has its own module and one job.
"""

import fcntl
import os
import signal
import sys

import click
import trio

from ..keys.errors import KeysError
from ..keys.identity import NodeIdentity
from ..keys.truststore import TrustStore
from .clock import iso_now, utc_now
from .config import ConfigError, load_config
from .control import run_control
from .home import Home, resolve_home
from .ledger import Ledger, LedgerError
from .listener import run_listener
from .logs import log, setup
from .node import Node
from .outbox import run_outbox
from .store import Store
from . import tuning

VERSION = "0.1.0"


class StartupError(Exception):
    pass


def _lock_home(home: Home) -> int:
    """One daemon per home: a second one would corrupt nothing (sqlite and
    the ledger lock), but would fight over the control socket and port."""
    fd = os.open(home.root / "dorothyd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StartupError(f"another dorothyd is already running for {home.root}") from None
    return fd


def load_node(home: Home, log_format: str | None) -> Node:
    if not home.root.is_dir() or not home.exists():
        raise StartupError(f"{home.root} is not a Dorothy home; create one with: dorothy init --home {home.root} --name NAME")
    config = load_config(home.config_file)
    setup(log_format or config.log_format)
    passphrase = os.environ.get("DOROTHY_PASSPHRASE")
    identity = NodeIdentity.load(home.key_file, passphrase.encode() if passphrase else None)
    ledger = Ledger.open(home.ledger_dir, identity, now=utc_now)
    store = Store(home.state_db)
    store.mark_interrupted(iso_now())
    return Node(
        home=home,
        config=config,
        identity=identity,
        trust=TrustStore(home.trust_file),
        store=store,
        ledger=ledger,
    )


async def serve(node: Node, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run every service until cancelled (tests start this in a nursery)."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(run_listener, node)
        await nursery.start(run_control, node)
        await node.record("daemon_started", {"listen": f"{node.config.listen_host}:{port}", "version": VERSION})
        await nursery.start(run_outbox, node)
        task_status.started(port)


async def _main(node: Node) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, node)
            async for signum in signals:
                log.info("%s received: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    await node.record("daemon_stopped", {})
    node.store.close()
    log.info("stopped")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", "home_path", metavar="PATH", help="Node home (default: $DOROTHY_HOME or ~/.dorothy).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None, help="Log format on stderr.")
def main(home_path: str | None, log_format: str | None) -> None:
    """Run a Dorothy node in the foreground until SIGINT or SIGTERM."""
    os.umask(0o077)  # every file the daemon creates is owner-only
    home = Home(resolve_home(home_path))
    try:
        if home.root.is_dir():
            _lock_home(home)
        node = load_node(home, log_format)
    except (StartupError, ConfigError, KeysError) as exc:
        click.echo(f"dorothyd: {exc}", err=True)
        sys.exit(1)
    except LedgerError as exc:
        click.echo(
            f"dorothyd: {home.ledger_dir / 'ledger.bin'} is damaged ({exc}); it was left as it is."
            f" Inspect it with: dorothy ledger verify --home {home.root}",
            err=True,
        )
        sys.exit(1)
    tuning.apply()
    trio.run(_main, node)
