"""Length-prefixed frames: the only structure read from the network before
anything is decrypted.

A frame is a 4-byte big-endian length followed by that many bytes. The length
is checked against the decoder's limit as soon as its header is buffered, so
a peer announcing a 4 GiB frame costs us at most one read, not 4 GiB.
"""

from collections import deque
from itertools import islice

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


# Reads shorter than this are gathered into one buffer (see FrameDecoder).
SMALL_READ = 4096


class FrameDecoder:
    """Accumulates bytes and yields whole frames, refusing oversized ones early.

    Received pieces are kept as they came: a frame inside one piece is handed
    over as a view of it, and a frame spread over several reads costs one
    join. (At 1 MiB per record, each copy avoided is about 0.07 ms of CPU.)
    Small reads are gathered into one growing piece instead, so a peer that
    trickles a frame a byte at a time costs its bytes, not an object each.
    """

    def __init__(self, limit: int = MAX_HANDSHAKE_FRAME):
        self.limit = limit
        self._pieces: deque[bytes | bytearray] = deque()
        self._offset = 0  # into the first piece
        self._size = 0
        # The last piece, while small reads may still be appended to it; no
        # longer once a frame has been handed over (its view may point into it).
        self._gathering: bytearray | None = None

    def receive_data(self, data: bytes) -> None:
        if data:
            if len(data) < SMALL_READ:
                if self._gathering is None:
                    self._gathering = bytearray()
                    self._pieces.append(self._gathering)
                self._gathering += data
            else:
                self._gathering = None
                self._pieces.append(data)
            self._size += len(data)
        self._frame_length()

    def _frame_length(self) -> int | None:
        """The buffered frame's length, checked against the limit."""
        if self._size < HEADER_LEN:
            return None
        header, offset = b"", self._offset
        for piece in self._pieces:
            header += piece[offset : offset + HEADER_LEN - len(header)]
            if len(header) == HEADER_LEN:
                break
            offset = 0
        length = int.from_bytes(header, "big")
        if length > self.limit:
            raise RemoteProtocolError(
                f"peer announced a {length}-byte frame; the limit is {self.limit}",
                code="frame_too_large",
            )
        return length

    def next_frame(self) -> memoryview | None:
        length = self._frame_length()
        if length is None or self._size < HEADER_LEN + length:
            return None
        self._gathering = None
        end = self._offset + HEADER_LEN + length
        if len(self._pieces[0]) < end:  # spread over several reads: join them once
            rest = islice(self._pieces, 1, None)
            self._pieces = deque([b"".join([memoryview(self._pieces[0])[self._offset :], *rest])])
            end -= self._offset
            self._offset = 0
        frame = memoryview(self._pieces[0])[self._offset + HEADER_LEN : end]
        self._offset = end
        self._size -= HEADER_LEN + length
        if self._offset == len(self._pieces[0]):
            self._pieces.popleft()
            self._offset = 0
        return frame

    @property
    def wanted(self) -> int:
        """How many more bytes complete the next frame (at least 1; of the
        header alone until it is buffered)."""
        length = self._frame_length()
        if length is None:
            return HEADER_LEN - self._size
        return max(1, HEADER_LEN + length - self._size)

    @property
    def buffered(self) -> int:
        return self._size
