"""Per-chunk zstd compression, used only where it makes a chunk smaller, and
decompression that can never produce more than the chunk's declared length.

zstandard's one-shot `decompress(max_output_size=...)` trusts a content size
written in the frame header, so a 24-byte frame claiming 2 GiB makes it try
to allocate 2 GiB. We always stream instead: the reader is asked for at most
`expected + 1` bytes, with the window bounded, so a bomb costs at most one
chunk of memory and is refused.
"""

import zstandard

from .errors import RemoteProtocolError

# Level 1: on log-like text it keeps most of the ratio of higher levels at
# several times their speed (SPEC.md 4.3 has the figures).
LEVEL = 1
# A chunk is at most 4 MiB, so no legitimate frame needs a larger window.
MAX_WINDOW = 1 << 22

def compress_if_smaller(data: bytes) -> tuple[bool, bytes]:
    # A compressor per call: zstandard's compressors are not thread-safe,
    # senders compress in worker threads, and creating one costs nothing
    # measurable (0.169 against 0.163 ms per MiB reused).
    compressed = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True).compress(data)
    if len(compressed) < len(data):
        return True, compressed
    return False, data


def decompress_exact(data: bytes, expected: int) -> bytes:
    """The decompressed chunk, which must be exactly `expected` bytes."""
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    try:
        with decompressor.stream_reader(data, read_across_frames=False) as reader:
            out = reader.read(expected + 1)
            while len(out) <= expected:
                more = reader.read(expected + 1 - len(out))
                if not more:
                    break
                out += more
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"chunk does not decompress: {exc}", code="bad_chunk") from None
    if len(out) == expected and not _ends_cleanly(data):
        raise RemoteProtocolError("chunk is not exactly one complete zstd frame", code="bad_chunk")
    if len(out) != expected:
        actual = f"more than {expected}" if len(out) > expected else str(len(out))
        raise RemoteProtocolError(f"chunk decompresses to {actual} bytes, expected {expected}", code="bad_chunk")
    return out


def _ends_cleanly(data: bytes) -> bool:
    """The frame is complete (checksum included) with nothing after it. Run
    only once the bounded read proved the output fits in one chunk."""
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompressobj(read_across_frames=False)
    try:
        decompressor.decompress(data)
    except zstandard.ZstdError:
        return False
    return decompressor.eof and not decompressor.unused_data
