"""The manifest: what a transfer carries, signed by its sender.

A manifest binds a transfer id to its content (paths, sizes, modification
times, chunk size) and to both ends (sender and intended receiver keys), so
it cannot be replayed to another node or altered in flight. It is sent as a
signed envelope (see signed.py); its hash is SHA-256 of the body bytes.
"""

from dataclasses import dataclass
from hashlib import sha256
from typing import NamedTuple

from . import signed
from .codec import Fields, pack, unpack
from .errors import RemoteProtocolError
from .paths import MAX_PATH_BYTES, check_collisions, quoted, validate_path

MANIFEST_VERSION = 1
# 2 MiB chunks: large enough that per-chunk overhead (a message header, an
# AEAD call, thread hops and wake-ups on both nodes) is small against
# hashing and copying it, and small enough that a window of them keeps
# memory flat (SPEC.md 4.2 has the measurements).
DEFAULT_CHUNK_SIZE = 1 << 21
MIN_CHUNK_SIZE = 1 << 16
MAX_CHUNK_SIZE = 1 << 22
# Bounds for one transfer: the file list must fit one frame, and the have-map
# of a resume (one bit per chunk) must too.
MAX_FILES = 100_000
MAX_FILE_SIZE = 1 << 50
MAX_TOTAL_CHUNKS = 1 << 26
MAX_MANIFEST_BYTES = 15 * 1024 * 1024
TRANSFER_ID_LEN = 16
NODE_KEY_LEN = 64  # Ed25519 public key || X25519 public key


class FileEntry(NamedTuple):
    # A tuple, not a frozen dataclass: an offer of 10,000 files builds
    # 10,000 of them, and the dataclass's __init__ was a quarter of checking it.
    path: str
    size: int
    mtime_ns: int

    def chunk_count(self, chunk_size: int) -> int:
        return -(-self.size // chunk_size)


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    transfer_id: bytes
    sender: bytes  # sign_public || dh_public
    receiver: bytes
    created: str  # RFC 3339 UTC
    chunk_size: int
    files: tuple[FileEntry, ...]

    @property
    def sender_sign_public(self) -> bytes:
        return self.sender[:32]

    @property
    def sender_dh_public(self) -> bytes:
        return self.sender[32:]

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def chunk_count(self, file_index: int) -> int:
        return self.files[file_index].chunk_count(self.chunk_size)

    def chunk_length(self, file_index: int, chunk_index: int) -> int:
        size = self.files[file_index].size
        return min(self.chunk_size, size - chunk_index * self.chunk_size)

    def chunk_bases(self) -> list[int]:
        """Global index of each file's first chunk: the have-map's layout."""
        bases, total = [], 0
        for entry in self.files:
            bases.append(total)
            total += entry.chunk_count(self.chunk_size)
        return bases

    @property
    def total_chunks(self) -> int:
        return sum(entry.chunk_count(self.chunk_size) for entry in self.files)

    def encode(self) -> bytes:
        return pack(
            {
                "v": MANIFEST_VERSION,
                "transfer_id": self.transfer_id,
                "sender": self.sender,
                "receiver": self.receiver,
                "created": self.created,
                "chunk_size": self.chunk_size,
                "files": [[entry.path, entry.size, entry.mtime_ns] for entry in self.files],
            }
        )


def validate_manifest(manifest: Manifest) -> None:
    """Both ends run this: the sender before signing (so an operator hears
    about a bad name at `dorothy send`), the receiver before creating anything."""
    def bad(message):
        return RemoteProtocolError(message, code="bad_manifest")

    if len(manifest.transfer_id) != TRANSFER_ID_LEN:
        raise bad("transfer id must be 16 bytes")
    if len(manifest.sender) != NODE_KEY_LEN or len(manifest.receiver) != NODE_KEY_LEN:
        raise bad("sender and receiver keys must be 64 bytes")
    chunk = manifest.chunk_size
    if not MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE or chunk & (chunk - 1):
        raise bad(f"chunk size {chunk} is not a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
    if not manifest.files:
        raise bad("a transfer needs at least one file")
    if len(manifest.files) > MAX_FILES:
        raise bad(f"{len(manifest.files)} files exceed the limit of {MAX_FILES} per transfer")
    for entry in manifest.files:
        validate_path(entry.path)
        if not 0 <= entry.size <= MAX_FILE_SIZE:
            raise bad(f"file {quoted(entry.path)} declares size {entry.size}")
    check_collisions([entry.path for entry in manifest.files])
    if manifest.total_chunks > MAX_TOTAL_CHUNKS:
        raise bad(f"transfer has {manifest.total_chunks} chunks; the limit is {MAX_TOTAL_CHUNKS}")


def sign_manifest(manifest: Manifest, sign) -> bytes:
    return signed.seal(signed.MANIFEST_DOMAIN, manifest.encode(), sign)


def manifest_hash(body: bytes) -> bytes:
    return sha256(body).digest()


def open_manifest(envelope: bytes) -> tuple[Manifest, bytes]:
    """Decode, validate and verify a signed manifest against the sender key
    it names. Returns the manifest and its hash. The caller still checks that
    the sender is the authenticated peer and the receiver is itself."""
    body, signature = signed.split(envelope, "manifest", MAX_MANIFEST_BYTES)
    fields = Fields(unpack(body, "manifest"), "manifest")
    if fields.int("v", 0, 255) != MANIFEST_VERSION:
        raise RemoteProtocolError(f"unsupported manifest version {fields.map['v']}", code="bad_manifest")
    sender = fields.bytes("sender", length=NODE_KEY_LEN)
    signed.verify(signed.MANIFEST_DOMAIN, body, signature, sender[:32], "manifest")
    files = []
    for item in fields.list("files", max_len=MAX_FILES):
        if not (isinstance(item, list) and len(item) == 3):
            raise RemoteProtocolError("manifest file entry is not [path, size, mtime_ns]", code="bad_manifest")
        path, size, mtime_ns = item
        if type(path) is not str or len(path) > MAX_PATH_BYTES:  # characters bound bytes from below
            raise RemoteProtocolError("manifest path is not a bounded string", code="bad_path")
        if type(size) is not int or type(mtime_ns) is not int or not -(1 << 63) <= mtime_ns < (1 << 63):
            raise RemoteProtocolError(f"manifest entry for {quoted(path)} has a bad size or mtime", code="bad_manifest")
        files.append(FileEntry(path, size, mtime_ns))
    manifest = Manifest(
        transfer_id=fields.bytes("transfer_id", length=TRANSFER_ID_LEN),
        sender=sender,
        receiver=fields.bytes("receiver", length=NODE_KEY_LEN),
        created=fields.time("created"),
        chunk_size=fields.int("chunk_size", 0, MAX_CHUNK_SIZE),
        files=tuple(files),
    )
    validate_manifest(manifest)
    if manifest.encode() != body:
        # One meaning per signed byte string: a repeated key or another
        # encoder's choices could make two decoders read different manifests.
        raise RemoteProtocolError("manifest is not in canonical encoding", code="bad_manifest")
    return manifest, manifest_hash(body)
