"""keys/ed25519.py: in-place Ed25519 gives exactly pynacl's signatures and
verdicts, over any split of the message into parts."""

import array

import nacl.exceptions
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dorothy.keys import ed25519

seeds = st.binary(min_size=32, max_size=32)
messages = st.binary(max_size=2048)


def _parts(message: bytes, cuts: list[int]) -> list:
    """`message` cut at the given points, as a mix of bytes and views."""
    points = sorted({0, len(message), *(cut % (len(message) + 1) for cut in cuts)})
    pieces = [message[a:b] for a, b in zip(points, points[1:])]
    return [memoryview(piece) if i % 2 else piece for i, piece in enumerate(pieces)]


@settings(max_examples=200)
@given(seeds, messages, st.lists(st.integers(0, 4096), max_size=4))
def test_signatures_are_pynacls(seed, message, cuts):
    key = nacl.signing.SigningKey(seed)
    signature = ed25519.sign(ed25519.secret_key(seed), *_parts(message, cuts))
    assert signature == key.sign(message).signature
    assert ed25519.verify(key.verify_key.encode(), signature, *_parts(message, cuts))


@settings(max_examples=200)
@given(seeds, messages, st.integers(0, 2047), st.integers(0, 7), st.booleans())
def test_any_flipped_bit_fails_as_it_does_in_pynacl(seed, message, position, bit, in_signature):
    key = nacl.signing.SigningKey(seed)
    signature = bytearray(key.sign(message).signature)
    message = bytearray(message)
    target = signature if in_signature or not message else message
    target[position % len(target)] ^= 1 << bit
    try:  # pynacl's verdict is the reference, whatever the flipped bit
        key.verify_key.verify(bytes(message), bytes(signature))
        expected = True
    except nacl.exceptions.BadSignatureError:
        expected = False
    assert ed25519.verify(key.verify_key.encode(), bytes(signature), message) is expected


def test_parts_count_in_bytes_whatever_their_item_size():
    key = nacl.signing.SigningKey(bytes(32))
    words = array.array("I", [0x64636261, 0x68676665])
    signature = ed25519.sign(ed25519.secret_key(bytes(32)), words, b"x")
    assert signature == key.sign(words.tobytes() + b"x").signature


def test_another_key_or_wrong_sizes_do_not_verify():
    key = nacl.signing.SigningKey(bytes(32))
    other = nacl.signing.SigningKey(bytes([1]) * 32).verify_key.encode()
    signature = key.sign(b"evidence").signature
    public = key.verify_key.encode()
    assert ed25519.verify(public, signature, b"evidence")
    assert not ed25519.verify(other, signature, b"evidence")
    assert not ed25519.verify(public[:31], signature, b"evidence")
    assert not ed25519.verify(public, signature[:63], b"evidence")
    with pytest.raises(ValueError):
        ed25519.sign(bytes(32), b"evidence")  # a seed is not a secret key
