"""What every command shares: the --home option, error reporting, and
access to the home's identity and ledger."""

import json
import os
import sys

import click

from ..dorothyd.config import ConfigError
from ..dorothyd.home import Home, resolve_home
from ..dorothyd.audit import AuditError
from ..dorothyd.ledger import Ledger, LedgerError
from ..dorothyd.note import NoteError
from ..dorothyd.clock import utc_now
from ..keys.errors import KeysError
from ..keys.identity import NodeIdentity
from .client import ClientError

# Everything Dorothy creates in a home (keys, state, ledger, evidence) is
# for its owner alone.
OWNER_ONLY = 0o077

USER_ERRORS = (ClientError, KeysError, ConfigError, LedgerError, AuditError, NoteError, OSError, ValueError)


class Group(click.Group):
    """Turns every known error into one line on stderr; never a traceback."""

    def invoke(self, ctx):
        previous = os.umask(OWNER_ONLY)
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
            click.echo(f"dorothy: {where}{message}", err=True)
            sys.exit(1)
        finally:
            os.umask(previous)


def home_option(command):
    return click.option(
        "--home",
        "home_path",
        metavar="PATH",
        envvar="DOROTHY_HOME",
        help="Node home (default: $DOROTHY_HOME or ~/.dorothy).",
    )(command)


def get_home(home_path: str | None) -> Home:
    return Home(resolve_home(home_path))


def existing_home(home_path: str | None) -> Home:
    home = get_home(home_path)
    if not home.exists():
        raise ClientError(f"{home.root} is not a Dorothy home; create one with: dorothy init --home {home.root} --name NAME")
    return home


def load_identity(home: Home) -> NodeIdentity:
    passphrase = os.environ.get("DOROTHY_PASSPHRASE")
    return NodeIdentity.load(home.key_file, passphrase.encode() if passphrase else None)


def open_ledger(home: Home) -> Ledger:
    return Ledger.open(home.ledger_dir, load_identity(home), now=utc_now)


def emit(obj) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=True))


