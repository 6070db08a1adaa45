"""Node keys (public text form, fingerprint) and node identities (key files)."""

import base64
import hashlib
import os
import re

import msgpack
import nacl.pwhash.argon2id as argon2id
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dorothy.keys.errors import KeysError
from dorothy.keys.identity import MAX_KEY_FILE_BYTES, NodeIdentity, is_encrypted
from dorothy.keys.nodekey import BASE32_ALPHABET, ENCODED_LENGTH, NodeKey

# Argon2id at libsodium's minimum cost: milliseconds instead of a second.
FAST = {"opslimit": argon2id.OPSLIMIT_MIN, "memlimit": argon2id.MEMLIMIT_MIN}
PASSPHRASE = b"correct horse battery staple"

# A file shared by every example of one hypothesis test: each example
# overwrites it completely, so reusing one tmp_path is safe.
SHARED_TMP_PATH = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def identity_from_seeds(sign_seed: bytes, dh_private: bytes) -> NodeIdentity:
    return NodeIdentity(nacl.signing.SigningKey(sign_seed), dh_private)


def node_key_from_seeds(sign_seed: bytes, dh_private: bytes) -> NodeKey:
    return identity_from_seeds(sign_seed, dh_private).node_key


KNOWN_KEY = node_key_from_seeds(bytes(range(32)), bytes(range(32, 64)))
# Computed once from the specification and pinned: if these change, every
# node key and fingerprint operators have already exchanged is broken.
KNOWN_ENCODED = (
    "dnk1aeb2cb576phbbpq5odorrz2lycmwpzgwgcn2kdk7dxoimzaskuy3qnmaolldmwea2gxou"
    "mu236iscobykhwsdiuohn26szoq2lgrmysu6aoahti"
)
KNOWN_FINGERPRINT = "01687 18819 04513 05066 71068"

seeds = st.binary(min_size=32, max_size=32)
node_keys = st.builds(node_key_from_seeds, seeds, seeds)


def spec_encode(version: int, sign_public: bytes, dh_public: bytes) -> str:
    """The text form written straight from the specification."""
    body = bytes([version]) + sign_public + dh_public
    checksum = hashlib.blake2b(body, digest_size=32, person=b"dorothy-nodekey").digest()
    payload = body + checksum[:4]
    return "dnk1" + base64.b32encode(payload).decode().rstrip("=").lower()


def decode_error(text: str) -> str:
    with pytest.raises(KeysError) as caught:
        NodeKey.decode(text)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- NodeKey ------------------------------------------------------------


def test_known_key_encoding_and_fingerprint_are_pinned():
    assert KNOWN_KEY.encode() == KNOWN_ENCODED
    assert str(KNOWN_KEY) == KNOWN_ENCODED
    assert len(KNOWN_ENCODED) == ENCODED_LENGTH == 115
    assert KNOWN_KEY.fingerprint() == KNOWN_FINGERPRINT


@given(node_keys)
def test_encoding_follows_the_specification(node_key):
    assert node_key.encode() == spec_encode(1, node_key.sign_public, node_key.dh_public)


@given(node_keys)
def test_fingerprint_follows_the_specification(node_key):
    digest = hashlib.blake2b(
        node_key.sign_public + node_key.dh_public, digest_size=32, person=b"dorothy-fpr"
    ).digest()
    digits = node_key.fingerprint().replace(" ", "")
    assert int(digits) == int.from_bytes(digest[:10], "big")
    assert re.fullmatch(r"[0-9]{5}( [0-9]{5}){4}", node_key.fingerprint())


@given(node_keys, st.sampled_from(["", " ", "\n", "\t ", "\r\n"]), st.booleans())
def test_round_trip_ignores_case_and_surrounding_whitespace(node_key, pad, upper):
    text = node_key.encode()
    text = text.upper() if upper else text
    assert NodeKey.decode(pad + text + pad) == node_key


def test_every_single_base32_substitution_is_caught():
    # Exhaustive for one key: every position, every other base32 character.
    for position, original in enumerate(KNOWN_ENCODED):
        for replacement in BASE32_ALPHABET:
            if replacement == original:
                continue
            before, after = KNOWN_ENCODED[:position], KNOWN_ENCODED[position + 1 :]
            message = decode_error(before + replacement + after)
            if position < 4:
                assert "should start with 'dnk1'" in message
            else:
                assert "checksum does not match" in message


@given(node_keys, st.integers(min_value=0, max_value=ENCODED_LENGTH - 1), st.characters())
def test_any_single_character_substitution_is_reported(node_key, position, replacement):
    encoded = node_key.encode()
    original = encoded[position]
    altered = encoded[:position] + replacement + encoded[position + 1 :]
    if replacement.lower() == original:
        assert NodeKey.decode(altered) == node_key  # only the case changed
        return
    message = decode_error(altered)
    if position < 4:
        assert "should start with 'dnk1'" in message
    elif replacement.lower() in BASE32_ALPHABET:
        assert "checksum does not match" in message
    elif replacement.isspace() and position == ENCODED_LENGTH - 1:
        assert "too short" in message  # the stray space at the end is stripped
    else:
        assert "invalid character" in message
        assert f"position {position + 1}" in message


def test_invalid_character_is_named_with_its_position():
    altered = KNOWN_ENCODED[:10] + "0" + KNOWN_ENCODED[11:]
    assert decode_error(altered).startswith("node key has an invalid character '0' at position 11")


def test_every_truncation_is_reported():
    for length in range(ENCODED_LENGTH):
        message = decode_error(KNOWN_ENCODED[:length])
        if length < 4:
            assert "should start with 'dnk1'" in message
        else:
            assert message == (
                f"node key is too short: {length} characters, expected {ENCODED_LENGTH}"
            )


def test_too_long_is_reported():
    message = decode_error(KNOWN_ENCODED + "a")
    assert message == f"node key is too long: 116 characters, expected {ENCODED_LENGTH}"


@pytest.mark.parametrize(
    "text", ["", "hello", "dnk", "ssh-ed25519 AAAA", "dnk2" + KNOWN_ENCODED[4:]]
)
def test_text_that_is_not_a_node_key(text):
    assert decode_error(text) == "not a Dorothy node key (it should start with 'dnk1')"


def test_unknown_version_is_reported():
    text = spec_encode(2, KNOWN_KEY.sign_public, KNOWN_KEY.dh_public)
    assert decode_error(text).startswith("unknown node key version 2")


def test_invalid_signing_key_is_reported():
    text = spec_encode(1, bytes(32), KNOWN_KEY.dh_public)
    assert "invalid Ed25519 signing key" in decode_error(text)


@given(st.text())
def test_arbitrary_text_never_raises_anything_but_keys_error(text):
    try:
        NodeKey.decode(text)
    except KeysError as err:
        assert "\n" not in str(err)


def test_node_key_checks_lengths():
    with pytest.raises(KeysError):
        NodeKey(bytes(31), bytes(32))
    with pytest.raises(KeysError):
        NodeKey(bytes(32), bytes(33))


def test_fingerprint_is_stable_and_distinguishes_keys():
    again = node_key_from_seeds(bytes(range(32)), bytes(range(32, 64)))
    other = node_key_from_seeds(bytes(range(1, 33)), bytes(range(32, 64)))
    assert again.fingerprint() == KNOWN_FINGERPRINT
    assert other.fingerprint() != KNOWN_FINGERPRINT


# --- NodeIdentity -------------------------------------------------------


def test_generate_makes_distinct_working_identities():
    first, second = NodeIdentity.generate(), NodeIdentity.generate()
    assert first.node_key != second.node_key
    signature = first.sign(b"evidence")
    assert len(signature) == 64
    nacl.signing.VerifyKey(first.node_key.sign_public).verify(b"evidence", signature)
    dh_public = nacl.public.PrivateKey(first.dh_private).public_key.encode()
    assert first.node_key.dh_public == dh_public


def test_repr_and_str_hide_private_keys():
    sign_seed, dh_private = bytes(range(32)), bytes(range(32, 64))
    identity = identity_from_seeds(sign_seed, dh_private)
    for shown in (repr(identity), str(identity)):
        for secret in (sign_seed, dh_private):
            assert secret.hex() not in shown
            assert repr(secret)[2:-1] not in shown
        assert KNOWN_FINGERPRINT in shown


def test_save_and_load_plain(tmp_path):
    path = tmp_path / "node.key"
    identity = NodeIdentity.generate()
    identity.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert not is_encrypted(path)
    loaded = NodeIdentity.load(path)
    assert loaded.node_key == identity.node_key
    assert loaded.sign(b"m") == identity.sign(b"m")  # Ed25519 is deterministic
    assert loaded.dh_private == identity.dh_private


def test_save_and_load_with_passphrase(tmp_path):
    path = tmp_path / "node.key"
    identity = NodeIdentity.generate()
    identity.save(path, PASSPHRASE, **FAST)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert is_encrypted(path)
    assert NodeIdentity.is_encrypted(path)
    data = path.read_bytes()
    assert identity.signing_key.encode() not in data
    assert identity.dh_private not in data
    assert NodeIdentity.load(path, PASSPHRASE).node_key == identity.node_key


def test_passphrase_for_a_plain_file_is_ignored(tmp_path):
    path = tmp_path / "node.key"
    identity = NodeIdentity.generate()
    identity.save(path)
    assert NodeIdentity.load(path, PASSPHRASE).node_key == identity.node_key


def test_wrong_passphrase(tmp_path):
    path = tmp_path / "node.key"
    NodeIdentity.generate().save(path, PASSPHRASE, **FAST)
    with pytest.raises(KeysError, match=r"^wrong passphrase for key file '.*node\.key'"):
        NodeIdentity.load(path, b"not it")


def test_missing_passphrase(tmp_path):
    path = tmp_path / "node.key"
    NodeIdentity.generate().save(path, PASSPHRASE, **FAST)
    with pytest.raises(KeysError, match="is passphrase-protected: a passphrase is required"):
        NodeIdentity.load(path)


def test_empty_passphrase_is_refused(tmp_path):
    with pytest.raises(KeysError, match="empty passphrase"):
        NodeIdentity.generate().save(tmp_path / "node.key", b"", **FAST)
    assert not (tmp_path / "node.key").exists()


def test_excessive_argon2_cost_is_refused_on_save(tmp_path):
    with pytest.raises(KeysError, match="memlimit"):
        NodeIdentity.generate().save(
            tmp_path / "node.key", PASSPHRASE, opslimit=1, memlimit=2**40
        )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o610, 0o601])
def test_load_refuses_a_key_others_can_access(tmp_path, mode):
    path = tmp_path / "node.key"
    NodeIdentity.generate().save(path)
    os.chmod(path, mode)
    expected = (
        f"Permissions {mode:04o} for '{path}' are too open: the node key must be "
        f"readable only by its owner. Run: chmod 600 {path}"
    )
    with pytest.raises(KeysError) as caught:
        NodeIdentity.load(path)
    assert str(caught.value) == expected
    with pytest.raises(KeysError, match="too open"):
        is_encrypted(path)


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "node.key"
    NodeIdentity.generate().save(path)
    before = path.read_bytes()
    with pytest.raises(KeysError, match="already exists; refusing to overwrite"):
        NodeIdentity.generate().save(path)
    assert path.read_bytes() == before


def test_save_refuses_to_follow_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    (tmp_path / "node.key").symlink_to(target)
    with pytest.raises(KeysError, match="already exists"):
        NodeIdentity.generate().save(tmp_path / "node.key")
    assert not target.exists()


@pytest.mark.parametrize("passphrase", [None, PASSPHRASE])
def test_every_truncated_key_file_is_refused(tmp_path, passphrase):
    source = tmp_path / "source.key"
    NodeIdentity.generate().save(source, passphrase, **FAST)
    whole = source.read_bytes()
    path = tmp_path / "node.key"
    for length in range(len(whole)):
        write_private(path, whole[:length])
        with pytest.raises(KeysError, match=re.escape(str(path))):
            NodeIdentity.load(path, passphrase)


def test_extra_bytes_after_the_map_are_refused(tmp_path):
    path = tmp_path / "node.key"
    NodeIdentity.generate().save(path)
    write_private(path, path.read_bytes() + b"\x00")
    with pytest.raises(KeysError, match="is damaged: it has extra bytes"):
        NodeIdentity.load(path)


def write_private(path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"-----BEGIN OPENSSH PRIVATE KEY-----\n", "is not a Dorothy key file"),
        (msgpack.packb({"hello": 1}), "is not a Dorothy key file"),
        (msgpack.packb({"v": 2, "kind": "plain"}), "has format version '2'"),
        (msgpack.packb({"v": True, "kind": "plain"}), "has format version 'True'"),
        (msgpack.packb({"v": 1, "kind": "rot13"}), "is damaged: unknown kind"),
        (
            msgpack.packb({"v": 1, "kind": "plain", "sign_seed": bytes(32)}),
            "is damaged: field 'dh_private' is missing",
        ),
        (
            msgpack.packb(
                {"v": 1, "kind": "plain", "sign_seed": bytes(31), "dh_private": bytes(32)}
            ),
            "is damaged: sign_seed should be 32 bytes",
        ),
        (
            msgpack.packb(
                {"v": 1, "kind": "plain", "sign_seed": bytes(32), "dh_private": bytes(32), "x": 1}
            ),
            "is damaged: it has an unexpected field 'x'",
        ),
        (
            msgpack.packb(
                {
                    "v": 1,
                    "kind": "argon2id-secretbox",
                    "salt": bytes(16),
                    "opslimit": 1,
                    "memlimit": 2**40,  # must be refused, not attempted
                    "box": bytes(64),
                }
            ),
            "is damaged: Argon2id memlimit must be",
        ),
    ],
)
def test_malformed_key_files_are_refused_by_name(tmp_path, content, message):
    path = tmp_path / "node.key"
    write_private(path, content)
    with pytest.raises(KeysError) as caught:
        NodeIdentity.load(path, PASSPHRASE)
    assert f"key file '{path}' {message}" in str(caught.value)


def test_sealed_part_must_be_plain_keys(tmp_path):
    # A box that decrypts correctly but holds another sealed map.
    salt = nacl.utils.random(argon2id.SALTBYTES)
    key = argon2id.kdf(32, PASSPHRASE, salt, **FAST)
    inner = msgpack.packb(
        {"v": 1, "kind": "argon2id-secretbox", "salt": salt, **FAST, "box": bytes(40)}
    )
    outer = {"v": 1, "kind": "argon2id-secretbox", "salt": salt, **FAST}
    outer["box"] = bytes(nacl.secret.SecretBox(key).encrypt(inner))
    path = tmp_path / "node.key"
    write_private(path, msgpack.packb(outer))
    with pytest.raises(KeysError, match="its sealed part is not plain keys"):
        NodeIdentity.load(path, PASSPHRASE)


@SHARED_TMP_PATH
@given(st.binary(max_size=300))
def test_garbage_key_file_raises_only_keys_error(tmp_path, content):
    path = tmp_path / "node.key"
    write_private(path, content)
    try:
        NodeIdentity.load(path, PASSPHRASE)
    except KeysError as err:
        assert str(path) in str(err)
        assert "\n" not in str(err)


def test_oversized_key_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "node.key"
    write_private(path, b"")
    os.truncate(path, MAX_KEY_FILE_BYTES + 1)  # sparse: nothing to read anyway
    with pytest.raises(KeysError, match="more than any real one"):
        NodeIdentity.load(path)


def test_missing_key_file(tmp_path):
    with pytest.raises(KeysError, match=r"key file '.*node\.key' does not exist"):
        NodeIdentity.load(tmp_path / "node.key")


def test_directory_and_fifo_are_refused_without_blocking(tmp_path):
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeysError, match="is not a regular file"):
        NodeIdentity.load(directory)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeysError, match="is not a regular file"):
        NodeIdentity.load(fifo)
