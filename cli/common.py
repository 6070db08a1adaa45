"""What every command shares: the --home option, error reporting, and
access to the home's identity and ledger."""

import json
import os
import sys

import click

from ..dorothyd.home import Home, resolve_home
from .client import ClientError

# Everything Dorothy creates in a home (keys, state, ledger, evidence) is
# for its owner alone.
OWNER_ONLY = 0o077


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors shown as one line. Their modules are imported once one
    is raised, not at start-up: they are most of what a command such as
    `send` would otherwise load and never use."""
    from ..dorothyd.audit import AuditError
    from ..dorothyd.config import ConfigError
    from ..dorothyd.ledger import LedgerError
    from ..dorothyd.note import NoteError
    from ..keys.errors import KeysError

    return (ClientError, KeysError, ConfigError, LedgerError, AuditError, NoteError, OSError, ValueError)


class Group(click.Group):
    """Turns every known error into one line on stderr; never a traceback."""

    def invoke(self, ctx):
        previous = os.umask(OWNER_ONLY)
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own: usage errors, --help
        except Exception as exc:
            if not isinstance(exc, _user_errors()):
                raise
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


def emit(obj) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=True))


