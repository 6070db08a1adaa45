"""The node's private identity and the one file that keeps it.

Key file format, a msgpack map with a version so the format can grow::

    {"v": 1, "kind": "plain", "sign_seed": <32 bytes>, "dh_private": <32 bytes>}

or, protected by a passphrase::

    {"v": 1, "kind": "argon2id-secretbox", "salt": <16 bytes>,
     "opslimit": int, "memlimit": int, "box": SecretBox(<the plain map>)}

The box key is Argon2id(passphrase, salt, opslimit, memlimit); the cost is
stored in the file so it can be raised later without breaking old files. The
encrypted form seals the whole plain map, so after a successful decryption
its content is trusted exactly as a plain file's would be.

Like ssh, `load` refuses a key file that anyone but its owner can read: a
node key others could copy lets them impersonate this node to every peer.
"""

from pathlib import Path

import msgpack
import nacl.exceptions
import nacl.public
import nacl.pwhash.argon2id as argon2id
import nacl.secret
import nacl.signing
import nacl.utils

from . import ed25519
from .errors import KeysError, quoted
from .fileutil import create_new_file, read_guarded_file
from .nodekey import NodeKey

KEY_FILE_VERSION = 1
KIND_PLAIN = "plain"
KIND_ENCRYPTED = "argon2id-secretbox"
PLAIN_FIELDS = frozenset({"v", "kind", "sign_seed", "dh_private"})
ENCRYPTED_FIELDS = frozenset({"v", "kind", "salt", "opslimit", "memlimit", "box"})

SEED_BYTES = 32  # an Ed25519 seed
DH_PRIVATE_BYTES = 32  # an X25519 scalar

# A real key file is under 200 bytes; anything near this size is not one, and
# we refuse it before reading it into memory.
MAX_KEY_FILE_BYTES = 64 * 1024

# Any group or other permission bit: the file holds the private keys.
FORBIDDEN_MODE_BITS = 0o077
WHY_OWNER_ONLY = "the node key must be readable only by its owner"

# The passphrase is needed once per daemon start, so about a second of
# Argon2id (libsodium's "moderate": 3 passes over 256 MiB) is affordable and
# costs a password-guessing attacker the same second for every guess.
DEFAULT_OPSLIMIT = argon2id.OPSLIMIT_MODERATE
DEFAULT_MEMLIMIT = argon2id.MEMLIMIT_MODERATE

# The cost is read from the file, so it is bounded: a damaged or hostile file
# must not make `load` spend minutes or gigabytes. libsodium's "sensitive"
# preset (4 passes over 1 GiB) is the most `save` will write.
MIN_OPSLIMIT = argon2id.OPSLIMIT_MIN
MAX_OPSLIMIT = argon2id.OPSLIMIT_SENSITIVE
MIN_MEMLIMIT = argon2id.MEMLIMIT_MIN
MAX_MEMLIMIT = argon2id.MEMLIMIT_SENSITIVE

# First bytes of a msgpack map (fixmap, map16, map32): a file that starts
# otherwise was never a key file; one that does but fails to parse is damaged.
_MSGPACK_MAP_FIRST_BYTES = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


class NodeIdentity:
    """This node's private keys: an Ed25519 signing key and an X25519 key.

    The private key bytes never appear in repr() or str(); only the public
    fingerprint does, so an identity can be logged safely.
    """

    __slots__ = ("_signing_key", "_secret_key", "_dh_private", "_node_key")

    def __init__(self, signing_key: nacl.signing.SigningKey, dh_private: bytes):
        if not isinstance(signing_key, nacl.signing.SigningKey):
            raise TypeError("signing_key must be a nacl.signing.SigningKey")
        if not isinstance(dh_private, bytes) or len(dh_private) != DH_PRIVATE_BYTES:
            raise TypeError(f"dh_private must be {DH_PRIVATE_BYTES} bytes")
        self._signing_key = signing_key
        self._secret_key = ed25519.secret_key(signing_key.encode())
        self._dh_private = dh_private
        dh_public = nacl.public.PrivateKey(dh_private).public_key.encode()
        self._node_key = NodeKey(signing_key.verify_key.encode(), dh_public)

    @classmethod
    def generate(cls) -> "NodeIdentity":
        """Fresh keys from libsodium's random generator."""
        dh_private = nacl.public.PrivateKey.generate().encode()
        return cls(nacl.signing.SigningKey.generate(), dh_private)

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        return self._signing_key

    @property
    def dh_private(self) -> bytes:
        return self._dh_private

    @property
    def node_key(self) -> NodeKey:
        """The public half, to hand to peers."""
        return self._node_key

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached Ed25519 signature of `message`."""
        return ed25519.sign(self._secret_key, message)

    def __repr__(self) -> str:
        return f"<NodeIdentity fingerprint {self._node_key.fingerprint()!r}>"

    def save(
        self,
        path: str | Path,
        passphrase: bytes | None = None,
        *,
        opslimit: int = DEFAULT_OPSLIMIT,
        memlimit: int = DEFAULT_MEMLIMIT,
    ) -> None:
        """Write a new key file at `path`, owner-only; never overwrite one.

        Overwriting a node key would silently cut this node off from every
        peer that trusts it, so an existing file is an error. With a
        passphrase the keys are sealed with Argon2id and SecretBox; tests may
        lower `opslimit`/`memlimit`, down to libsodium's minimum.
        """
        plain = msgpack.packb(
            {
                "v": KEY_FILE_VERSION,
                "kind": KIND_PLAIN,
                "sign_seed": self._signing_key.encode(),
                "dh_private": self._dh_private,
            }
        )
        if passphrase is None:
            data = plain
        else:
            data = _seal(plain, passphrase, opslimit, memlimit)
        create_new_file(Path(path), data)

    @classmethod
    def load(cls, path: str | Path, passphrase: bytes | None = None) -> "NodeIdentity":
        """Read a key file written by `save`.

        A passphrase given for a plain file is ignored, so a caller can pass
        one whenever the operator has configured it.
        """
        path = Path(path)
        fields = _read_outer_map(path)
        if fields["kind"] == KIND_ENCRYPTED:
            if passphrase is None:
                raise KeysError(
                    f"{_shown(path)} is passphrase-protected: a passphrase is required"
                )
            fields = _unseal(fields, passphrase, path)
        return cls(
            nacl.signing.SigningKey(fields["sign_seed"]), fields["dh_private"]
        )

    @staticmethod
    def is_encrypted(path: str | Path) -> bool:
        """Whether the key file at `path` needs a passphrase to load.

        It applies the same checks as `load`, so a too-open or damaged file
        is reported before the operator is asked for a passphrase.
        """
        return _read_outer_map(Path(path))["kind"] == KIND_ENCRYPTED


is_encrypted = NodeIdentity.is_encrypted


def _shown(path: Path) -> str:
    return f"key file {quoted(str(path), None)}"


def _check_passphrase(passphrase: object) -> bytes:
    if not isinstance(passphrase, bytes):
        raise TypeError("the passphrase must be bytes")
    return passphrase


def _check_cost(opslimit: object, memlimit: object) -> str | None:
    """Why this Argon2id cost is unacceptable, or None if it is fine."""
    for name, value, low, high in (
        ("opslimit", opslimit, MIN_OPSLIMIT, MAX_OPSLIMIT),
        ("memlimit", memlimit, MIN_MEMLIMIT, MAX_MEMLIMIT),
    ):
        if type(value) is not int or not low <= value <= high:
            return f"Argon2id {name} must be an integer from {low} to {high}"
    return None


def _box_key(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE,
        passphrase,
        salt,
        opslimit=opslimit,
        memlimit=memlimit,
    )


def _seal(plain: bytes, passphrase: bytes, opslimit: int, memlimit: int) -> bytes:
    if not _check_passphrase(passphrase):
        raise KeysError("an empty passphrase protects nothing; give a real one or none")
    problem = _check_cost(opslimit, memlimit)
    if problem:
        raise KeysError(problem)
    salt = nacl.utils.random(argon2id.SALTBYTES)
    box = nacl.secret.SecretBox(_box_key(passphrase, salt, opslimit, memlimit))
    return msgpack.packb(
        {
            "v": KEY_FILE_VERSION,
            "kind": KIND_ENCRYPTED,
            "salt": salt,
            "opslimit": opslimit,
            "memlimit": memlimit,
            "box": bytes(box.encrypt(plain)),
        }
    )


def _unseal(fields: dict, passphrase: bytes, path: Path) -> dict:
    key = _box_key(
        _check_passphrase(passphrase),
        fields["salt"],
        fields["opslimit"],
        fields["memlimit"],
    )
    try:
        plain = nacl.secret.SecretBox(key).decrypt(fields["box"])
    except nacl.exceptions.CryptoError as err:
        # SecretBox cannot tell a wrong key from altered bytes; a mistyped
        # passphrase is far more likely, so it comes first in the message.
        raise KeysError(
            f"wrong passphrase for {_shown(path)} (or the file was altered)"
        ) from err
    fields = _parse_map(plain, path)
    if fields["kind"] != KIND_PLAIN:
        raise KeysError(f"{_shown(path)} is damaged: its sealed part is not plain keys")
    return fields


def _read_outer_map(path: Path) -> dict:
    data = read_guarded_file(
        path,
        what="key file",
        max_bytes=MAX_KEY_FILE_BYTES,
        forbidden_mode_bits=FORBIDDEN_MODE_BITS,
        why_owner_only=WHY_OWNER_ONLY,
    )
    return _parse_map(data, path)


def _parse_map(data: bytes, path: Path) -> dict:
    """The key file map with every field checked, or a KeysError saying why."""
    if not data:
        raise KeysError(f"{_shown(path)} is empty: it is not a Dorothy key file")
    if data[0] not in _MSGPACK_MAP_FIRST_BYTES:
        raise KeysError(f"{_shown(path)} is not a Dorothy key file")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)
    unpacker.feed(data)
    try:
        fields = unpacker.unpack()
    except msgpack.OutOfData as err:
        raise KeysError(f"{_shown(path)} is damaged: it ends too soon") from err
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise KeysError(f"{_shown(path)} is damaged: it cannot be parsed") from err
    if unpacker.tell() != len(data):
        raise KeysError(f"{_shown(path)} is damaged: it has extra bytes at the end")
    if "v" not in fields or "kind" not in fields:
        raise KeysError(f"{_shown(path)} is not a Dorothy key file")
    version = fields["v"]
    if version != KEY_FILE_VERSION or type(version) is not int:
        raise KeysError(
            f"{_shown(path)} has format version {quoted(str(version))}; "
            f"this Dorothy reads version {KEY_FILE_VERSION}"
        )
    problem = _field_problem(fields)
    if problem:
        raise KeysError(f"{_shown(path)} is damaged: {problem}")
    return fields


def _field_problem(fields: dict) -> str | None:
    """What is wrong with the fields of a version 1 map, or None."""
    kind = fields["kind"]
    if kind == KIND_PLAIN:
        expected = PLAIN_FIELDS
        sizes = {"sign_seed": SEED_BYTES, "dh_private": DH_PRIVATE_BYTES}
    elif kind == KIND_ENCRYPTED:
        expected = ENCRYPTED_FIELDS
        sizes = {"salt": argon2id.SALTBYTES}
    else:
        return f"unknown kind {quoted(str(kind))}"
    missing = sorted(expected - set(fields))
    if missing:
        return f"field {quoted(missing[0])} is missing"
    unexpected = sorted(map(str, set(fields) - expected))
    if unexpected:
        return f"it has an unexpected field {quoted(unexpected[0])}"
    for name, size in sizes.items():
        value = fields[name]
        if not isinstance(value, bytes) or len(value) != size:
            return f"{name} should be {size} bytes"
    if kind == KIND_ENCRYPTED:
        if not isinstance(fields["box"], bytes):
            return "box should be bytes"
        minimum = nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES
        if len(fields["box"]) < minimum:
            return "box is too short"
        return _check_cost(fields["opslimit"], fields["memlimit"])
    return None
