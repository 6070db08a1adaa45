"""protocol/aegis.py calls libsodium's raw binding; what it computes must be
exactly what pynacl's public AEGIS-256 function gives for the same input."""

import nacl.bindings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dorothy.protocol import aegis

keys = st.binary(min_size=aegis.KEY_LEN, max_size=aegis.KEY_LEN)
nonces = st.binary(min_size=aegis.NONCE_LEN, max_size=aegis.NONCE_LEN)
FAST = settings(max_examples=200, deadline=None)


@FAST
@given(keys, nonces, st.binary(max_size=3000), st.integers(0, 40), st.sampled_from([bytes, bytearray, memoryview]))
def test_seal_and_open_in_place_match_pynacl(key, nonce, plaintext, offset, kind):
    expected = nacl.bindings.crypto_aead_aegis256_encrypt(plaintext, None, nonce, key)
    out = bytearray(b"\xee" * (offset + len(expected) + 5))
    aegis.seal_into(memoryview(out)[: offset + len(expected)], offset, kind(plaintext), nonce, key)
    assert out[offset : offset + len(expected)] == expected
    assert out[:offset] == b"\xee" * offset and out[-5:] == b"\xee" * 5  # nothing written outside
    opened = bytearray(len(plaintext))
    assert aegis.open_into(opened, memoryview(out)[offset : offset + len(expected)], nonce, key)
    assert opened == plaintext


@FAST
@given(keys, nonces, st.binary(min_size=1, max_size=3000), st.data())
def test_open_refuses_any_changed_byte(key, nonce, plaintext, data):
    sealed = bytearray(nacl.bindings.crypto_aead_aegis256_encrypt(plaintext, None, nonce, key))
    position = data.draw(st.integers(0, len(sealed) - 1))
    sealed[position] ^= data.draw(st.integers(1, 255))
    assert not aegis.open_into(bytearray(len(plaintext)), sealed, nonce, key)


@FAST
@given(keys, nonces, st.binary(min_size=1, max_size=3000))
def test_mac_is_the_tag_of_an_empty_message_with_the_data_as_associated_data(key, nonce, data):
    assert aegis.mac(memoryview(data), nonce, key) == nacl.bindings.crypto_aead_aegis256_encrypt(b"", data, nonce, key)


@pytest.mark.parametrize("nonce, key", [(bytes(31), bytes(32)), (bytes(32), bytes(33)), (b"", b"")])
def test_a_nonce_or_key_of_the_wrong_length_is_refused_not_read_past(nonce, key):
    for call in (
        lambda: aegis.seal_into(bytearray(64), 0, b"x", nonce, key),
        lambda: aegis.open_into(bytearray(8), bytes(40), nonce, key),
        lambda: aegis.mac(b"x", nonce, key),
    ):
        with pytest.raises(ValueError, match="32-byte nonce and a 32-byte key"):
            call()


@pytest.mark.parametrize("spare", [-1, 1, 4096])
def test_an_output_buffer_of_another_length_is_refused(spare):
    # Short would be overrun; long would leave bytes as they were, and an
    # output_buffer's are whatever memory held before (an earlier record).
    with pytest.raises(ValueError):
        aegis.seal_into(aegis.output_buffer(10 + 1 + aegis.TAG_LEN + spare), 10, b"x", bytes(32), bytes(32))
    with pytest.raises(ValueError):
        aegis.open_into(aegis.output_buffer(8 + spare), bytes(8 + aegis.TAG_LEN), bytes(32), bytes(32))
