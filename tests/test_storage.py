"""The receiver's partial files and the held-chunk records that let a
restarted node resume: what is found damaged, and what an upgrade forgets."""

import os
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dorothy.dorothyd.storage import CHECK_LEN, PartialFiles, chunk_check
from dorothy.dorothyd.store import Store
from dorothy.protocol.transfer import WriteChunk

CHUNK = 1 << 16


def write(partial: PartialFiles, file: int, index: int, data: bytes) -> bytes:
    return partial.write_batch([WriteChunk(file=file, index=index, offset=index * CHUNK, data=data)])[0]


def test_verify_finds_exactly_the_damaged_missing_and_short_chunks(tmp_path):
    sizes = [3 * CHUNK, CHUNK]
    chunks = [os.urandom(CHUNK) for _ in range(4)]
    partial = PartialFiles(tmp_path, "t", sizes)
    layout = [(0, 0, 0, CHUNK), (1, 0, CHUNK, CHUNK), (2, 0, 2 * CHUNK, CHUNK), (3, 1, 0, CHUNK)]
    held = {slot: write(partial, file, offset // CHUNK, chunks[slot]) for slot, file, offset, _ in layout}
    partial.flush()
    partial.close()
    with open(tmp_path / "t" / "0", "r+b") as f:  # one flipped bit in the second chunk
        f.seek(CHUNK + 1000)
        byte = f.read(1)[0]
        f.seek(CHUNK + 1000)
        f.write(bytes([byte ^ 0x10]))
    os.truncate(tmp_path / "t" / "1", CHUNK - 1)  # the last chunk cut short
    reopened = PartialFiles(tmp_path, "t", sizes)
    try:
        assert reopened.verify(held, layout) == [1, 3]
    finally:
        reopened.close()


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=4096), st.data())
def test_the_check_changes_with_any_byte_of_the_chunk(data, draw):
    position = draw.draw(st.integers(0, len(data) - 1))
    damaged = bytearray(data)
    damaged[position] ^= draw.draw(st.integers(1, 255))
    assert len(chunk_check(data)) == CHECK_LEN
    assert chunk_check(damaged) != chunk_check(data)
    assert chunk_check(memoryview(bytes(damaged))) == chunk_check(damaged)


def test_an_earlier_state_db_forgets_its_crc_rows_and_keeps_its_transfers(tmp_path):
    path = tmp_path / "state.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE chunks (transfer_id TEXT, slot INTEGER, crc INTEGER, PRIMARY KEY (transfer_id, slot))")
    db.execute("INSERT INTO chunks VALUES ('t', 0, 12345)")
    for transfer_id, state in (("t", "waiting"), ("d", "done")):
        db.execute(
            "INSERT INTO transfers (id, direction, peer, peer_node_key, state, manifest, manifest_hash, bytes_total,"
            " bytes_done, created, updated) VALUES (?, 'in', 'alpha', 'k', ?, x'', x'', 10, 7, 'c', 'u')",
            (transfer_id, state),
        )
    db.commit()
    db.close()
    store = Store(path)
    try:
        assert store.get("t")["state"] == "waiting"
        assert store.chunks("t") == {}  # fetched again instead of checked against a CRC
        assert store.get("t")["bytes_done"] == 0  # and its progress says so
        assert store.get("d")["bytes_done"] == 7  # a finished transfer is untouched
        store.add_chunks("t", [(0, b"c" * CHECK_LEN)], 5, "now")
        assert store.chunks("t") == {0: b"c" * CHECK_LEN}
    finally:
        store.close()
    with pytest.raises(sqlite3.OperationalError):
        sqlite3.connect(path).execute("SELECT * FROM chunks")
