"""The peers this node trusts: a name, an address and a node key for each.

File format (HOME/peers.json), written by Dorothy, readable by people::

    {"version": 1,
     "peers": [{"name": "lab-b", "address": "10.0.0.2:7000",
                "node_key": "dnk1..."}]}

Entries are kept sorted by name. A missing file is an empty store.

Unknown key versus changed key: the store is keyed by both name and key.
The daemon looks up an incoming handshake by the key it presents
(`find_by_dh_key`), never by the name it claims. A peer whose key changed
(reinstalled, or an impostor) therefore simply is not found and is refused,
exactly like a stranger, until an operator who has checked the new key's
fingerprint runs `dorothy peer replace`. Nothing ever updates a key on its
own.

Two processes use the store at once: the CLI changes it while the daemon
reads it on every handshake. Changes are read-modify-write under an
exclusive `flock` on a sibling lock file, so two writers never lose each
other's update, and each write replaces the file atomically, so readers need
no lock and always see a whole file, either the old one or the new one.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import KeysError, quoted
from .fileutil import OWNER_ONLY_MODE, replace_file, read_guarded_file
from .nodekey import NodeKey

STORE_VERSION = 1
ENTRY_FIELDS = frozenset({"name", "address", "node_key"})
DOCUMENT_FIELDS = frozenset({"version", "peers"})

# An entry is about 200 bytes, so this is room for thousands of peers, while
# a file of unknown origin cannot make every handshake read megabytes.
MAX_STORE_BYTES = 1024 * 1024

# Whoever can write the trust store decides whom this node believes, so it
# must be writable by its owner alone. Reading it reveals only public keys.
FORBIDDEN_MODE_BITS = 0o022
WHY_OWNER_ONLY = "the trust store must be writable only by its owner"

# The peer name becomes a directory under the inbox: a conservative portable
# file name that cannot be ".", "..", hidden, or contain a path separator.
PEER_NAME_MAX = 64
_PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# DNS limits (RFC 1035): 63 bytes a label, 253 for the whole name. Underscores
# are tolerated because internal networks use them.
HOSTNAME_MAX = 253
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_IPV4_LIKE = re.compile(r"[0-9.]+")
_PORT = re.compile(r"[0-9]{1,5}")
MIN_PORT = 1  # port 0 means "any port" to the OS: it cannot be dialled
MAX_PORT = 65535

_ADDRESS_HINT = "write it as host:port, e.g. 10.0.0.2:7000 or [2001:db8::2]:7000"


def validate_peer_name(name: str) -> str:
    """Return `name` if it can name a peer, else raise KeysError saying why."""
    if not isinstance(name, str):
        raise TypeError(f"a peer name is text, not {type(name).__name__}")
    if not name:
        raise KeysError("a peer name cannot be empty")
    if len(name) > PEER_NAME_MAX:
        raise KeysError(
            f"peer name {quoted(name)} is too long: {len(name)} characters, "
            f"at most {PEER_NAME_MAX}"
        )
    if not _PEER_NAME.fullmatch(name):
        raise KeysError(
            f"invalid peer name {quoted(name)}: use letters, digits, '.', '_' "
            "and '-', starting with a letter or digit (it names a folder)"
        )
    return name


def parse_address(text: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[addr]:port") into (host, port)."""
    if not isinstance(text, str):
        raise TypeError(f"an address is text, not {type(text).__name__}")
    if not text:
        raise KeysError(f"an address cannot be empty; {_ADDRESS_HINT}")
    shown = quoted(text)
    if any(char.isspace() or not char.isprintable() for char in text):
        raise KeysError(f"address {shown} contains a space or control character")
    if text.startswith("["):
        host, port_text = _split_bracketed(text, shown)
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise KeysError(f"address {shown} has no port; {_ADDRESS_HINT}")
        if ":" in host:
            raise KeysError(
                f"address {shown}: an IPv6 address must be in brackets, "
                "e.g. [2001:db8::2]:7000"
            )
        _check_host(host, shown)
    return host, _parse_port(port_text, shown)


def _split_bracketed(text: str, shown: str) -> tuple[str, str]:
    end = text.find("]")
    if end < 0:
        raise KeysError(f"address {shown} has '[' but no ']'")
    host, after = text[1:end], text[end + 1 :]
    try:
        ipaddress.IPv6Address(host)
    except ValueError as err:
        raise KeysError(
            f"address {shown}: {quoted(host)} in brackets is not an IPv6 address"
        ) from err
    if not after.startswith(":"):
        raise KeysError(f"address {shown} has no port after ']'; {_ADDRESS_HINT}")
    return host, after[1:]


def _check_host(host: str, shown: str) -> None:
    if not host:
        raise KeysError(f"address {shown} has no host; {_ADDRESS_HINT}")
    if _IPV4_LIKE.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as err:
            raise KeysError(f"address {shown}: {quoted(host)} is not an IPv4 address") from err
        return
    labels = host.removesuffix(".").split(".")
    if len(host) > HOSTNAME_MAX or not all(map(_HOST_LABEL.fullmatch, labels)):
        raise KeysError(f"address {shown}: {quoted(host)} is not a valid host name")


def _parse_port(port_text: str, shown: str) -> int:
    if not _PORT.fullmatch(port_text) or not MIN_PORT <= int(port_text) <= MAX_PORT:
        raise KeysError(
            f"address {shown}: the port must be a number from {MIN_PORT} to {MAX_PORT}"
        )
    return int(port_text)


@dataclass(frozen=True, slots=True)
class Peer:
    """A trusted peer. Construction validates the name and the address."""

    name: str
    address: str  # "host:port", IPv6 as "[addr]:port"
    node_key: NodeKey

    def __post_init__(self) -> None:
        validate_peer_name(self.name)
        parse_address(self.address)
        if not isinstance(self.node_key, NodeKey):
            raise TypeError("node_key must be a NodeKey")

    @property
    def host(self) -> str:
        """The host to dial; an IPv6 address without its brackets."""
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]


@dataclass(frozen=True)
class _Snapshot:
    """One version of the store's content, indexed for the lookups we make."""

    by_name: dict[str, Peer]
    by_dh: dict[bytes, Peer]
    by_sign: dict[bytes, Peer]

    @classmethod
    def of(cls, peers: Iterable[Peer]) -> _Snapshot:
        """Index `peers`; ValueError if a name or a key appears twice."""
        snapshot = cls({}, {}, {})
        folded: dict[str, Peer] = {}
        for peer in peers:
            clash = folded.get(peer.name.lower())
            if clash:
                raise ValueError(f"the name {quoted(peer.name)} appears twice")
            clash = _key_holder(snapshot, peer.node_key)
            if clash:
                raise ValueError(
                    f"peers {quoted(clash.name)} and {quoted(peer.name)} have the same key"
                )
            folded[peer.name.lower()] = peer
            snapshot.by_name[peer.name] = peer
            snapshot.by_dh[peer.node_key.dh_public] = peer
            snapshot.by_sign[peer.node_key.sign_public] = peer
        return snapshot


def _key_holder(snapshot: _Snapshot, node_key: NodeKey) -> Peer | None:
    """The peer holding either half of `node_key`.

    Either half is enough to clash: two entries sharing an X25519 key would
    make a lookup by that key ambiguous.
    """
    return snapshot.by_sign.get(node_key.sign_public) or snapshot.by_dh.get(
        node_key.dh_public
    )


_Result = TypeVar("_Result")


class TrustStore:
    """The trust store file at `path`, shared safely with other processes.

    Every read checks the file, so a change made by another process (the
    CLI) is seen by the next call, with no restart. The check is a small
    bounded read compared with the bytes last parsed; only a changed file is
    parsed again, which keeps the per-handshake lookup cheap. Comparing
    content rather than (mtime, size, inode) is deliberate: a same-size
    rewrite within one timestamp tick that reuses a freed inode number would
    fool a stat-based check, and the stale view would last until the next
    change.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # A sibling, never deleted: removing a lock file lets two processes
        # each lock a different file of the same name.
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        # (raw bytes, parsed content), replaced as one value so that threads
        # never see bytes paired with another version's content.
        self._cache: tuple[bytes | None, _Snapshot] = (None, _Snapshot.of(()))

    def list(self) -> list[Peer]:
        """All trusted peers, sorted by name."""
        return sorted(self._current().by_name.values(), key=lambda peer: peer.name)

    def get(self, name: str) -> Peer:
        peer = self._current().by_name.get(name)
        if peer is None:
            raise KeysError(f"no peer named {quoted(name)}; see 'dorothy peer list'")
        return peer

    def find_by_dh_key(self, dh_public: bytes) -> Peer | None:
        """The peer whose X25519 key is `dh_public`, if trusted."""
        return self._current().by_dh.get(dh_public)

    def find_by_node_key(self, node_key: NodeKey) -> Peer | None:
        """The peer whose node key is exactly `node_key` (both halves)."""
        peer = self._current().by_sign.get(node_key.sign_public)
        return peer if peer is not None and peer.node_key == node_key else None

    def add(self, name: str, address: str, node_key: NodeKey) -> Peer:
        """Trust a new peer. Its name and its key must both be new."""
        new = Peer(name, address, node_key)

        def change(snapshot: _Snapshot, peers: dict[str, Peer]) -> Peer:
            existing = _same_name(peers, name)
            if existing:
                raise KeysError(
                    f"a peer named {quoted(existing.name)} already exists; use "
                    "'dorothy peer replace' to change its key or address"
                )
            _refuse_key_in_use(snapshot, node_key, allowed_name=None)
            peers[name] = new
            return new

        return self._modify(change)

    def replace(
        self, name: str, address: str | None, node_key: NodeKey
    ) -> tuple[Peer, Peer]:
        """Give an existing peer a new key (and address); return (old, new).

        This is the operator's explicit acceptance of a changed key. The
        address is kept when `address` is None.
        """

        def change(snapshot: _Snapshot, peers: dict[str, Peer]) -> tuple[Peer, Peer]:
            old = peers.get(name)
            if old is None:
                raise KeysError(f"no peer named {quoted(name)}; see 'dorothy peer list'")
            new = Peer(name, old.address if address is None else address, node_key)
            _refuse_key_in_use(snapshot, node_key, allowed_name=name)
            peers[name] = new
            return old, new

        return self._modify(change)

    def remove(self, name: str) -> Peer:
        """Stop trusting a peer; return its entry."""

        def change(snapshot: _Snapshot, peers: dict[str, Peer]) -> Peer:
            removed = peers.pop(name, None)
            if removed is None:
                raise KeysError(f"no peer named {quoted(name)}; see 'dorothy peer list'")
            return removed

        return self._modify(change)

    def _current(self) -> _Snapshot:
        data = read_guarded_file(
            self.path,
            what="trust store",
            max_bytes=MAX_STORE_BYTES,
            forbidden_mode_bits=FORBIDDEN_MODE_BITS,
            why_owner_only=WHY_OWNER_ONLY,
            missing_ok=True,
        )
        cached_data, snapshot = self._cache
        if data != cached_data:
            snapshot = _Snapshot.of(()) if data is None else _parse(data, self.path)
            self._cache = (data, snapshot)
        return snapshot

    def _modify(
        self, change: Callable[[_Snapshot, dict[str, Peer]], _Result]
    ) -> _Result:
        """Read, change and write the store while holding the lock."""
        with self._locked():
            snapshot = self._current()
            peers = dict(snapshot.by_name)
            result = change(snapshot, peers)
            data = _serialize(peers.values())
            replace_file(self.path, data)
            self._cache = (data, _Snapshot.of(peers.values()))
        return result

    @contextmanager
    def _locked(self) -> Iterator[None]:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self._lock_path, flags, OWNER_ONLY_MODE)
        except OSError as err:
            raise KeysError(
                f"cannot open lock file {quoted(str(self._lock_path), None)}: "
                f"{err.strerror or err}"
            ) from err
        try:
            # Blocks until the other writer is done; writes take milliseconds.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def _same_name(peers: dict[str, Peer], name: str) -> Peer | None:
    # Names that differ only in case are refused: on a case-insensitive
    # filesystem their inbox folders would be one folder.
    folded = name.lower()
    return next((peer for peer in peers.values() if peer.name.lower() == folded), None)


def _refuse_key_in_use(
    snapshot: _Snapshot, node_key: NodeKey, allowed_name: str | None
) -> None:
    holder = _key_holder(snapshot, node_key)
    if holder is not None and holder.name != allowed_name:
        raise KeysError(
            f"this node key is already trusted as peer {quoted(holder.name)}; "
            "one node cannot be two peers"
        )


def _serialize(peers: Iterable[Peer]) -> bytes:
    entries = [
        {"name": peer.name, "address": peer.address, "node_key": peer.node_key.encode()}
        for peer in sorted(peers, key=lambda peer: peer.name)
    ]
    document = {"version": STORE_VERSION, "peers": entries}
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def _parse(data: bytes, path: Path) -> _Snapshot:
    shown = f"trust store {quoted(str(path), None)}"
    try:
        document = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise KeysError(f"{shown} is damaged: it is not valid JSON") from err
    if not isinstance(document, dict) or "version" not in document:
        raise KeysError(f"{shown} is damaged: it is not a Dorothy trust store")
    version = document["version"]
    if type(version) is not int or version != STORE_VERSION:
        raise KeysError(
            f"{shown} has format version {quoted(str(version))}; "
            f"this Dorothy reads version {STORE_VERSION}"
        )
    if set(document) != DOCUMENT_FIELDS or not isinstance(document["peers"], list):
        raise KeysError(f"{shown} is damaged: it should hold a version and a list of peers")
    try:
        peers = [_peer_from_entry(entry) for entry in document["peers"]]
        return _Snapshot.of(peers)
    except (KeysError, ValueError) as err:
        raise KeysError(f"{shown} is damaged: {err}") from err


def _peer_from_entry(entry: object) -> Peer:
    if not isinstance(entry, dict) or set(entry) != ENTRY_FIELDS:
        raise ValueError("each peer needs exactly a name, an address and a node_key")
    if not all(isinstance(value, str) for value in entry.values()):
        raise ValueError("a peer's name, address and node_key must be strings")
    try:
        return Peer(entry["name"], entry["address"], NodeKey.decode(entry["node_key"]))
    except KeysError as err:
        raise ValueError(f"peer {quoted(entry['name'])}: {err}") from err
