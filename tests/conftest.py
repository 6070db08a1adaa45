"""Shared fixtures: in-process nodes in temporary homes."""

import dataclasses

import pytest

from dorothy.dorothyd.home import Home
from dorothy.dorothyd.main import load_node
from dorothy.dorothyd.provision import create_home


@pytest.fixture
def make_node(tmp_path):
    """make_node(name, **config overrides) -> a loaded Node (no services running)."""
    nodes = []

    def make(name: str, **config):
        home = Home(tmp_path / f"{name}-{len(nodes)}")
        create_home(home, name, "127.0.0.1:0")
        node = load_node(home, "text")
        if config:
            node.config = dataclasses.replace(node.config, **config)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.store.close()
        node.ledger.close()


def introduce(*nodes) -> None:
    """Every node trusts every other (addresses are unused in-process)."""
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.trust.add(other.config.name, "127.0.0.1:9", other.node_key)


def add_transfer(store, *, files: list, **row) -> None:
    """A transfer and its file rows, as the daemon adds them (rows first)."""
    store.add_files(row["id"], 0, files)
    store.add_transfer_row(bytes_total=sum(f[2] for f in files), **row)
