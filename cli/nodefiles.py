"""The home's identity and ledger, for the commands that open them. Apart
from common.py: `send` and `status` need neither, and these imports
(libsodium, the ledger) would be most of their start-up."""

import os

from ..dorothyd.clock import utc_now
from ..dorothyd.home import Home
from ..dorothyd.ledger import Ledger
from ..keys.identity import NodeIdentity


def load_identity(home: Home) -> NodeIdentity:
    passphrase = os.environ.get("DOROTHY_PASSPHRASE")
    return NodeIdentity.load(home.key_file, passphrase.encode() if passphrase else None)


def open_ledger(home: Home) -> Ledger:
    return Ledger.open(home.ledger_dir, load_identity(home), now=utc_now)
