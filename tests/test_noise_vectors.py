"""Known-answer tests for protocol/noise.py against third-party Noise vectors.

Every file in tests/vectors/noise/ (or in the folder named by
$DOROTHY_NOISE_VECTORS) that parses as `{"vectors": [...]}` JSON is read at
collection time, and each vector for a protocol we implement becomes one test
case. Both roles are driven from the vector's fixed keys, so every ciphertext
must match byte for byte. Provenance: tests/vectors/noise/SOURCES.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from dorothy.protocol import noise
from dorothy.protocol.errors import ProtocolError

ENV_VAR = "DOROTHY_NOISE_VECTORS"
DEFAULT_DIR = Path(__file__).parent / "vectors" / "noise"
SUPPORTED = (noise.PROTOCOL_IK, noise.PROTOCOL_XX)


def _collect(folder: Path) -> tuple[list, list[str]]:
    """(pytest params, problems). Never raises, so a bad folder cannot break
    collection of the whole test session; problems become a failing test."""
    if not folder.is_dir():
        source = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "the default"
        return [], [f"vector folder {folder} ({source}) does not exist or is not a folder"]
    params, problems = [], []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_bytes())
        except OSError as exc:
            problems.append(f"cannot read {path}: {exc}")
            continue
        except (ValueError, RecursionError):
            continue  # not a vector file (SOURCES.md, for one)
        if not isinstance(data, dict) or not isinstance(data.get("vectors"), list):
            continue
        seen: Counter[str] = Counter()
        for vector in data["vectors"]:
            name = vector.get("protocol_name") if isinstance(vector, dict) else None
            if name in SUPPORTED:
                params.append(pytest.param(vector, id=f"{path.name}:{name}:{seen[name]}"))
                seen[name] += 1
    return params, problems


VECTOR_DIR = Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)
CASES, PROBLEMS = _collect(VECTOR_DIR)


def _hex(vector: dict, field: str) -> bytes | None:
    value = vector.get(field)
    return None if value is None else bytes.fromhex(value)


def _party(vector: dict, role: str) -> noise.HandshakeState:
    assert not vector.get(f"{role}_psks"), "PSK vector for a protocol name without psk"
    return noise.HandshakeState(
        vector["protocol_name"],
        initiator=role == "init",
        prologue=_hex(vector, f"{role}_prologue") or b"",
        static_private=_hex(vector, f"{role}_static"),
        ephemeral_private=_hex(vector, f"{role}_ephemeral"),
        remote_static=_hex(vector, f"{role}_remote_static"),
    )


def _run(vector: dict) -> None:
    """Replay the vector with both roles; any mismatch raises."""
    initiator, responder = _party(vector, "init"), _party(vector, "resp")
    messages = [
        (bytes.fromhex(m["payload"]), bytes.fromhex(m["ciphertext"]))
        for m in vector["messages"]
    ]
    transport = None
    for index, (payload, expected) in enumerate(messages):
        initiator_sends = index % 2 == 0
        if transport is None:
            writer, reader = (initiator, responder) if initiator_sends else (responder, initiator)
            sent = writer.write_message(payload)
            assert sent.hex() == expected.hex(), f"handshake message {index}"
            assert reader.read_message(sent) == payload, f"handshake message {index}"
            if initiator.complete:
                assert responder.complete
                assert initiator.handshake_hash == responder.handshake_hash
                init_send, init_recv = initiator.split()
                resp_recv, resp_send = responder.split()
                transport = (init_send, resp_recv), (resp_send, init_recv)
        else:
            sender, receiver = transport[0] if initiator_sends else transport[1]
            sent = sender.encrypt_with_ad(b"", payload)
            assert sent.hex() == expected.hex(), f"transport message {index}"
            assert receiver.decrypt_with_ad(b"", sent) == payload, f"transport message {index}"
    assert transport is not None, "the vector ends before the handshake completes"
    expected_hash = _hex(vector, "handshake_hash")
    if expected_hash is not None:
        assert initiator.handshake_hash.hex() == expected_hash.hex()


def test_vectors_were_found():
    """Zero matching vectors must not pass quietly as an empty parametrization."""
    assert not PROBLEMS, "; ".join(PROBLEMS)
    assert CASES, f"no vector for {', '.join(SUPPORTED)} in any JSON file under {VECTOR_DIR}"


@pytest.mark.parametrize("vector", CASES)
def test_vector(vector: dict):
    if vector.get("fail"):
        with pytest.raises((ProtocolError, AssertionError)):
            _run(vector)
    else:
        _run(vector)


def test_stored_vectors_are_unmodified():
    """The in-tree copies must match the sha256 recorded in SOURCES.md."""
    table_row = re.compile(r"^\| *([^ |]+) *\|.*\| *([0-9a-f]{64}) *\|", re.MULTILINE)
    recorded = dict(table_row.findall((DEFAULT_DIR / "SOURCES.md").read_text(encoding="utf-8")))
    assert recorded, "SOURCES.md records no sha256"
    for name, digest in recorded.items():
        assert hashlib.sha256((DEFAULT_DIR / name).read_bytes()).hexdigest() == digest, name
