"""`dorothy`: the operator's commands. Each one parses its arguments, calls
the daemon (or, for keys, peers and the ledger, the library on the home's
files) and prints."""

import click

from .common import Group
from .demo import demo
from .ledger_cmds import ledger
from .node_cmds import init, show_id
from .peers import peer
from .transfers import cancel, send, status


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Dorothy: secure peer-to-peer transfer of digital evidence."""


for command in (init, show_id, peer, send, status, cancel, ledger, demo):
    main.add_command(command)
