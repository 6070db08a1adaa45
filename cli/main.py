"""`dorothy`: the operator's commands. Each one parses its arguments, calls
the daemon (or, for keys, peers and the ledger, the library on the home's
files) and prints."""

import importlib

import click

from .common import Group

# Each command's module is imported when that command runs (or for help):
# `dorothy send` and `dorothy status` speak JSON over a socket, and loading
# every command's libraries took 112 ms of each start, against 35 for what
# they use (`python -X importtime`).
COMMANDS = {
    "cancel": "transfers:cancel",
    "demo": "demo:demo",
    "id": "node_cmds:show_id",
    "init": "node_cmds:init",
    "ledger": "ledger_cmds:ledger",
    "peer": "peers:peer",
    "send": "transfers:send",
    "status": "transfers:status",
}


class Commands(Group):
    def list_commands(self, ctx) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), attribute)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Dorothy: secure peer-to-peer transfer of digital evidence."""
