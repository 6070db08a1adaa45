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


# An empty buffer larger than this is let go: a chunk record (at most 4 MiB)
# and a read fit in it, and only a large manifest needs more, once.
KEEP_BUFFER_MAX = 8 << 20


def encode_frame(payload: bytes, limit: int = MAX_FRAME) -> bytes:
    if len(payload) > limit:
        raise LocalProtocolError(f"frame of {len(payload)} bytes exceeds the {limit}-byte limit")
    return len(payload).to_bytes(HEADER_LEN, "big") + payload


class FrameDecoder:
    """Accumulates bytes and yields whole frames, refusing oversized ones early.

    Bytes go into one buffer, either copied in (`receive_data`) or received
    straight into it (`receive_buffer`, then `received_into`: no copy at
    all), and each frame is handed over as a view of that buffer, valid
    until bytes are added again. A frame therefore costs no join however
    many reads it took (a 2 MiB record arrives in several); only the start
    of a frame left at the buffer's end is moved, when the rest would not
    fit behind it. The buffer holds what the caller asked room for and the
    frame being received, whose length is checked against the limit before
    the buffer grows for it; it shrinks back once a large frame is through.
    """

    def __init__(self, limit: int = MAX_HANDSHAKE_FRAME):
        self.limit = limit
        self._buffer = bytearray()
        self._start = 0  # first byte not yet handed over
        self._end = 0  # end of the bytes received

    def receive_data(self, data: bytes) -> None:
        if data:
            self.receive_buffer(len(data))[: len(data)] = data
            self._end += len(data)
        self._frame_length()

    def receive_buffer(self, size: int) -> memoryview:
        """A writable view of at least `size` free bytes, and at least the
        rest of the frame being received, to receive into; then call
        `received_into`."""
        length = self._frame_length()
        pending = self._end - self._start
        size = max(size, 0 if length is None else HEADER_LEN + length - pending)
        if not pending:
            self._start = self._end = 0
            if len(self._buffer) > KEEP_BUFFER_MAX:  # a manifest's megabytes are not kept for the chunks
                self._buffer = bytearray()
        if len(self._buffer) - self._end < size:
            # Only the pending bytes move: to the front, or into a larger
            # buffer (then views still held of the old one stay as they were).
            target = self._buffer if len(self._buffer) >= pending + size else bytearray(pending + size)
            target[:pending] = self._buffer[self._start : self._end]
            self._buffer, self._start, self._end = target, 0, pending
        return memoryview(self._buffer)[self._end :]

    def received_into(self, count: int) -> None:
        """`count` bytes were written at the start of the view that
        `receive_buffer` returned."""
        if not 0 <= count <= len(self._buffer) - self._end:
            raise LocalProtocolError(f"received {count} bytes into a buffer of {len(self._buffer) - self._end}")
        self._end += count
        self._frame_length()

    def _frame_length(self) -> int | None:
        """The buffered frame's length, checked against the limit."""
        if self._end - self._start < HEADER_LEN:
            return None
        length = int.from_bytes(self._buffer[self._start : self._start + HEADER_LEN], "big")
        if length > self.limit:
            raise RemoteProtocolError(
                f"peer announced a {length}-byte frame; the limit is {self.limit}",
                code="frame_too_large",
            )
        return length

    def next_frame(self) -> memoryview | None:
        length = self._frame_length()
        if length is None or self._end - self._start < HEADER_LEN + length:
            return None
        begin = self._start + HEADER_LEN
        self._start = begin + length
        return memoryview(self._buffer)[begin : self._start]

    @property
    def wanted(self) -> int:
        """How many more bytes complete the next frame (at least 1; of the
        header alone until it is buffered)."""
        length = self._frame_length()
        if length is None:
            return HEADER_LEN - (self._end - self._start)
        return max(1, HEADER_LEN + length - (self._end - self._start))

    @property
    def buffered(self) -> int:
        return self._end - self._start
