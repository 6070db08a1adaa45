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


# The decoder's buffer (see FrameDecoder). Room for a frame is made ahead
# of its bytes up to GROW_AHEAD_MAX: a chunk record (at most 4 MiB) fits at
# once, and only a large manifest's buffer grows as its bytes come. An
# empty buffer larger than that is let go: only such a manifest needs more.
# A read at a frame boundary gets room for at least MIN_ROOM, so small
# frames come many to a read.
GROW_AHEAD_MAX = 8 << 20
KEEP_BUFFER_MAX = GROW_AHEAD_MAX
MIN_ROOM = 64 << 10


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
    many reads it took (a 2 MiB record arrives in several). The room offered
    for the rest of a large frame is exactly that rest, so a read ends where
    the frame does and the next one starts at the front of the buffer; only
    the start of a frame left behind other frames is ever moved, once. The
    buffer holds the frame being received, whose length is checked against
    the limit first, and at most one read beyond it.
    """

    def __init__(self, limit: int = MAX_HANDSHAKE_FRAME):
        self.limit = limit
        self._buffer = bytearray()
        self._start = 0  # first byte not yet handed over
        self._end = 0  # end of the bytes received
        self._offered = 0  # the room receive_buffer last offered

    def receive_data(self, data: bytes) -> None:
        if data:
            self._make_room(len(data), ahead=max(len(data), (self._end - self._start) // 2))  # growing by half
            self._buffer[self._end : self._end + len(data)] = data
            self._end += len(data)
        self._frame_length()

    def receive_buffer(self, read_size: int) -> memoryview:
        """Room to receive into (then call `received_into`): the rest of
        the frame being received when that is at least MIN_ROOM, else up to
        `read_size` bytes."""
        length = self._frame_length()
        pending = self._end - self._start
        if length is None:  # a boundary: room for many small frames; within a header: for the header
            needed, ahead, offered = MIN_ROOM if not pending else HEADER_LEN - pending, MIN_ROOM, read_size
        else:
            rest = HEADER_LEN + length - pending
            offered = rest if rest >= MIN_ROOM else read_size
            if rest <= GROW_AHEAD_MAX:  # all of it at once
                needed = ahead = max(1, rest)
            else:  # a large manifest: room only once the buffer is full, doubling it
                needed, ahead = 1, min(rest, max(MIN_ROOM, pending))
        self._make_room(needed, ahead)
        room = memoryview(self._buffer)[self._end : self._end + max(1, offered)]
        self._offered = len(room)
        return room

    def _make_room(self, needed: int, ahead: int) -> None:
        """At least `needed` free bytes after the end: the pending bytes
        move to the front, or into a new buffer with `ahead` free bytes, or
        MIN_ROOM if more (views still held of the old one stay as they
        were)."""
        pending = self._end - self._start
        if not pending:
            self._start = self._end = 0
            if len(self._buffer) > KEEP_BUFFER_MAX:  # a large manifest's: not kept for the chunks
                self._buffer = bytearray()
        if len(self._buffer) - self._end >= needed:
            return
        if self._start and len(self._buffer) - pending >= needed:
            self._buffer[:pending] = self._buffer[self._start : self._end]
        else:
            grown = bytearray(pending + max(needed, ahead, MIN_ROOM))
            grown[:pending] = memoryview(self._buffer)[self._start : self._end]
            self._buffer = grown
        self._start, self._end = 0, pending

    def received_into(self, count: int) -> None:
        """`count` bytes were written at the start of the view that
        `receive_buffer` returned."""
        if not 0 <= count <= self._offered:
            raise LocalProtocolError(f"received {count} bytes into room for {self._offered}")
        self._end += count
        self._offered = 0
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
