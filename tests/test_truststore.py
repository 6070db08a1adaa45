"""The trust store: validation of names and addresses, and the shared file."""

import json
import os
import re
import threading

import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dorothy.keys.errors import KeysError
from dorothy.keys.identity import NodeIdentity
from dorothy.keys.nodekey import NodeKey
from dorothy.keys.truststore import Peer, TrustStore, parse_address, validate_peer_name

# Each example overwrites the same file completely, so one tmp_path is safe.
SHARED_TMP_PATH = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def make_key(number: int) -> NodeKey:
    """A distinct, valid node key per number, the same on every run."""
    seed = number.to_bytes(32, "big")
    return NodeIdentity(nacl.signing.SigningKey(seed), seed).node_key


KEY_A, KEY_B, KEY_C = make_key(1), make_key(2), make_key(3)


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "peers.json"


@pytest.fixture
def store(store_path):
    return TrustStore(store_path)


def error_of(call, *args) -> str:
    with pytest.raises(KeysError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- peer names ---------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "lab-b", "Lab_2.east", "0", "x" * 64, "a..b"])
def test_valid_peer_names(name):
    assert validate_peer_name(name) == name


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("", "cannot be empty"),
        ("x" * 65, "is too long: 65 characters, at most 64"),
        (".", "invalid peer name '.'"),
        ("..", "invalid peer name '..'"),
        (".hidden", "invalid peer name"),
        ("-rf", "invalid peer name"),
        ("a/b", "invalid peer name 'a/b'"),
        ("a b", "invalid peer name"),
        ("lab\n", "invalid peer name 'lab\\n'"),
        ("café", "invalid peer name"),
    ],
)
def test_invalid_peer_names(name, fragment):
    assert fragment in error_of(validate_peer_name, name)


@given(st.text())
def test_peer_name_validation_raises_only_keys_error(name):
    try:
        validate_peer_name(name)
    except KeysError as err:
        assert "\n" not in str(err)
    else:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name)


# --- addresses ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, host, port",
    [
        ("10.0.0.2:7000", "10.0.0.2", 7000),
        ("lab-b.example.org:1", "lab-b.example.org", 1),
        ("lab-b.example.org.:65535", "lab-b.example.org.", 65535),
        ("localhost:7000", "localhost", 7000),
        ("[::1]:7000", "::1", 7000),
        ("[2001:db8::2]:443", "2001:db8::2", 443),
        ("[fe80::1%eth0]:7000", "fe80::1%eth0", 7000),
    ],
)
def test_valid_addresses(text, host, port):
    assert parse_address(text) == (host, port)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "cannot be empty"),
        ("lab-b", "has no port"),
        ("lab-b:", "the port must be a number from 1 to 65535"),
        ("lab-b:0", "the port must be a number from 1 to 65535"),
        ("lab-b:65536", "the port must be a number from 1 to 65535"),
        ("lab-b:-1", "the port must be a number"),
        ("lab-b:７０００", "the port must be a number"),
        (":7000", "has no host"),
        ("::1:7000", "must be in brackets"),
        ("[::1:7000", "has '[' but no ']'"),
        ("[::1]", "has no port after ']'"),
        ("[::1]7000", "has no port after ']'"),
        ("[lab-b]:7000", "is not an IPv6 address"),
        ("[10.0.0.2]:7000", "is not an IPv6 address"),
        ("10.0.0.256:7000", "is not an IPv4 address"),
        ("lab b:7000", "contains a space or control character"),
        ("lab-b:7000\n", "contains a space or control character"),
        ("-lab:7000", "is not a valid host name"),
        ("lab..b:7000", "is not a valid host name"),
        ("x" * 64 + ".org:7000", "is not a valid host name"),
        ("http://lab-b:7000", "must be in brackets"),
    ],
)
def test_invalid_addresses(text, fragment):
    assert fragment in error_of(parse_address, text)


@given(st.text())
def test_address_parsing_raises_only_keys_error(text):
    try:
        host, port = parse_address(text)
    except KeysError as err:
        assert "\n" not in str(err)
    else:
        assert host and 1 <= port <= 65535


def test_peer_validates_and_splits_its_address():
    peer = Peer("lab-b", "[2001:db8::2]:7000", KEY_A)
    assert (peer.host, peer.port) == ("2001:db8::2", 7000)
    with pytest.raises(KeysError, match="invalid peer name"):
        Peer("../etc", "lab-b:7000", KEY_A)
    with pytest.raises(KeysError, match="has no port"):
        Peer("lab-b", "lab-b", KEY_A)


# --- the store ----------------------------------------------------------


def test_missing_file_is_an_empty_store(store, store_path):
    assert store.list() == []
    assert store.find_by_dh_key(KEY_A.dh_public) is None
    assert store.find_by_node_key(KEY_A) is None
    assert "no peer named 'lab-b'; see 'dorothy peer list'" == error_of(store.get, "lab-b")
    assert not store_path.exists()  # reading never creates the file


def test_add_list_get_find(store):
    added = store.add("lab-c", "10.0.0.3:7000", KEY_C)
    store.add("lab-a", "10.0.0.1:7000", KEY_A)
    assert added == Peer("lab-c", "10.0.0.3:7000", KEY_C)
    assert [peer.name for peer in store.list()] == ["lab-a", "lab-c"]
    assert store.get("lab-c") == added
    assert store.find_by_dh_key(KEY_C.dh_public) == added
    assert store.find_by_node_key(KEY_C) == added
    assert store.find_by_dh_key(KEY_B.dh_public) is None


def test_file_format_and_permissions(store, store_path):
    store.add("lab-a", "10.0.0.1:7000", KEY_A)
    assert os.stat(store_path).st_mode & 0o777 == 0o600
    assert os.stat(str(store_path) + ".lock").st_mode & 0o777 == 0o600
    assert json.loads(store_path.read_text()) == {
        "version": 1,
        "peers": [{"name": "lab-a", "address": "10.0.0.1:7000", "node_key": KEY_A.encode()}],
    }
    leftovers = [path.name for path in store_path.parent.iterdir()]
    assert sorted(leftovers) == ["peers.json", "peers.json.lock"]  # no temp files


@pytest.mark.parametrize("name", ["lab-a", "LAB-A"])
def test_duplicate_name_is_refused(store, store_path, name):
    store.add("lab-a", "10.0.0.1:7000", KEY_A)
    before = store_path.read_bytes()
    assert error_of(store.add, name, "10.0.0.2:7000", KEY_B) == (
        "a peer named 'lab-a' already exists; use 'dorothy peer replace' "
        "to change its key or address"
    )
    assert store_path.read_bytes() == before


@pytest.mark.parametrize(
    "clashing_key",
    [
        KEY_A,
        NodeKey(KEY_A.sign_public, KEY_B.dh_public),  # same signing key
        NodeKey(KEY_B.sign_public, KEY_A.dh_public),  # same X25519 key
    ],
)
def test_key_already_trusted_under_another_name_is_refused(store, clashing_key):
    store.add("lab-a", "10.0.0.1:7000", KEY_A)
    message = error_of(store.add, "lab-b", "10.0.0.2:7000", clashing_key)
    assert "already trusted as peer 'lab-a'" in message
    assert [peer.name for peer in store.list()] == ["lab-a"]


def test_invalid_entries_are_refused_before_writing(store, store_path):
    with pytest.raises(KeysError, match="invalid peer name"):
        store.add("a/b", "10.0.0.1:7000", KEY_A)
    with pytest.raises(KeysError, match="has no port"):
        store.add("lab-a", "10.0.0.1", KEY_A)
    assert not store_path.exists()


def test_changed_key_is_not_found_until_replaced(store):
    store.add("lab-a", "10.0.0.1:7000", KEY_A)
    # lab-a reinstalled (or an impostor): its new key is unknown, like a stranger's.
    assert store.find_by_dh_key(KEY_B.dh_public) is None
    old, new = store.replace("lab-a", None, KEY_B)
    assert old == Peer("lab-a", "10.0.0.1:7000", KEY_A)
    assert new == Peer("lab-a", "10.0.0.1:7000", KEY_B)
    assert store.find_by_dh_key(KEY_B.dh_public) == new
    assert store.find_by_dh_key(KEY_A.dh_public) is None
    assert store.find_by_node_key(KEY_A) is None


def test_replace_changes_address_and_keeps_rules(store):
    store.add("lab-a", "10.0.0.1:7000", KEY_A)
    store.add("lab-b", "10.0.0.2:7000", KEY_B)
    _, new = store.replace("lab-a", "[::1]:7001", KEY_A)  # same key, new address
    assert new.address == "[::1]:7001"
    assert "already trusted as peer 'lab-b'" in error_of(store.replace, "lab-a", None, KEY_B)
    assert "no peer named 'lab-z'" in error_of(store.replace, "lab-z", None, KEY_C)
    assert "has no port" in error_of(store.replace, "lab-a", "nowhere", KEY_C)
    assert store.get("lab-a") == new


def test_remove(store):
    added = store.add("lab-a", "10.0.0.1:7000", KEY_A)
    assert store.remove("lab-a") == added
    assert store.list() == []
    assert store.find_by_dh_key(KEY_A.dh_public) is None
    assert "no peer named 'lab-a'" in error_of(store.remove, "lab-a")
    store.add("lab-b", "10.0.0.2:7000", KEY_A)  # the key is free again


def test_changes_are_seen_by_another_store_object(store_path):
    cli, daemon = TrustStore(store_path), TrustStore(store_path)
    assert daemon.find_by_dh_key(KEY_A.dh_public) is None  # cache the empty view
    cli.add("lab-a", "10.0.0.1:7000", KEY_A)
    assert daemon.find_by_dh_key(KEY_A.dh_public).name == "lab-a"
    # Same length, same size of file: a change a stat-based cache could miss.
    cli.replace("lab-a", "10.0.0.9:7000", KEY_A)
    assert daemon.get("lab-a").address == "10.0.0.9:7000"
    daemon.remove("lab-a")
    assert cli.list() == []


def test_concurrent_writers_lose_no_update(store_path):
    per_writer = 20
    errors = []

    def writer(prefix: str, offset: int) -> None:
        store = TrustStore(store_path)  # own object, own lock descriptor
        try:
            for index in range(per_writer):
                store.add(f"{prefix}{index}", "10.0.0.1:7000", make_key(offset + index))
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [
        threading.Thread(target=writer, args=(prefix, offset))
        for prefix, offset in (("a", 100), ("b", 200), ("c", 300))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(TrustStore(store_path).list()) == 3 * per_writer


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "is damaged: it is not valid JSON"),
        (b"{not json", "is damaged: it is not valid JSON"),
        (b"\xff\xfe", "is damaged: it is not valid JSON"),
        (b"[" * 100_000, "is damaged: it is not valid JSON"),
        (b"[]", "is damaged: it is not a Dorothy trust store"),
        (b'{"version": 2, "peers": []}', "has format version '2'"),
        (b'{"version": true, "peers": []}', "has format version 'True'"),
        (b'{"version": 1, "peers": {}}', "is damaged: it should hold a version and a list"),
        (b'{"version": 1, "peers": [1]}', "is damaged: each peer needs exactly"),
        (
            b'{"version": 1, "peers": [{"name": "a", "address": "h:1", "node_key": 5}]}',
            "must be strings",
        ),
        (
            b'{"version": 1, "peers": [{"name": "a", "address": "h:1", "node_key": "dnk1x"}]}',
            "is damaged: peer 'a': node key is too short",
        ),
        (
            b'{"version": 1, "peers": [{"name": "../a", "address": "h:1", "node_key": "x"}]}',
            "is damaged: peer '../a': not a Dorothy node key",
        ),
    ],
)
def test_damaged_file_is_reported_by_name(store, store_path, content, fragment):
    store_path.write_bytes(content)
    message = error_of(store.list)
    assert message.startswith(f"trust store '{store_path}' ")
    assert fragment in message
    # Writers refuse too, rather than replacing a file they cannot read.
    assert fragment in error_of(store.add, "lab-a", "10.0.0.1:7000", KEY_A)
    assert store_path.read_bytes() == content


def test_duplicate_entries_in_the_file_are_reported(store, store_path):
    entry = {"name": "a", "address": "h:1", "node_key": KEY_A.encode()}
    twin = dict(entry, name="b")
    store_path.write_text(json.dumps({"version": 1, "peers": [entry, twin]}))
    assert "have the same key" in error_of(store.list)
    store_path.write_text(json.dumps({"version": 1, "peers": [entry, dict(entry, name="A")]}))
    assert "appears twice" in error_of(store.list)


def test_store_writable_by_others_is_refused(store, store_path):
    store.add("lab-a", "10.0.0.1:7000", KEY_A)
    os.chmod(store_path, 0o644)  # others may read public keys
    assert store.get("lab-a").node_key == KEY_A
    os.chmod(store_path, 0o620)
    assert error_of(store.list) == (
        f"Permissions 0620 for '{store_path}' are too open: the trust store must be "
        f"writable only by its owner. Run: chmod 600 {store_path}"
    )


@SHARED_TMP_PATH
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_garbage_store_raises_only_keys_error(tmp_path, content):
    path = tmp_path / "peers.json"
    path.write_bytes(content)
    try:
        TrustStore(path).list()
    except KeysError as err:
        assert str(path) in str(err)
        assert "\n" not in str(err)
