"""AEGIS-256 through libsodium's raw binding (`nacl._sodium`, which pynacl's
own wrappers call).

pynacl's public functions take only `bytes`, and allocate a zeroed buffer and
copy the result out of it on every call: three passes over each 1 MiB record
where one will do, and a copy of any view before it can be authenticated.
These write into the caller's buffer and read any buffer in place.
tests/test_aegis.py checks that they give exactly pynacl's bytes.
"""

import nacl.bindings
from nacl._sodium import ffi
from nacl._sodium import lib as sodium

# sodium_init() is where libsodium picks its AES-NI AEGIS code; pynacl runs
# it once on import (here explicitly, since nothing below goes through pynacl).
nacl.bindings.sodium_init()

KEY_LEN = 32
NONCE_LEN = 32
TAG_LEN = 32

# Buffers that libsodium writes whole before anything reads them need not be
# zero-filled first: bytearray(n) did, and that was 7% of the sending
# worker and 11% of the receiving event loop (perf, 2 MiB records).
_unzeroed = ffi.new_allocator(should_clear_after_alloc=False)


def output_buffer(size: int) -> memoryview:
    """A writable buffer of `size` bytes whose contents are undefined until
    written: only for output that seal_into or open_into writes in full."""
    return memoryview(ffi.buffer(_unzeroed("unsigned char[]", size)))


def _check(nonce: bytes, key: bytes) -> None:
    # libsodium reads NONCE_LEN and KEY_LEN bytes from these pointers
    # whatever their length: pynacl checks this, so must we.
    if len(nonce) != NONCE_LEN or len(key) != KEY_LEN:
        raise ValueError(f"AEGIS-256 takes a {NONCE_LEN}-byte nonce and a {KEY_LEN}-byte key")


def seal_into(out, offset: int, plaintext, nonce: bytes, key: bytes) -> None:
    """Write the ciphertext of `plaintext` and its tag into `out` at `offset`:
    exactly the rest of `out`, so that no byte of an output_buffer is left
    as it was."""
    _check(nonce, key)
    if len(out) - offset != len(plaintext) + TAG_LEN:
        raise ValueError("the output buffer's rest must be exactly the plaintext and the tag")
    target = ffi.from_buffer(out, require_writable=True) + offset
    if sodium.crypto_aead_aegis256_encrypt(
        target, ffi.NULL, ffi.from_buffer(plaintext), len(plaintext), ffi.NULL, 0, ffi.NULL, nonce, key
    ) != 0:
        raise ValueError("AEGIS-256 encryption failed")


def open_into(out, ciphertext, nonce: bytes, key: bytes) -> bool:
    """Decrypt `ciphertext` (with its tag) into `out`, which must be exactly
    len(ciphertext) - TAG_LEN bytes (as for seal_into); False if it does
    not authenticate."""
    _check(nonce, key)
    if len(ciphertext) < TAG_LEN or len(out) != len(ciphertext) - TAG_LEN:
        raise ValueError("ciphertext too short, or the output buffer not exactly the plaintext's length")
    return sodium.crypto_aead_aegis256_decrypt(
        ffi.from_buffer(out, require_writable=True), ffi.NULL, ffi.NULL,
        ffi.from_buffer(ciphertext), len(ciphertext), ffi.NULL, 0, nonce, key,
    ) == 0


def mac(data, nonce: bytes, key: bytes) -> bytes:
    """The AEGIS-256 tag of an empty message with `data` as associated data:
    AEGIS used as a MAC, at AES-NI speed and without writing a byte of output
    beyond the tag."""
    _check(nonce, key)
    tag = ffi.new("unsigned char[]", TAG_LEN)
    if sodium.crypto_aead_aegis256_encrypt(
        tag, ffi.NULL, ffi.NULL, 0, ffi.from_buffer(data), len(data), ffi.NULL, nonce, key
    ) != 0:
        raise ValueError("AEGIS-256 failed")
    return bytes(ffi.buffer(tag, TAG_LEN))
