"""`dorothy init` and `dorothy id`: creating a node and showing who it is."""

import os

import click

from ..dorothyd.config import load_config, parse_listen
from ..dorothyd.provision import HomeExists, create_home
from .client import ClientError
from .common import emit, existing_home, get_home, home_option
from .nodefiles import load_identity


@click.command()
@home_option
@click.option("--name", required=True, help="This node's name (letters, digits, '.', '_', '-').")
@click.option("--listen", default="127.0.0.1:7420", show_default=True, metavar="HOST:PORT")
def init(home_path, name, listen):
    """Create a node home: identity keys, configuration, empty trust store, ledger."""
    home = get_home(home_path)
    try:
        parse_listen(listen)
    except ValueError as exc:
        raise ClientError(f"--listen: {exc}") from None
    passphrase = os.environ.get("DOROTHY_PASSPHRASE")
    try:
        identity = create_home(home, name, listen, passphrase.encode() if passphrase else None)
    except HomeExists as exc:
        raise ClientError(str(exc)) from None
    click.echo(f"created node {name} in {home.root}")
    click.echo(f"node key:    {identity.node_key}")
    click.echo(f"fingerprint: {identity.node_key.fingerprint()}")


@click.command("id")
@home_option
@click.option("--json", "as_json", is_flag=True)
def show_id(home_path, as_json):
    """Print this node's name, node key and fingerprint."""
    home = existing_home(home_path)
    config = load_config(home.config_file)
    identity = load_identity(home)
    info = {"name": config.name, "node_key": str(identity.node_key), "fingerprint": identity.node_key.fingerprint()}
    if as_json:
        emit(info)
    else:
        click.echo(f"name:        {info['name']}\nnode key:    {info['node_key']}\nfingerprint: {info['fingerprint']}")

