"""Length-prefixed frames: the only structure read from the network before
anything is decrypted.

A frame is a 4-byte big-endian length followed by that many bytes. The length
is checked against the decoder's limit as soon as its header is buffered, so
a peer announcing a 4 GiB frame costs us at most one read, not 4 GiB.
"""

from .errors import LocalProtocolError, RemoteProtocolError

HEADER_LEN = 4

# The largest frame of an established session. It must hold one chunk (up to
# MAX_CHUNK_SIZE, 4 MiB) with its message header and AEAD tag, and the largest
# manifest we accept (MAX_MANIFEST_BYTES); 16 MiB bounds the per-connection
# buffer while leaving room for a manifest of ~100,000 files.
MAX_FRAME = 16 * 1024 * 1024

# Before authentication the only frames are Noise handshake messages, which
# the Noise spec caps at 65535 bytes; an unauthenticated peer gets no more.
MAX_HANDSHAKE_FRAME = 65535


def encode_frame(payload: bytes, limit: int = MAX_FRAME) -> bytes:
    if len(payload) > limit:
        raise LocalProtocolError(f"frame of {len(payload)} bytes exceeds the {limit}-byte limit")
    return len(payload).to_bytes(HEADER_LEN, "big") + payload


class FrameDecoder:
    """Accumulates bytes and yields whole frames, refusing oversized ones early."""

    def __init__(self, limit: int = MAX_HANDSHAKE_FRAME):
        self.limit = limit
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data
        self._check_header()

    def _check_header(self) -> None:
        if len(self._buffer) >= HEADER_LEN:
            length = int.from_bytes(self._buffer[:HEADER_LEN], "big")
            if length > self.limit:
                raise RemoteProtocolError(
                    f"peer announced a {length}-byte frame; the limit is {self.limit}",
                    code="frame_too_large",
                )

    def next_frame(self) -> bytes | None:
        if len(self._buffer) < HEADER_LEN:
            return None
        self._check_header()
        length = int.from_bytes(self._buffer[:HEADER_LEN], "big")
        end = HEADER_LEN + length
        if len(self._buffer) < end:
            return None
        frame = bytes(self._buffer[HEADER_LEN:end])
        del self._buffer[:end]
        return frame

    @property
    def buffered(self) -> int:
        return len(self._buffer)
