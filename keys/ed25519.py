"""Ed25519 over large messages with one copy of the message, not three.

pynacl's `SigningKey.sign` and `VerifyKey.verify` copy a message into
libsodium's combined form (signature || message), out of it again, and into
the result: a ledger record that lists 10,000 files is about 2 MB, so
signing and verifying it held some 12 MB at once, and that was the peak
memory of a receiving daemon.

libsodium's combined functions also work in place: `crypto_sign` moves the
message to just after the 64-byte signature slot (a no-op when it is
already there) and signs it there, and `crypto_sign_open` may write the
message it checked back where it already is. So each function here lays
the message out once, after the slot, and lets libsodium work on that
buffer. The signatures are ordinary Ed25519 (RFC 8032) signatures;
tests/test_ed25519.py checks them against pynacl's.
"""

import nacl.bindings
from nacl._sodium import ffi
from nacl._sodium import lib as sodium

SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
SECRET_KEY_SIZE = 64  # libsodium's form: the 32-byte seed, then the public key


def _laid_out(head: bytes, parts) -> bytearray:
    """`head` (a signature or its zeroed slot), then the parts, contiguous."""
    parts = [memoryview(part).cast("B") for part in parts]  # lengths in bytes, whatever the item size
    buffer = bytearray(SIGNATURE_SIZE + sum(len(part) for part in parts))
    buffer[:SIGNATURE_SIZE] = head
    offset = SIGNATURE_SIZE
    for part in parts:
        buffer[offset : offset + len(part)] = part
        offset += len(part)
    return buffer


def secret_key(seed: bytes) -> bytes:
    """The 64-byte secret key `sign` takes, from a 32-byte seed."""
    return nacl.bindings.crypto_sign_seed_keypair(seed)[1]


def sign(secret: bytes, *message_parts) -> bytes:
    """The detached signature of the concatenated parts (bytes-like)."""
    if len(secret) != SECRET_KEY_SIZE:
        raise ValueError(f"an Ed25519 secret key has {SECRET_KEY_SIZE} bytes")
    buffer = _laid_out(bytes(SIGNATURE_SIZE), message_parts)
    signed = ffi.from_buffer(buffer, require_writable=True)
    if sodium.crypto_sign(signed, ffi.NULL, signed + SIGNATURE_SIZE, len(buffer) - SIGNATURE_SIZE, secret) != 0:
        raise ValueError("Ed25519 signing failed")
    return bytes(buffer[:SIGNATURE_SIZE])


def verify(public: bytes, signature: bytes, *message_parts) -> bool:
    """Whether `signature` is `public`'s over the concatenated parts."""
    if len(public) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    buffer = _laid_out(signature, message_parts)
    signed = ffi.from_buffer(buffer, require_writable=True)
    return sodium.crypto_sign_open(signed + SIGNATURE_SIZE, ffi.NULL, signed, len(buffer), public) == 0
