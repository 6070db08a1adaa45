"""Per-chunk zstd compression, used only where it makes a chunk smaller, and
decompression that can never produce more than the chunk's declared length.

zstandard's one-shot `decompress` allocates whatever content size the frame
header declares, so a 24-byte frame claiming 2 GiB makes it try to allocate
2 GiB. So the header is read first: it must declare exactly the chunk's
length (Dorothy always writes the content size) and a window of at most
4 MiB. Only then is the frame decompressed in one shot, which allocates that
length once, verifies the content size, and fails on a truncated frame.
(A bounded streaming reader is safe too, but measured 378 against 10,055
MiB/s for this on log-like text.)
"""

import threading

import zstandard

from .errors import RemoteProtocolError

# Level 1: on log-like text it keeps most of the ratio of higher levels at
# several times their speed (SPEC.md 4.3 has the figures).
LEVEL = 1
# A chunk is at most 4 MiB, so no legitimate frame needs a larger window.
MAX_WINDOW = 1 << 22
# Incompressible chunks (encrypted containers, media, compressed archives:
# much of a seized disk) are recognised from a sample: SAMPLES pieces of
# SAMPLE_PIECE bytes spread over the chunk. Only if the sample shrinks by at
# least 1/SAMPLE_MIN_SAVING is the whole chunk compressed. On 1 MiB of random
# data the sample costs 0.03 ms against 0.18 ms for a full attempt (bench/micro.py).
SAMPLES = 16
SAMPLE_PIECE = 4096
SAMPLE_MIN_SAVING = 32


_per_thread = threading.local()


def _per_thread_instance(name: str, make):
    # One (de)compressor per thread, reused: zstandard's are not thread-safe,
    # and making one per call cost 7% of the sender's time on a folder of
    # small files, and the receiver 16 us per compressed chunk (23 against
    # 7 us for a 2 KiB chunk, 56 against 40 for 32 KiB), on its event loop.
    instance = getattr(_per_thread, name, None)
    if instance is None:
        instance = make()
        setattr(_per_thread, name, instance)
    return instance


def _compressor() -> zstandard.ZstdCompressor:
    return _per_thread_instance("compressor", lambda: zstandard.ZstdCompressor(level=LEVEL, write_content_size=True))


def _decompressor() -> zstandard.ZstdDecompressor:
    return _per_thread_instance("decompressor", lambda: zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW))


def _sample_compresses(data: bytes) -> bool:
    view = memoryview(data)
    stride = len(data) // SAMPLES
    sample = b"".join(view[i * stride : i * stride + SAMPLE_PIECE] for i in range(SAMPLES))
    saved = len(sample) - len(_compressor().compress(sample))
    return saved * SAMPLE_MIN_SAVING >= len(sample)


def compress_if_smaller(data: bytes) -> tuple[bool, bytes]:
    if len(data) >= 2 * SAMPLES * SAMPLE_PIECE and not _sample_compresses(data):
        return False, data
    compressed = _compressor().compress(data)
    if len(compressed) < len(data):
        return True, compressed
    return False, data


def decompress_exact(data: bytes, expected: int) -> bytes:
    """The decompressed chunk, which must be exactly `expected` bytes, from
    exactly one complete zstd frame."""
    try:
        header = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"chunk is not a zstd frame: {exc}", code="bad_chunk") from None
    if header.window_size > MAX_WINDOW:
        raise RemoteProtocolError(f"compressed chunk needs a {header.window_size}-byte window", code="bad_chunk")
    if header.content_size != expected:
        declared = "no size" if header.content_size == zstandard.CONTENTSIZE_UNKNOWN else f"{header.content_size} bytes"
        raise RemoteProtocolError(f"compressed chunk declares {declared}, expected {expected}", code="bad_chunk")
    try:
        # One pass: fails on a truncated frame, and on anything after it.
        out = _decompressor().decompress(data, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"chunk is not exactly one complete zstd frame: {exc}", code="bad_chunk") from None
    if len(out) != expected:
        raise RemoteProtocolError(f"chunk decompresses to {len(out)} bytes, expected {expected}", code="bad_chunk")
    return out
