"""Noise Protocol Framework handshakes (revision 34) for Dorothy's peer links.

Only two protocols are supported, both Curve25519 + ChaCha20-Poly1305 +
BLAKE2b: IK (the initiator already knows the responder's static key, so the
first message is encrypted and the handshake takes one round trip) and XX
(neither side knows the other yet; three messages).

Like h11, this module is the wire protocol and nothing else: bytes in, bytes
out. It never touches sockets, clocks, files or a random source; ephemeral
private keys are handed in by the caller, so known-answer tests need no
patching. Anything the peer sends that is malformed raises
`RemoteProtocolError` (never another exception); misuse on our side raises
`LocalProtocolError`.

Section numbers in comments refer to the Noise specification, revision 34.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from nacl import bindings
from nacl.exceptions import CryptoError

from .errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_IK = "Noise_IK_25519_ChaChaPoly_BLAKE2b"
PROTOCOL_XX = "Noise_XX_25519_ChaChaPoly_BLAKE2b"

DHLEN = 32  # X25519 public keys and shared secrets (section 12.1)
HASHLEN = 64  # BLAKE2b-512 digest (section 12.8)
BLOCKLEN = 128  # BLAKE2b block size; HMAC pads keys to this (section 4.3)
KEYLEN = 32  # ChaCha20-Poly1305 key; HKDF outputs are truncated to this (section 5.2)
TAGLEN = 16  # Poly1305 authentication tag appended to every ciphertext
MAX_MESSAGE_LEN = 65535  # every Noise message, handshake or transport (section 3)
# Section 5.1: nonce 2^64-1 is reserved (REKEY uses it), so it must never
# encrypt a message; the counter is therefore exhausted once it reaches it.
MAX_NONCE = 2**64 - 1

assert hashlib.blake2b().block_size == BLOCKLEN  # hmac relies on this


@dataclass(frozen=True, slots=True)
class _Pattern:
    """A handshake pattern (section 7): pre-messages, then message patterns.

    Tokens are the spec's own: "e" and "s" send a public key; "ee", "es",
    "se", "ss" mix in a DH whose first letter is the initiator's key and
    second the responder's. Message i is written by the initiator when i is
    even, by the responder when odd.
    """

    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]


# Everything that drives the handshake state machine lives in this table;
# the code below knows only tokens, never pattern names.
_PATTERNS = {
    PROTOCOL_IK: _Pattern((), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se"))),
    PROTOCOL_XX: _Pattern((), (), (("e",), ("e", "ee", "s", "es"), ("s", "se"))),
}
_DH_TOKENS = frozenset({"ee", "es", "se", "ss"})

# Any clamped scalar is a multiple of 8, so multiplying a point by it gives
# all zeros exactly when the point has small order. Probing a received key
# with this fixed scalar lets us reject it on the read that brings it, rather
# than on a later write_message that happens to use it.
_PROBE_SCALAR = b"\x09" * DHLEN


def _require_bytes(name: str, value: object, length: int | None = None) -> bytes:
    """Check a value we were handed: bytes() alone would turn an int into zeros."""
    if not isinstance(value, (bytes, bytearray, memoryview)) or length not in (None, len(value)):
        size = "" if length is None else f" of length {length}"
        raise LocalProtocolError(f"{name} must be bytes{size}", code="bad_argument")
    return bytes(value)


def x25519_public(private: bytes) -> bytes:
    """The X25519 public key for `private` (clamping is done by libsodium)."""
    return bindings.crypto_scalarmult_base(_require_bytes("private key", private, DHLEN))


def _dh(private: bytes, public: bytes) -> bytes:
    """X25519, refusing an all-zero result: a small-order peer key (section 12.1).

    libsodium reports that result as an error (pynacl's RuntimeError). Callers
    check lengths first: pynacl does not, and would read past a short buffer.
    """
    try:
        shared = bindings.crypto_scalarmult(private, public)
    except CryptoError:
        shared = bytes(DHLEN)
    if shared == bytes(DHLEN):
        raise RemoteProtocolError("low-order point", code="low_order_point")
    return shared


def _checked_public(key: bytes) -> bytes:
    """Reject a small-order peer key as soon as it arrives."""
    _dh(_PROBE_SCALAR, key)
    return key


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASHLEN).digest()


def _hkdf(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """HKDF with two outputs, exactly as section 4.3 (HMAC-BLAKE2b) defines it."""
    temp_key = hmac.digest(chaining_key, ikm, hashlib.blake2b)
    output1 = hmac.digest(temp_key, b"\x01", hashlib.blake2b)
    output2 = hmac.digest(temp_key, output1 + b"\x02", hashlib.blake2b)
    return output1, output2


def _chacha_nonce(n: int) -> bytes:
    """32 zero bits, then the 64-bit little-endian counter (section 12.3)."""
    return b"\x00" * 4 + n.to_bytes(8, "little")


class CipherState:
    """A key and a message counter (section 5.1).

    With no key, encryption is the identity, as the spec requires for
    handshake messages sent before any DH. Decryption failures do not advance
    the counter, so a forged message cannot desynchronise an honest stream.
    """

    def __init__(self, key: bytes | None = None):
        self._key = None if key is None else _require_bytes("cipher key", key, KEYLEN)
        self._nonce = 0

    @property
    def nonce(self) -> int:
        return self._nonce

    @property
    def key(self) -> bytes | None:
        """The raw key, for deriving an application's own transport keys
        from the split CipherStates (Noise section 11.3 allows this)."""
        return self._key

    def has_key(self) -> bool:
        return self._key is not None

    def set_nonce(self, n: int) -> None:
        if not isinstance(n, int) or not 0 <= n <= MAX_NONCE:
            raise LocalProtocolError("nonce out of range", code="bad_nonce")
        self._nonce = n

    def _next_nonce(self) -> bytes:
        if self._nonce >= MAX_NONCE:
            raise LocalProtocolError("nonce exhausted; start a new session", code="nonce_exhausted")
        return _chacha_nonce(self._nonce)

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        plaintext = _require_bytes("plaintext", plaintext)
        if self._key is None:
            return plaintext
        if len(plaintext) + TAGLEN > MAX_MESSAGE_LEN:
            raise LocalProtocolError("plaintext too long for one Noise message", code="too_long")
        ciphertext = bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            plaintext, bytes(ad), self._next_nonce(), self._key
        )
        self._nonce += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        ciphertext = _require_bytes("ciphertext", ciphertext)
        if len(ciphertext) > MAX_MESSAGE_LEN:
            raise RemoteProtocolError("Noise message too long", code="message_too_long")
        if self._key is None:
            return ciphertext
        nonce = self._next_nonce()
        if len(ciphertext) < TAGLEN:  # pynacl would fail with a cffi ValueError
            raise RemoteProtocolError("ciphertext shorter than its tag", code="decrypt_failed")
        try:
            plaintext = bindings.crypto_aead_chacha20poly1305_ietf_decrypt(
                ciphertext, bytes(ad), nonce, self._key
            )
        except CryptoError:
            raise RemoteProtocolError("authentication failed", code="decrypt_failed") from None
        self._nonce += 1
        return plaintext

    def rekey(self) -> None:
        """Section 4.2 REKEY: a one-way key update that leaves the counter alone."""
        if self._key is None:
            raise LocalProtocolError("no key to rekey", code="no_key")
        self._key = bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            bytes(KEYLEN), b"", _chacha_nonce(MAX_NONCE), self._key
        )[:KEYLEN]


class _SymmetricState:
    """Chaining key, handshake hash and the current cipher (section 5.2)."""

    def __init__(self, protocol_name: str):
        name = protocol_name.encode("ascii")
        self.h = name.ljust(HASHLEN, b"\x00") if len(name) <= HASHLEN else _hash(name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_key = _hkdf(self.ck, ikm)
        self.cipher = CipherState(temp_key[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        key1, key2 = _hkdf(self.ck, b"")
        return CipherState(key1[:KEYLEN]), CipherState(key2[:KEYLEN])


class HandshakeState:
    """One side of a Noise handshake (section 5.3), driven by `_PATTERNS`.

    Call `write_message` and `read_message` in turn; once `complete`, call
    `split()` once for the transport CipherStates. Following the spec, any
    failure ends the handshake: the object refuses further use, because a
    half-processed message has already changed its hash and keys.
    """

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        prologue: bytes,
        static_private: bytes,
        ephemeral_private: bytes,
        remote_static: bytes | None = None,
    ):
        if protocol_name not in _PATTERNS:
            raise LocalProtocolError(f"unsupported protocol {protocol_name!r}", code="unsupported")
        self._pattern = _PATTERNS[protocol_name]
        self._initiator = bool(initiator)
        self._s = _require_bytes("static_private", static_private, DHLEN)
        self._s_pub = x25519_public(self._s)
        self._e = _require_bytes("ephemeral_private", ephemeral_private, DHLEN)
        self._e_pub = x25519_public(self._e)
        self._re: bytes | None = None
        self._rs: bytes | None = None
        remote_pre = self._pattern.responder_pre if initiator else self._pattern.initiator_pre
        if ("s" in remote_pre) != (remote_static is not None):
            # Noise never compares a key it is about to receive with one given
            # here, so accepting it would only give a false sense of pinning.
            msg = "remote_static must be given exactly when the pattern pre-shares it"
            raise LocalProtocolError(msg, code="bad_argument")
        if remote_static is not None:
            self._rs = _require_bytes("remote_static", remote_static, DHLEN)
            try:
                _checked_public(self._rs)
            except RemoteProtocolError:
                msg = "remote_static has small order"
                raise LocalProtocolError(msg, code="bad_argument") from None
        self._symmetric = _SymmetricState(protocol_name)
        self._symmetric.mix_hash(_require_bytes("prologue", prologue))
        pre_messages = ((True, self._pattern.initiator_pre), (False, self._pattern.responder_pre))
        for owner, tokens in pre_messages:
            for _token in tokens:  # always "s": the table has no ephemeral pre-messages
                self._symmetric.mix_hash(self._s_pub if owner == self._initiator else self._rs)
        self._index = 0
        self._failed = False
        self._split_done = False

    @property
    def complete(self) -> bool:
        return self._index == len(self._pattern.messages)

    @property
    def handshake_hash(self) -> bytes:
        """The transcript hash h, for channel binding once the handshake completes."""
        return self._symmetric.h

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key: pinned (IK initiator) or received.
        Noise proves the peer holds it; whether to trust it is the caller's call."""
        return self._rs

    def _check_turn(self, writing: bool) -> tuple[str, ...]:
        if self._failed:
            raise LocalProtocolError("handshake already failed", code="handshake_failed")
        if self.complete:
            raise LocalProtocolError("handshake already complete", code="out_of_turn")
        our_turn_to_write = (self._index % 2 == 0) == self._initiator
        if our_turn_to_write != writing:
            action = "write" if writing else "read"
            raise LocalProtocolError(f"not our turn to {action}", code="out_of_turn")
        return self._pattern.messages[self._index]

    def _message_len(self, tokens: tuple[str, ...], payload_len: int) -> int:
        """Exact length of a message, so limits are checked before state changes."""
        keyed = self._symmetric.cipher.has_key()
        length = 0
        for token in tokens:
            keyed = keyed or token in _DH_TOKENS
            length += {"e": DHLEN, "s": DHLEN + (TAGLEN if keyed else 0)}.get(token, 0)
        return length + payload_len + (TAGLEN if keyed else 0)

    def _mix_dh(self, token: str) -> None:
        ours, theirs = (token[0], token[1]) if self._initiator else (token[1], token[0])
        local = self._e if ours == "e" else self._s
        remote = self._re if theirs == "e" else self._rs
        assert remote is not None  # the patterns only use keys already received
        self._symmetric.mix_key(_dh(local, remote))

    def write_message(self, payload: bytes) -> bytes:
        tokens = self._check_turn(writing=True)
        payload = _require_bytes("payload", payload)
        if self._message_len(tokens, len(payload)) > MAX_MESSAGE_LEN:
            raise LocalProtocolError("payload too long for a handshake message", code="too_long")
        out = bytearray()
        for token in tokens:
            if token == "e":
                out += self._e_pub
                self._symmetric.mix_hash(self._e_pub)
            elif token == "s":
                out += self._symmetric.encrypt_and_hash(self._s_pub)
            else:
                self._mix_dh(token)
        out += self._symmetric.encrypt_and_hash(payload)
        self._index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        tokens = self._check_turn(writing=False)
        message = _require_bytes("message", message)
        try:
            if len(message) > MAX_MESSAGE_LEN:
                raise RemoteProtocolError("handshake message too long", code="message_too_long")
            if len(message) < self._message_len(tokens, 0):
                raise RemoteProtocolError("handshake message too short", code="message_too_short")
            payload = self._read_tokens(tokens, message)
        except RemoteProtocolError:
            self._failed = True
            raise
        self._index += 1
        return payload

    def _read_tokens(self, tokens: tuple[str, ...], message: bytes) -> bytes:
        offset = 0
        for token in tokens:
            if token in _DH_TOKENS:
                self._mix_dh(token)
                continue
            size = DHLEN + (TAGLEN if token == "s" and self._symmetric.cipher.has_key() else 0)
            chunk, offset = message[offset : offset + size], offset + size
            if token == "e":
                self._symmetric.mix_hash(chunk)
                self._re = _checked_public(chunk)
            else:
                self._rs = _checked_public(self._symmetric.decrypt_and_hash(chunk))
        return self._symmetric.decrypt_and_hash(message[offset:])

    def split(self) -> tuple[CipherState, CipherState]:
        """(initiator->responder, responder->initiator). Only once: a second pair
        would repeat the same keys and nonces."""
        if not self.complete or self._failed:
            raise LocalProtocolError("handshake not complete", code="out_of_turn")
        if self._split_done:
            raise LocalProtocolError("split() already called", code="already_split")
        self._split_done = True
        return self._symmetric.split()
