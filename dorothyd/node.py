"""The node's shared context: identity, configuration, trust store, durable
state and ledger, and the registry of transfers running right now.

The services (listener, control server, outbox) each get this object; none
reaches into another's internals.
"""

from dataclasses import dataclass, field

import trio

from ..keys.identity import NodeIdentity
from ..keys.nodekey import NodeKey
from ..keys.truststore import Peer, TrustStore
from ..protocol.manifest import Manifest
from .config import Config
from .home import Home
from .ledger import Ledger
from .logs import log
from .note import NoteError, verify_checkpoint
from .storage import FileHashes
from .store import Store


# File rows per state-db transaction when a transfer is added: 10,000 take
# about 40 ms, the most the event loop waits on them at a time.
FILE_ROWS_PER_STEP = 10_000


def node_key_bytes(node_key: NodeKey) -> bytes:
    """The 64-byte form used inside manifests and receipts."""
    return node_key.sign_public + node_key.dh_public


@dataclass
class Running:
    """A transfer with a task working on it right now."""

    cancel_scope: trio.CancelScope
    bytes_done: int = 0
    cancelled_by_operator: bool = False
    # Set once the transfer is being completed or failed for good (receipt,
    # publication, ledger records): an operator's cancel is refused from
    # then on, since it could only race the ending and leave the state db
    # and the ledger telling different stories.
    ending: bool = False


@dataclass
class Node:
    home: Home
    config: Config
    identity: NodeIdentity
    trust: TrustStore
    store: Store
    ledger: Ledger
    running: dict[str, Running] = field(default_factory=dict)
    # Outbox retry schedule (trio clock) and the senders' SHA-256 state kept
    # across dropped connections; both are rebuilt after a restart.
    retry_at: dict[str, float] = field(default_factory=dict)
    sender_hashers: dict[str, dict] = field(default_factory=dict)
    # The receivers' counterpart, kept by an attempt that ended with every
    # chunk it wrote held: the next connection then reads nothing back.
    received_hashes: dict[str, FileHashes] = field(default_factory=dict)
    # The transfer queued last, as (id, manifest, manifest hash): its first
    # delivery, most often at once, need not decode and check again what
    # this node has just built, checked and signed (10,000 names: 60 ms).
    # One only, so that a queue waiting for an offline peer costs no memory.
    just_queued: tuple[str, Manifest, bytes] | None = None
    _ledger_lock: trio.Lock = field(default_factory=trio.Lock)
    _outbox_wakeup: trio.Event = field(default_factory=trio.Event)
    _updated: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self.store.on_update = self._transfer_updated

    def _transfer_updated(self, transfer_id: str) -> None:
        self._updated.set()
        self._updated = trio.Event()

    async def next_update(self) -> None:
        """Return once any transfer's row changes (state, progress, error):
        what lets `dorothy send --wait` return the moment a receipt is
        recorded instead of at its next poll."""
        await self._updated.wait()

    @property
    def node_key(self) -> NodeKey:
        return self.identity.node_key

    async def add_file_rows(self, transfer_id: str, files: list) -> None:
        """A new transfer's file rows, in steps of FILE_ROWS_PER_STEP with the
        event loop free between them (100,000 rows in one go held it for
        0.4 s, and every other connection with it). They stay invisible until
        the caller adds the transfer row (Store.add_transfer_row); rows a
        crash or an error leaves behind go at the next start."""
        for first in range(0, len(files), FILE_ROWS_PER_STEP):
            self.store.add_files(transfer_id, first, files[first : first + FILE_ROWS_PER_STEP])
            await trio.lowlevel.checkpoint()

    async def files(self, transfer_id: str) -> list:
        """A transfer's file rows (Store.files), read in steps as
        add_file_rows adds them: 100,000 in one read held the event loop
        0.2-0.4 s."""
        rows = []
        while step := self.store.files(transfer_id, first=rows[-1].idx + 1 if rows else 0, limit=FILE_ROWS_PER_STEP):
            rows.extend(step)
            await trio.lowlevel.checkpoint()
        return rows

    async def set_file_sha256(self, transfer_id: str, digests: list[bytes]) -> None:
        """Every file's SHA-256, in steps as add_file_rows (100,000 in one
        transaction held the event loop 0.45 s). Setting one again is harmless,
        so a crash between steps costs nothing but the redo."""
        for first in range(0, len(digests), FILE_ROWS_PER_STEP):
            step = digests[first : first + FILE_ROWS_PER_STEP]
            self.store.set_file_sha256(transfer_id, dict(enumerate(step, start=first)))
            await trio.lowlevel.checkpoint()

    async def record(self, event: str, fields: dict) -> None:
        """Append a ledger record; returns once it is fsync'd."""
        async with self._ledger_lock:
            await trio.to_thread.run_sync(self.ledger.append, event, fields)

    async def recorded(self, event: str, transfer_id: str) -> bool:
        async with self._ledger_lock:
            return await trio.to_thread.run_sync(self.ledger.recorded, event, transfer_id)

    async def checkpoint(self) -> str:
        async with self._ledger_lock:
            return await trio.to_thread.run_sync(self.ledger.checkpoint)

    async def keep_peer_checkpoint(self, peer: Peer, note: str) -> None:
        """Keep a peer's signed checkpoint, so that a peer that later rewrites
        its history contradicts what we hold. A bad note is logged, not fatal:
        the receipt itself was already verified."""
        try:
            verify_checkpoint(note, peer.node_key.sign_public)
        except NoteError as exc:
            log.warning("peer %s sent a checkpoint that does not verify: %s", peer.name, exc)
            return
        async with self._ledger_lock:
            await trio.to_thread.run_sync(self.ledger.store_peer_checkpoint, peer.name, note)

    def peer_for_static(self, dh_public: bytes) -> Peer | None:
        return self.trust.find_by_dh_key(dh_public)

    def wake_outbox(self) -> None:
        self._outbox_wakeup.set()

    async def outbox_wakeup(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._outbox_wakeup.wait()
        self._outbox_wakeup = trio.Event()
