"""A node's public identity and the one-line text form operators exchange.

A node key is two public keys: an Ed25519 key the node signs with, and an
X25519 key it agrees session keys with. Operators pass node keys to each other
out of band (e-mail, a ticket, a USB stick) as a line of text, and confirm
them by reading a fingerprint aloud over the phone.

Text form (version 1)::

    "dnk1" + base32(version || sign_public || dh_public || checksum)

base32 is RFC 4648, lowercase, without padding: it survives e-mail, shells
and double-click selection, and has no 0/O or 1/l to confuse. The checksum is
the first 4 bytes of a keyed-by-purpose BLAKE2b hash of everything before it,
so a typo or a line cut short is caught when the key is pasted instead of
surfacing later as a peer that "cannot connect".
"""

import base64
import binascii
import hashlib
from dataclasses import dataclass

import nacl.bindings

from .errors import KeysError, quoted

PREFIX = "dnk1"
VERSION = 1
PUBLIC_KEY_BYTES = 32  # both Ed25519 and X25519 public keys
CHECKSUM_BYTES = 4  # a random typo slips past with probability 2**-32
PAYLOAD_BYTES = 1 + 2 * PUBLIC_KEY_BYTES + CHECKSUM_BYTES
BASE32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
BITS_PER_BASE32_CHAR = 5
ENCODED_LENGTH = len(PREFIX) + -(-PAYLOAD_BYTES * 8 // BITS_PER_BASE32_CHAR)

# Domain separation: these hashes can never be confused with each other or
# with any other BLAKE2b use in Dorothy.
CHECKSUM_PERSON = b"dorothy-nodekey"
FINGERPRINT_PERSON = b"dorothy-fpr"

# The fingerprint is 80 bits. What an attacker needs is a second preimage:
# a key pair of their own whose fingerprint matches the victim's, so that the
# operator reading it aloud is fooled. That costs about 2**80 key generations
# per target, out of reach. A collision (two keys of the attacker's own with
# one fingerprint, about 2**40 work) gains nothing: it does not impersonate
# anyone else. 80 bits is also the most that fits in 25 decimal digits
# (10**25 > 2**80), which is as much as people reliably read out and compare.
FINGERPRINT_BYTES = 10
FINGERPRINT_DIGITS = 25
FINGERPRINT_GROUP = 5

_HASH_BYTES = 32
_ALPHABET_SET = frozenset(BASE32_ALPHABET + BASE32_ALPHABET.upper())


def _checksum(body: bytes) -> bytes:
    digest = hashlib.blake2b(body, digest_size=_HASH_BYTES, person=CHECKSUM_PERSON)
    return digest.digest()[:CHECKSUM_BYTES]


def _to_base32(payload: bytes) -> str:
    return base64.b32encode(payload).decode("ascii").rstrip("=").lower()


def _from_base32(text: str) -> bytes:
    padding = "=" * (-len(text) % 8)
    return base64.b32decode(text.upper() + padding)


def _check_key_bytes(value: object, what: str) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    if len(value) != PUBLIC_KEY_BYTES:
        raise KeysError(f"{what} must be {PUBLIC_KEY_BYTES} bytes, not {len(value)}")


@dataclass(frozen=True, slots=True, repr=False)
class NodeKey:
    """The public keys that identify one node.

    Construction checks only the lengths; `decode()`, which handles keys
    typed or pasted by people, also checks that the signing key is a valid
    Ed25519 point.
    """

    sign_public: bytes  # Ed25519
    dh_public: bytes  # X25519

    def __post_init__(self) -> None:
        _check_key_bytes(self.sign_public, "an Ed25519 public key")
        _check_key_bytes(self.dh_public, "an X25519 public key")

    def encode(self) -> str:
        """The one-line text form, e.g. for `dorothy peer add`."""
        body = bytes([VERSION]) + self.sign_public + self.dh_public
        return PREFIX + _to_base32(body + _checksum(body))

    @classmethod
    def decode(cls, text: str) -> "NodeKey":
        """Parse the text form; any mistake raises a `KeysError` saying which."""
        if not isinstance(text, str):
            raise TypeError(f"a node key is text, not {type(text).__name__}")
        text = text.strip()
        if text[: len(PREFIX)].lower() != PREFIX:
            raise KeysError(f"not a Dorothy node key (it should start with {PREFIX!r})")
        for index, char in enumerate(text):
            if index >= len(PREFIX) and char not in _ALPHABET_SET:
                raise KeysError(
                    f"node key has an invalid character {quoted(char)} at "
                    f"position {index + 1} (node keys use only letters and "
                    "the digits 2-7)"
                )
        if len(text) != ENCODED_LENGTH:
            size = "short" if len(text) < ENCODED_LENGTH else "long"
            raise KeysError(
                f"node key is too {size}: {len(text)} characters, "
                f"expected {ENCODED_LENGTH}"
            )
        body = _checked_body(text[len(PREFIX) :])
        if body[0] != VERSION:
            raise KeysError(
                f"unknown node key version {body[0]}: this Dorothy understands "
                f"version {VERSION}; the key may come from a newer Dorothy"
            )
        sign_public = body[1 : 1 + PUBLIC_KEY_BYTES]
        dh_public = body[1 + PUBLIC_KEY_BYTES :]
        if not nacl.bindings.crypto_core_ed25519_is_valid_point(sign_public):
            raise KeysError(
                "node key holds an invalid Ed25519 signing key: it was not "
                "made by Dorothy"
            )
        return cls(sign_public, dh_public)

    def fingerprint(self) -> str:
        """25 digits in groups of 5, for two operators to compare by voice."""
        digest = hashlib.blake2b(
            self.sign_public + self.dh_public,
            digest_size=_HASH_BYTES,
            person=FINGERPRINT_PERSON,
        ).digest()
        number = int.from_bytes(digest[:FINGERPRINT_BYTES], "big")
        digits = f"{number:0{FINGERPRINT_DIGITS}d}"
        groups = [
            digits[start : start + FINGERPRINT_GROUP]
            for start in range(0, FINGERPRINT_DIGITS, FINGERPRINT_GROUP)
        ]
        return " ".join(groups)

    def __str__(self) -> str:
        return self.encode()

    def __repr__(self) -> str:
        return f"NodeKey.decode({self.encode()!r})"


_CHECKSUM_MISMATCH = "node key checksum does not match: it has a typo or was cut short"


def _checked_body(base32_text: str) -> bytes:
    """The version and keys from the base32 part, once its checksum matches.

    The caller has already checked the characters and the length.
    """
    try:
        payload = _from_base32(base32_text)
    except binascii.Error as err:  # unreachable after the checks, kept as a net
        raise KeysError(_CHECKSUM_MISMATCH) from err
    # The last character carries 2 bits of the payload and 3 unused bits that
    # the decoder ignores. A typo there that only touches unused bits would
    # decode to the right key; insisting on the one canonical spelling means
    # every altered character is reported, never silently accepted.
    if _to_base32(payload) != base32_text.lower():
        raise KeysError(_CHECKSUM_MISMATCH)
    body, checksum = payload[:-CHECKSUM_BYTES], payload[-CHECKSUM_BYTES:]
    if _checksum(body) != checksum:
        raise KeysError(_CHECKSUM_MISMATCH)
    return body
