"""Creating a node home: identity, configuration, ledger. `dorothy init`
is a thin wrapper around this."""

import os

from ..keys.identity import NodeIdentity
from ..keys.truststore import validate_peer_name
from .config import parse_listen, render_config
from .home import Home
from .ledger import Ledger
from .clock import utc_now


class HomeExists(Exception):
    pass


def create_home(home: Home, name: str, listen: str, passphrase: bytes | None = None) -> NodeIdentity:
    validate_peer_name(name)
    parse_listen(listen)
    if home.exists() or home.config_file.exists():
        raise HomeExists(f"{home.root} already holds a Dorothy node; refusing to overwrite it")
    home.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home.root, 0o700)
    identity = NodeIdentity.generate()
    identity.save(home.key_file, passphrase)
    home.config_file.write_text(render_config(name, listen))
    ledger = Ledger.open(home.ledger_dir, identity, now=utc_now)
    ledger.append("node_created", {"name": name, "node_key": str(identity.node_key)})
    ledger.close()
    return identity
