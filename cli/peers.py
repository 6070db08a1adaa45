"""`dorothy peer ...`: the trust store. Changes are files under the home,
picked up by a running daemon at its next handshake, and every change is
recorded in the ledger."""

import click

from ..keys.nodekey import NodeKey
from ..keys.truststore import TrustStore
from ..protocol.paths import escape
from .common import emit, existing_home, home_option
from .nodefiles import open_ledger


def _store_and_ledger(home_path):
    home = existing_home(home_path)
    return TrustStore(home.trust_file), open_ledger(home)


@click.group()
def peer():
    """Manage the peers this node trusts."""


@peer.command("add")
@home_option
@click.argument("name")
@click.argument("address", metavar="HOST:PORT")
@click.argument("node_key")
def add(home_path, name, address, node_key):
    """Trust a peer. Compare its fingerprint with its operator out of band."""
    store, ledger = _store_and_ledger(home_path)
    added = store.add(name, address, NodeKey.decode(node_key))
    ledger.append(
        "peer_added",
        {"name": added.name, "address": added.address, "node_key": str(added.node_key), "fingerprint": added.node_key.fingerprint()},
    )
    click.echo(f"added peer {escape(added.name)} at {escape(added.address)}")
    click.echo(f"fingerprint: {added.node_key.fingerprint()}  (confirm it with the peer's operator)")


@peer.command("replace")
@home_option
@click.argument("name")
@click.argument("node_key")
@click.option("--address", metavar="HOST:PORT", help="Also change the peer's address.")
def replace(home_path, name, node_key, address):
    """Explicitly replace a peer's key (after a confirmed key change)."""
    store, ledger = _store_and_ledger(home_path)
    old, new = store.replace(name, address, NodeKey.decode(node_key))
    ledger.append("peer_key_changed", {"name": new.name, "old_node_key": str(old.node_key), "new_node_key": str(new.node_key)})
    click.echo(f"replaced the key of peer {escape(new.name)}; new fingerprint: {new.node_key.fingerprint()}")


@peer.command("remove")
@home_option
@click.argument("name")
def remove(home_path, name):
    """Stop trusting a peer."""
    store, ledger = _store_and_ledger(home_path)
    removed = store.remove(name)
    ledger.append("peer_removed", {"name": removed.name, "node_key": str(removed.node_key)})
    click.echo(f"removed peer {escape(removed.name)}")


@peer.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True)
def list_peers(home_path, as_json):
    """List trusted peers."""
    home = existing_home(home_path)
    peers = [
        {"name": p.name, "address": p.address, "node_key": str(p.node_key), "fingerprint": p.node_key.fingerprint()}
        for p in TrustStore(home.trust_file).list()
    ]
    if as_json:
        emit(peers)
    elif not peers:
        click.echo("no peers; add one with: dorothy peer add NAME HOST:PORT NODE_KEY")
    for p in [] if as_json else peers:
        click.echo(f"{escape(p['name'])}\t{escape(p['address'])}\t{p['fingerprint']}\t{p['node_key']}")
