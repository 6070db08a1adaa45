"""The layout of a node's home directory, in one place.

    HOME/node.key        the node identity (0600)
    HOME/dorothy.toml    configuration
    HOME/peers.json      the trust store
    HOME/state.db        the durable queue and transfer state (sqlite, WAL)
    HOME/ledger/         the append-only, signed transfer ledger
    HOME/partial/<id>/files/  incoming transfers as they arrive
    HOME/inbox/<peer>/<id>/  completed, verified incoming transfers
    HOME/control.sock    the daemon's control socket (0600)
"""

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "~/.dorothy"


def resolve_home(path: str | None) -> Path:
    return Path(path or os.environ.get("DOROTHY_HOME") or DEFAULT_HOME).expanduser().absolute()


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def key_file(self) -> Path:
        return self.root / "node.key"

    @property
    def config_file(self) -> Path:
        return self.root / "dorothy.toml"

    @property
    def trust_file(self) -> Path:
        return self.root / "peers.json"

    @property
    def state_db(self) -> Path:
        return self.root / "state.db"

    @property
    def ledger_dir(self) -> Path:
        return self.root / "ledger"

    @property
    def partial_dir(self) -> Path:
        return self.root / "partial"

    @property
    def inbox_dir(self) -> Path:
        return self.root / "inbox"

    def peer_inbox(self, peer: str) -> Path:
        """Where transfers received from `peer` are published."""
        return self.inbox_dir / peer

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    def exists(self) -> bool:
        return self.key_file.exists()
