"""protocol/compression.py: chunks are compressed only when that helps, and
a peer's compressed chunk can never cost more memory than one chunk.

The hostile frames here are the ones a bomb-aware decoder must survive: a
real high-ratio frame (256 MiB of zeros in ~8 KiB), and a tiny frame whose
header merely *claims* 2 GiB of content, which makes zstandard's one-shot
`decompress()` allocate 2 GiB before it reads a single block.
"""

from __future__ import annotations

import random
import struct
import time
import tracemalloc

import pytest
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dorothy.protocol.compression import MAX_WINDOW, compress_if_smaller, decompress_exact
from dorothy.protocol.errors import RemoteProtocolError
from dorothy.protocol.manifest import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE

MiB = 1 << 20
MAGIC = b"\x28\xb5\x2f\xfd"  # RFC 8878 3.1.1, little-endian 0xFD2FB528
# Memory a chunk decode may use: the output (at most one chunk, 4 MiB) plus
# decoder state; far below what a bomb would need.
MEMORY_BUDGET = 64 * MiB

TEXT = b"".join(b"2024-05-01T12:00:%02d host sshd[%d]: Accepted publickey for root\n" % (i % 60, i) for i in range(4000))


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def refused(data: bytes, expected: int) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decompress_exact(data, expected)
    assert info.value.code == "bad_chunk"
    return info.value


def peak_python_memory(call) -> int:
    """Peak bytes allocated through Python's allocators while `call` runs
    (bytes objects, including any output buffer zstandard makes)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def block_header(size: int, block_type: int, last: bool) -> bytes:
    """RFC 8878 3.1.1.2: Last_Block (1 bit), Block_Type (2), Block_Size (21), little-endian."""
    return (int(last) | block_type << 1 | size << 3).to_bytes(3, "little")


def frame_claiming(content_size: int, *, single_segment: bool = True, payload: bytes = b"x") -> bytes:
    """A hand-built frame whose header declares `content_size` bytes and whose
    one (raw) block holds only `payload`."""
    fcs_flag = 3 if content_size >= 1 << 32 else 2  # 8 or 4 bytes of Frame_Content_Size
    descriptor = fcs_flag << 6 | int(single_segment) << 5
    window = b"" if single_segment else bytes([(20 - 10) << 3])  # Window_Descriptor: 1 MiB
    fcs = content_size.to_bytes(8 if fcs_flag == 3 else 4, "little")
    return MAGIC + bytes([descriptor]) + window + fcs + block_header(len(payload), 0, True) + payload


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(256 * MiB))
    assert len(data) < 64 * 1024
    return data


# --- compress_if_smaller --------------------------------------------------------------


def test_random_data_is_sent_as_it_is():
    data = random_bytes(DEFAULT_CHUNK_SIZE)
    compressed, payload = compress_if_smaller(data)
    assert compressed is False
    assert payload == data


def test_text_is_compressed_and_round_trips():
    compressed, payload = compress_if_smaller(TEXT)
    assert compressed is True
    assert len(payload) < len(TEXT) // 4
    assert decompress_exact(payload, len(TEXT)) == TEXT


@pytest.mark.parametrize("layout", ["text then random", "random then text", "interleaved 64 KiB"])
def test_a_chunk_with_compressible_parts_anywhere_is_compressed(layout):
    # The sample spans the whole chunk, so compressible data is found
    # wherever it lies, not only at the start.
    half = DEFAULT_CHUNK_SIZE // 2
    text = (TEXT * (DEFAULT_CHUNK_SIZE // len(TEXT) + 1))[:half]
    noise = random_bytes(half)
    if layout == "text then random":
        data = text + noise
    elif layout == "random then text":
        data = noise + text
    else:
        piece = 64 << 10
        data = b"".join(text[i : i + piece] + noise[i : i + piece] for i in range(0, half, piece))
    compressed, payload = compress_if_smaller(data)
    assert compressed
    assert len(payload) < len(data) * 3 // 4
    assert decompress_exact(payload, len(data)) == data


def test_the_empty_chunk_is_not_compressed():
    assert compress_if_smaller(b"") == (False, b"")


@given(st.binary(max_size=4096), st.integers(0, 3))
@settings(max_examples=200, deadline=None)
@example(b"", 0)
@example(b"a", 0)
@example(b"\x00" * 4096, 0)
def test_compress_if_smaller_never_grows_and_always_round_trips(data, repeat):
    data = data * (1 << repeat)
    compressed, payload = compress_if_smaller(data)
    assert len(payload) <= len(data)
    if compressed:
        assert len(payload) < len(data)
        assert decompress_exact(payload, len(data)) == data
    else:
        assert payload == data


def test_a_full_size_chunk_round_trips():
    data = (TEXT * (MAX_CHUNK_SIZE // len(TEXT) + 1))[:MAX_CHUNK_SIZE]
    compressed, payload = compress_if_smaller(data)
    assert compressed
    assert decompress_exact(payload, MAX_CHUNK_SIZE) == data


# --- decompress_exact: wrong lengths ----------------------------------------------------


def test_output_shorter_than_expected_is_refused():
    _, payload = compress_if_smaller(TEXT)
    error = refused(payload, len(TEXT) + 1)
    assert f"declares {len(TEXT)} bytes, expected {len(TEXT) + 1}" in str(error)


def test_output_longer_than_expected_is_refused():
    _, payload = compress_if_smaller(TEXT)
    error = refused(payload, len(TEXT) - 1)
    assert f"declares {len(TEXT)} bytes, expected {len(TEXT) - 1}" in str(error)


def test_two_frames_back_to_back_are_refused():
    _, payload = compress_if_smaller(TEXT)
    refused(payload + payload, len(TEXT))


def test_trailing_garbage_after_a_frame_is_refused():
    _, payload = compress_if_smaller(TEXT)
    refused(payload + b"junk", len(TEXT))


def test_every_truncation_of_a_frame_is_refused():
    data = TEXT[:20000]
    compressed, payload = compress_if_smaller(data)
    assert compressed
    for cut in range(len(payload)):
        refused(payload[:cut], len(data))


@given(st.lists(st.tuples(st.integers(200, 6000), st.sampled_from(["whole", "cut", "tail"]), st.integers(0, 1 << 16)), min_size=2, max_size=8))
@settings(max_examples=100, deadline=None)
def test_a_refused_frame_leaves_nothing_behind_for_the_next_chunk(steps):
    # Decompressors are reused per thread: a frame refused half-way must not
    # leave state that changes how the next chunk decodes.
    for length, damage, at in steps:
        plain = TEXT[at % 1000 : at % 1000 + length]
        compressed, frame = compress_if_smaller(plain)
        assert compressed
        if damage == "whole":
            assert decompress_exact(frame, len(plain)) == plain
        elif damage == "cut":
            refused(frame[: at % len(frame)], len(plain))
        else:
            refused(frame + frame[: 1 + at % len(frame)], len(plain))


def test_a_corrupted_frame_is_refused_or_keeps_the_chunk_length():
    data = TEXT[:5000]
    _, payload = compress_if_smaller(data)
    for at in range(len(payload)):
        mutated = bytearray(payload)
        mutated[at] ^= 0xFF
        try:
            out = decompress_exact(bytes(mutated), len(data))
        except RemoteProtocolError:
            continue
        # zstd frames without a checksum can decode a corrupted literal to
        # other bytes of the right length: the whole-file SHA-256 catches that.
        assert len(out) == len(data)


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00", b"hello world", MAGIC, MAGIC + b"\x00", bytes(64), random_bytes(1024, seed=1), MAGIC + random_bytes(64, seed=2)],
)
@pytest.mark.parametrize("expected", [1, 11, DEFAULT_CHUNK_SIZE])
def test_garbage_is_refused(garbage, expected):
    refused(garbage, expected)


def test_a_skippable_frame_is_not_content():
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"abcd"
    refused(skippable, 4)


def test_a_frame_needing_a_window_above_the_limit_is_refused():
    data = random_bytes(1 << 16) * 40
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=27)
    streaming = zstandard.ZstdCompressor(compression_params=params).compressobj()  # size unknown: full window
    frame = streaming.compress(data) + streaming.flush()
    assert zstandard.get_frame_parameters(frame).window_size > MAX_WINDOW
    assert "byte window" in str(refused(frame, len(data)))


def two_block_frame(first: bytes, second: bytes, *, checksum: bool = False) -> bytes:
    """Single-segment frame with its content size, two raw blocks."""
    size = len(first) + len(second)
    assert size < 256
    frame = MAGIC + bytes([0x20 | int(checksum) << 2, size])
    return frame + block_header(len(first), 0, False) + first + block_header(len(second), 0, True) + second


def test_a_well_formed_two_block_frame_is_accepted():
    assert decompress_exact(two_block_frame(b"0123456789", b"abcde"), 15) == b"0123456789abcde"


def test_a_frame_cut_at_a_block_boundary_is_refused():
    # The first block alone is exactly `expected` bytes, but the frame never
    # ends: its header says 15 bytes and the last block is missing.
    frame = two_block_frame(b"0123456789", b"abcde")
    cut = frame[: frame.index(b"9") + 1]
    refused(cut, 10)


def test_a_frame_whose_checksum_is_cut_off_is_refused():
    data = TEXT[:5000]
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(data)
    assert decompress_exact(frame, len(data)) == data
    bad = bytearray(frame)
    bad[-1] ^= 1
    assert "checksum" in str(refused(bytes(bad), len(data)))
    refused(frame[:-4], len(data))



# --- decompress_exact: bombs ----------------------------------------------------------


def test_a_zstd_bomb_is_refused_within_one_chunk_of_memory(bomb):
    expected = MiB
    peak = peak_python_memory(lambda: refused(bomb, expected))
    assert peak < 4 * MiB, f"peak {peak} bytes"


def test_a_bomb_is_refused_at_every_legal_chunk_size(bomb):
    for expected in (1 << 16, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE):
        error = refused(bomb, expected)
        assert f"expected {expected}" in str(error)


@pytest.mark.parametrize("single_segment", [True, False])
def test_a_tiny_frame_claiming_2_gib_is_refused_quickly_without_allocating_it(single_segment):
    frame = frame_claiming(2 << 30, single_segment=single_segment)
    assert len(frame) <= 24
    # The frame really is what the issue describes: zstd reads 2 GiB from it.
    assert zstandard.get_frame_parameters(frame).content_size == 2 << 30
    start = time.perf_counter()
    peak = peak_python_memory(lambda: refused(frame, DEFAULT_CHUNK_SIZE))
    assert time.perf_counter() - start < 1.0
    assert peak < 4 * MiB, f"peak {peak} bytes"


def test_the_issue_frame_built_by_patching_a_real_frame():
    """Compress a small input with its content size, then rewrite
    Frame_Content_Size to 2 GiB: a real encoder's frame with a lying header."""
    small = b"A" * 100
    frame = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(small))
    descriptor = frame[4]
    assert descriptor >> 6 == 0 and descriptor & 0x20  # 1-byte FCS, single segment
    # Widen the FCS field to 4 bytes (flag 2) holding 2 GiB.
    patched = bytes(frame[:4]) + bytes([descriptor | 0x80]) + (2 << 30).to_bytes(4, "little") + bytes(frame[6:])
    assert zstandard.get_frame_parameters(patched).content_size == 2 << 30
    assert len(patched) <= 24
    peak = peak_python_memory(lambda: refused(patched, len(small)))
    assert peak < 4 * MiB


def test_a_frame_claiming_more_than_it_holds_is_refused_at_the_right_length():
    # A legal window, a declared size of 2 GiB, and exactly `expected` bytes of content.
    frame = frame_claiming(2 << 30, single_segment=False, payload=b"0123456789")
    refused(frame, 10)


def test_a_frame_claiming_an_exabyte_is_refused():
    refused(frame_claiming(1 << 60), DEFAULT_CHUNK_SIZE)


def test_bomb_memory_stays_bounded_in_a_fresh_process(bomb, tmp_path):
    """tracemalloc sees Python's buffers only; zstd's own state is malloc'd.
    In a child process with its address space capped at its current size
    plus 64 MiB, both decodes must still finish and refuse."""
    import subprocess
    import sys

    bomb_file = tmp_path / "bomb.zst"
    bomb_file.write_bytes(bomb)
    script = f"""
import resource, sys
from dorothy.protocol.compression import decompress_exact
from dorothy.protocol.errors import RemoteProtocolError
frames = [open({str(bomb_file)!r}, "rb").read(), {frame_claiming(2 << 30)!r}, {frame_claiming(2 << 30, single_segment=False)!r}]
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + {MEMORY_BUDGET}, vm + {MEMORY_BUDGET}))
for frame in frames:
    try:
        decompress_exact(frame, {MiB})
    except RemoteProtocolError:
        continue
    sys.exit("accepted")
print("refused all")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused all"


# --- fuzzing ------------------------------------------------------------------------


@given(st.binary(max_size=256), st.integers(0, MAX_CHUNK_SIZE))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_raise_only_remote_protocol_error(data, expected):
    try:
        out = decompress_exact(data, expected)
    except RemoteProtocolError:
        return
    assert len(out) == expected


@given(st.binary(max_size=64), st.integers(0, 1 << 16))
@settings(max_examples=300, deadline=None)
def test_arbitrary_frames_raise_only_remote_protocol_error(tail, expected):
    # Starting with the magic number gets past the first check, into header parsing.
    try:
        out = decompress_exact(MAGIC + tail, expected)
    except RemoteProtocolError:
        return
    assert len(out) == expected


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_mutated_real_frames_raise_only_remote_protocol_error(data):
    plain = TEXT[: data.draw(st.integers(1, 3000))]
    _, frame = compress_if_smaller(plain)
    mutated = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    try:
        out = decompress_exact(bytes(mutated), len(plain))
    except RemoteProtocolError:
        return
    assert len(out) == len(plain)
