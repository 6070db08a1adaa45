"""Signed envelopes: `msgpack([body, signature])` where the Ed25519
signature covers a domain label followed by the exact body bytes.

Signing the stored bytes (not a re-encoding of decoded values) means a
verifier never has to reproduce an encoder's choices, and the label keeps a
signature made for one kind of document (manifest, receipt) from being
valid for another.
"""

import nacl.exceptions
import nacl.signing

from .codec import pack, unpack
from .errors import RemoteProtocolError

MANIFEST_DOMAIN = b"dorothy manifest v1\x00"
RECEIPT_DOMAIN = b"dorothy receipt v1\x00"


def seal(domain: bytes, body: bytes, sign) -> bytes:
    """`sign(message) -> 64-byte detached signature` is the node identity's."""
    return pack([body, sign(domain + body)])


def split(envelope: bytes, what: str, max_len: int) -> tuple[bytes, bytes]:
    """The (body, signature) of an envelope, before any verification."""
    if len(envelope) > max_len:
        raise RemoteProtocolError(f"{what} of {len(envelope)} bytes exceeds {max_len}", code="too_large")
    obj = unpack(envelope, what)
    if not (isinstance(obj, list) and len(obj) == 2 and type(obj[0]) is bytes and type(obj[1]) is bytes):
        raise RemoteProtocolError(f"{what} is not a [body, signature] pair", code="malformed")
    if len(obj[1]) != 64:
        raise RemoteProtocolError(f"{what} signature has {len(obj[1])} bytes", code="malformed")
    return obj[0], obj[1]


def verify(domain: bytes, body: bytes, signature: bytes, sign_public: bytes, what: str) -> None:
    try:
        nacl.signing.VerifyKey(sign_public).verify(domain + body, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
        raise RemoteProtocolError(f"{what} has a bad signature", code="bad_signature") from None
