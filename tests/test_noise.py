"""Properties of protocol/noise.py beyond the known-answer vectors.

Pairs of HandshakeStates are joined directly (no I/O): each test writes on
one side and reads on the other, then corrupts, replays or misroutes bytes.
"""

from __future__ import annotations

import ast
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings

from dorothy.protocol import noise
from dorothy.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

PROTOCOLS = (noise.PROTOCOL_IK, noise.PROTOCOL_XX)
MESSAGE_COUNT = {noise.PROTOCOL_IK: 2, noise.PROTOCOL_XX: 3}
FAST = settings(max_examples=60, deadline=None)

keys = st.binary(min_size=32, max_size=32)
protocols = st.sampled_from(PROTOCOLS)
payloads = st.binary(max_size=64)
# Garbage around the real message sizes (32..144 bytes), plus the length limit.
garbage = st.one_of(st.binary(max_size=200), st.just(bytes(noise.MAX_MESSAGE_LEN + 1)))


def make_pair(protocol, i_static, r_static, i_eph, r_eph, *, prologue=b"", pinned=None):
    """(initiator, responder). For IK the initiator pins `pinned`, by default
    the responder's real static key."""
    if protocol == noise.PROTOCOL_IK and pinned is None:
        pinned = noise.x25519_public(r_static)
    initiator = noise.HandshakeState(
        protocol,
        initiator=True,
        prologue=prologue,
        static_private=i_static,
        ephemeral_private=i_eph,
        remote_static=pinned,
    )
    responder = noise.HandshakeState(
        protocol,
        initiator=False,
        prologue=prologue,
        static_private=r_static,
        ephemeral_private=r_eph,
    )
    return initiator, responder


def step(pair, index, payload=b""):
    """Message `index` of the handshake, written and read; returns (payload read, wire bytes)."""
    writer, reader = pair if index % 2 == 0 else pair[::-1]
    wire = writer.write_message(payload)
    return reader.read_message(wire), wire


def fixed_pair(protocol, **kwargs):
    return make_pair(protocol, b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, b"\x04" * 32, **kwargs)


@FAST
@given(protocols, keys, keys, keys, keys, st.data())
def test_garbage_gives_payload_or_protocol_error(protocol, k1, k2, k3, k4, data):
    pair = make_pair(protocol, k1, k2, k3, k4)
    honest_steps = data.draw(st.integers(0, MESSAGE_COUNT[protocol]), label="honest steps")
    for index in range(honest_steps):
        step(pair, index)
    victim = pair[data.draw(st.integers(0, 1), label="victim")]
    for _ in range(data.draw(st.integers(1, 3), label="attempts")):
        try:
            assert isinstance(victim.read_message(data.draw(garbage)), bytes)
        except ProtocolError:
            pass


@FAST
@given(
    protocol=protocols,
    k1=keys,
    k2=keys,
    k3=keys,
    k4=keys,
    prologue=st.binary(max_size=32),
    hs_payloads=st.lists(payloads, max_size=3),
    transport=st.lists(st.tuples(st.booleans(), payloads, payloads), max_size=8),
)
def test_handshake_completes_and_transport_round_trips(
    protocol, k1, k2, k3, k4, prologue, hs_payloads, transport
):
    initiator, responder = pair = make_pair(protocol, k1, k2, k3, k4, prologue=prologue)
    for index in range(MESSAGE_COUNT[protocol]):
        payload = hs_payloads[index] if index < len(hs_payloads) else b"hello"
        assert step(pair, index, payload)[0] == payload
    assert initiator.complete and responder.complete
    assert initiator.handshake_hash == responder.handshake_hash
    assert len(initiator.handshake_hash) == 64
    assert initiator.remote_static == noise.x25519_public(k2)
    assert responder.remote_static == noise.x25519_public(k1)
    i_send, i_recv = initiator.split()
    r_recv, r_send = responder.split()
    for from_initiator, ad, payload in transport:
        sender, receiver = (i_send, r_recv) if from_initiator else (r_send, i_recv)
        assert receiver.decrypt_with_ad(ad, sender.encrypt_with_ad(ad, payload)) == payload


@FAST
@given(protocols, keys, keys, keys, keys, st.data())
def test_flipping_any_bit_of_a_handshake_message_is_caught(protocol, k1, k2, k3, k4, data):
    pair = make_pair(protocol, k1, k2, k3, k4)
    target = data.draw(st.integers(0, MESSAGE_COUNT[protocol] - 1), label="message")
    payload = data.draw(payloads, label="payload")
    for index in range(target):
        step(pair, index)
    writer, reader = pair if target % 2 == 0 else pair[::-1]
    wire = bytearray(writer.write_message(payload))
    bit = data.draw(st.integers(0, len(wire) * 8 - 1), label="bit")
    wire[bit // 8] ^= 1 << (bit % 8)
    if protocol == noise.PROTOCOL_XX and target == 0:
        # XX message 1 is an ephemeral key and a plaintext payload with no MAC,
        # so the responder cannot notice; the forgery has entered its
        # transcript hash, so the initiator rejects message 2 instead. (Only
        # a flip that lands on a small-order key is caught at once.)
        with pytest.raises(RemoteProtocolError):
            reader.read_message(bytes(wire))
            step(pair, 1)
    else:
        with pytest.raises(RemoteProtocolError):
            reader.read_message(bytes(wire))


@FAST
@given(keys, keys, keys, keys, keys)
def test_ik_initiator_pinning_the_wrong_key_is_rejected_by_the_responder(k1, k2, k3, k4, wrong):
    pinned = noise.x25519_public(wrong)
    if pinned == noise.x25519_public(k2):
        return  # the "wrong" key happens to be right
    initiator, responder = make_pair(noise.PROTOCOL_IK, k1, k2, k3, k4, pinned=pinned)
    with pytest.raises(RemoteProtocolError) as info:
        responder.read_message(initiator.write_message(b"for the real responder only"))
    assert info.value.code == "decrypt_failed"


@FAST
@given(keys, st.lists(payloads, min_size=2, max_size=6), st.data())
def test_cipherstate_rejects_replay_and_keeps_its_place(key, messages, data):
    sender, receiver = noise.CipherState(key), noise.CipherState(key)
    sealed = [sender.encrypt_with_ad(b"ad", m) for m in messages]
    upto = data.draw(st.integers(1, len(sealed) - 1), label="delivered")
    for ciphertext, message in zip(sealed[:upto], messages):
        assert receiver.decrypt_with_ad(b"ad", ciphertext) == message
    replayed = sealed[data.draw(st.integers(0, upto - 1), label="replayed")]
    with pytest.raises(RemoteProtocolError) as info:
        receiver.decrypt_with_ad(b"ad", replayed)
    assert info.value.code == "decrypt_failed"
    assert receiver.nonce == upto  # a failure does not advance the counter
    assert receiver.decrypt_with_ad(b"ad", sealed[upto]) == messages[upto]


@FAST
@given(keys, st.integers(0, 2**64 - 3), payloads, st.integers(1, 3))
def test_rekey_changes_the_key_and_both_sides_still_agree(key, nonce, payload, rekeys):
    sender, receiver, untouched = (noise.CipherState(key) for _ in range(3))
    for cipher in (sender, receiver, untouched):
        cipher.set_nonce(nonce)
    expected_key = key
    for _ in range(rekeys):
        sender.rekey()
        receiver.rekey()
        expected_key = bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            bytes(32), b"", bytes(4) + (2**64 - 1).to_bytes(8, "little"), expected_key
        )[:32]
    assert sender.nonce == nonce  # REKEY leaves the counter alone
    reference = noise.CipherState(expected_key)
    reference.set_nonce(nonce)
    sealed = sender.encrypt_with_ad(b"", payload)
    assert sealed == reference.encrypt_with_ad(b"", payload)
    assert sealed != untouched.encrypt_with_ad(b"", payload)
    with pytest.raises(RemoteProtocolError):
        untouched.decrypt_with_ad(b"", sealed)
    assert receiver.decrypt_with_ad(b"", sealed) == payload


def test_reserved_nonce_is_never_used():
    sender, receiver = noise.CipherState(bytes(32)), noise.CipherState(bytes(32))
    sender.set_nonce(2**64 - 2)
    receiver.set_nonce(2**64 - 2)
    assert receiver.decrypt_with_ad(b"", sender.encrypt_with_ad(b"", b"last")) == b"last"
    with pytest.raises(LocalProtocolError):
        sender.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(LocalProtocolError):
        receiver.decrypt_with_ad(b"", bytes(32))
    for bad in (-1, 2**64):
        with pytest.raises(LocalProtocolError):
            sender.set_nonce(bad)


def test_cipherstate_without_key_passes_through_and_short_input_is_remote_error():
    assert noise.CipherState().encrypt_with_ad(b"", b"clear") == b"clear"
    with pytest.raises(RemoteProtocolError):
        noise.CipherState(bytes(32)).decrypt_with_ad(b"", b"short")
    with pytest.raises(LocalProtocolError):
        noise.CipherState().rekey()


def test_hkdf_matches_the_spec_definition():
    """Section 4.3 spelled out by hand, independent of the module's helper."""
    ck, ikm = bytes(range(64)), b"input key material"
    temp = hmac.new(ck, ikm, hashlib.blake2b).digest()
    out1 = hmac.new(temp, b"\x01", hashlib.blake2b).digest()
    out2 = hmac.new(temp, out1 + b"\x02", hashlib.blake2b).digest()
    assert noise._hkdf(ck, ikm) == (out1, out2)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_out_of_turn_and_misuse_are_local_errors(protocol):
    initiator, responder = pair = fixed_pair(protocol)
    for misuse in (responder.write_message, initiator.read_message):
        with pytest.raises(LocalProtocolError):
            misuse(b"")
    with pytest.raises(LocalProtocolError):
        initiator.split()
    with pytest.raises(LocalProtocolError):  # too long: rejected before any state changes
        initiator.write_message(bytes(noise.MAX_MESSAGE_LEN))
    for index in range(MESSAGE_COUNT[protocol]):
        step(pair, index)
    with pytest.raises(LocalProtocolError):
        initiator.write_message(b"")
    initiator.split()
    with pytest.raises(LocalProtocolError):  # a second split would reuse keys and nonces
        initiator.split()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_failed_read_ends_the_handshake(protocol):
    initiator, responder = fixed_pair(protocol)
    with pytest.raises(RemoteProtocolError):
        responder.read_message(b"too short")
    with pytest.raises(LocalProtocolError):
        responder.read_message(initiator.write_message(b""))


# Small-order X25519 points: 0, 1, and a point of order 8.
LOW_ORDER = [
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
]


@pytest.mark.parametrize("low_order", [bytes.fromhex(h) for h in LOW_ORDER])
def test_low_order_keys_are_rejected(low_order):
    _, responder = fixed_pair(noise.PROTOCOL_XX)
    with pytest.raises(RemoteProtocolError) as info:
        responder.read_message(low_order)  # XX message 1 is just `e`
    assert info.value.code == "low_order_point"
    with pytest.raises(LocalProtocolError):
        fixed_pair(noise.PROTOCOL_IK, pinned=low_order)


def test_construction_errors_are_local():
    good = dict(initiator=True, prologue=b"", static_private=bytes(32), ephemeral_private=bytes(32))
    with pytest.raises(LocalProtocolError):
        noise.HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2b", **good)
    with pytest.raises(LocalProtocolError):  # IK initiator must pin the responder
        noise.HandshakeState(noise.PROTOCOL_IK, **good)
    pinned = noise.x25519_public(bytes(32))
    with pytest.raises(LocalProtocolError):  # XX would never check a pinned key
        noise.HandshakeState(noise.PROTOCOL_XX, remote_static=pinned, **good)
    with pytest.raises(LocalProtocolError):
        noise.HandshakeState(noise.PROTOCOL_XX, **{**good, "static_private": bytes(31)})


def test_module_stays_sans_io():
    with open(noise.__file__, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"os", "time", "random", "socket", "trio", "pathlib", "secrets"}
