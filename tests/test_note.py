"""dorothyd/note.py: C2SP signed notes (against golang.org/x/mod's known
answer, tests/vectors/merkle/note_ed25519_kat.json) and checkpoint bodies."""

import base64
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dorothy.dorothyd import note
from dorothy.dorothyd.merkle import EMPTY_ROOT
from dorothy.dorothyd.note import Checkpoint, NoteError

KAT = json.loads((Path(__file__).parent / "vectors" / "merkle" / "note_ed25519_kat.json").read_text())
T0 = datetime(2026, 11, 29, 6, 40, 0, 123456, tzinfo=timezone.utc)


class Signer:
    """Stand-in for keys/'s node identity: the duck-typed signer interface."""

    def __init__(self, seed: int = 1):
        self.signing_key = nacl.signing.SigningKey(bytes([seed]) * 32)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature


def _public(signer: Signer) -> bytes:
    return signer.signing_key.verify_key.encode()


def test_known_answer_note_verifies():
    assert note.verify_note(KAT["note"], KAT["verifier_key"]) == KAT["text"]


def test_verifier_key_is_rebuilt_from_name_and_public_key():
    name, _, encoded = KAT["verifier_key"].split("+")
    public = base64.b64decode(encoded)[1:]
    assert note.verifier_key(name, public) == KAT["verifier_key"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda n: n.replace("cryptography", "cryptographY"),  # text
        lambda n: n.replace("x08go", "x08gp"),  # key ID
        lambda n: n.replace("JnAM=", "JnAN="),  # signature
        lambda n: n.replace("— PeterNeumann", "— PeterNeumanm"),  # key name: unknown key
        lambda n: n.replace("\n\n—", "\n—"),  # no blank line
        lambda n: n.replace("—", "-"),  # not an em dash
        lambda n: n[:-1],  # no final newline
        lambda n: n.replace("problem,", "problem,\t"),  # control character
        lambda n: n.replace("JnAM=", "JnAM"),  # unpadded base64
    ],
)
def test_modified_known_answer_note_is_rejected(mutate):
    modified = mutate(KAT["note"])
    assert modified != KAT["note"]
    with pytest.raises(NoteError):
        note.verify_note(modified, KAT["verifier_key"])


def test_unknown_signatures_are_ignored():
    other = note.sign_note(KAT["text"], "someone.else", Signer(7))
    extra = KAT["note"] + other.split("\n\n")[-1]
    assert note.verify_note(extra, KAT["verifier_key"]) == KAT["text"]


def test_round_trip_and_wrong_key():
    signer = Signer()
    signed = note.sign_note("hello\nworld\n", "example.org/log", signer)
    vkey = note.verifier_key("example.org/log", _public(signer))
    assert note.verify_note(signed, vkey) == "hello\nworld\n"
    with pytest.raises(NoteError):
        note.verify_note(signed, note.verifier_key("example.org/log", _public(Signer(2))))


@pytest.mark.parametrize(
    "vkey",
    [
        "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong key ID
        "PeterNeumann+c74f20a3+AhpjZAcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # not type 0x01
        "PeterNeumann+c74f20a3",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ],
)
def test_malformed_verifier_keys_are_rejected(vkey):
    with pytest.raises(NoteError):
        note.verify_note(KAT["note"], vkey)


@given(st.data())
def test_any_single_character_change_is_rejected(data):
    signer = Signer()
    signed = note.sign_note("origin\n42\nsome text\n", "example.org/log", signer)
    vkey = note.verifier_key("example.org/log", _public(signer))
    position = data.draw(st.integers(0, len(signed) - 1))
    replacement = data.draw(st.characters(codec="utf-8").filter(lambda c: c != signed[position]))
    with pytest.raises(NoteError):
        note.verify_note(signed[:position] + replacement + signed[position + 1 :], vkey)


def test_sign_refuses_bad_text_and_names():
    for text, name in [("no newline", "n"), ("a\x00b\n", "n"), ("ok\n", "has space"), ("ok\n", "a+b")]:
        with pytest.raises(NoteError):
            note.sign_note(text, name, Signer())


def test_time_format_round_trip_and_strictness():
    assert note.format_utc(T0) == "2026-11-29T06:40:00.123456Z"
    assert note.parse_utc("2026-11-29T06:40:00.123456Z") == T0
    later = T0.astimezone(timezone(timedelta(hours=2)))
    assert note.format_utc(later) == "2026-11-29T06:40:00.123456Z"
    with pytest.raises(ValueError):
        note.format_utc(datetime(2026, 1, 1))
    for bad in ["2026-11-29T06:40:00Z", "2026-11-29 06:40:00.123456Z", "2026-02-30T00:00:00.000000Z", 5]:
        with pytest.raises(ValueError):
            note.parse_utc(bad)


roots = st.binary(min_size=32, max_size=32)
times = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(timezone.utc)
)


@given(st.integers(1, (1 << 64) - 1), roots, times)
def test_checkpoint_round_trip(size, root, moment):
    checkpoint = Checkpoint("dorothy-ledger/0123456789abcdef", size, root, moment)
    assert Checkpoint.parse(checkpoint.encode()) == checkpoint


def test_checkpoint_text_shape():
    checkpoint = Checkpoint("dorothy-ledger/0123456789abcdef", 3, bytes(range(32)), T0)
    assert checkpoint.encode() == (
        "dorothy-ledger/0123456789abcdef\n3\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
        "time 2026-11-29T06:40:00.123456Z\n"
    )


GOOD = "o\n3\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\ntime 2026-11-29T06:40:00.123456Z\n"


@pytest.mark.parametrize(
    "text",
    [
        GOOD.replace("\n3\n", "\n03\n"),  # leading zero
        GOOD.replace("\n3\n", "\n-3\n"),
        GOOD.replace("\n3\n", "\n18446744073709551616\n"),  # 2^64
        GOOD.replace("Hh8=", "Hh9="),  # non-canonical base64
        GOOD.replace("AAEC", ""),  # root not 32 bytes
        GOOD.replace("time 2026-11-29T06:40:00.123456Z\n", ""),  # no time
        GOOD.replace("time ", "when "),
        GOOD + "extra\n",
        GOOD.replace("o\n", "o o\n", 1),  # space in origin
        GOOD[:-1],
        "o\n0\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\ntime 2026-11-29T06:40:00.123456Z\n",  # size 0
    ],
)
def test_checkpoint_parse_is_strict(text):
    with pytest.raises(NoteError):
        Checkpoint.parse(text)


def test_empty_checkpoint_uses_the_empty_root():
    checkpoint = Checkpoint("o", 0, EMPTY_ROOT, T0)
    assert Checkpoint.parse(checkpoint.encode()) == checkpoint


def test_verify_checkpoint_binds_origin_to_key():
    signer = Signer()
    public = _public(signer)
    origin = note.checkpoint_origin(public)
    assert origin.startswith("dorothy-ledger/") and len(origin) == len("dorothy-ledger/") + 16
    checkpoint = Checkpoint(origin, 5, bytes(32), T0)
    signed = note.sign_note(checkpoint.encode(), origin, signer)
    assert note.verify_checkpoint(signed, public) == checkpoint
    assert note.unverified_checkpoint(signed) == checkpoint
    with pytest.raises(NoteError):
        note.verify_checkpoint(signed, _public(Signer(2)))
    # Signed by the right key but claiming another log's origin.
    foreign = Checkpoint("dorothy-ledger/ffffffffffffffff", 5, bytes(32), T0)
    with pytest.raises(NoteError):
        note.verify_checkpoint(note.sign_note(foreign.encode(), origin, signer), public)
