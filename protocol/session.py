"""The authenticated, encrypted session: sans-IO, bytes in, events out.

Layers, outermost first (SPEC.md section 3):

1. A plaintext *preamble* from the initiator: magic and the protocol versions
   it speaks. It is bound into the Noise prologue, so a man in the middle who
   strips versions to force a downgrade breaks the handshake.
2. A Noise IK handshake (Noise_IK_25519_ChaChaPoly_BLAKE2b) in frames.
3. Transport *records* in frames, sealed with AEGIS-256 under keys derived
   from the handshake, with counter nonces, deterministic rekeying and an
   authenticated close.

The responder asks `authorize(peer_static)` as soon as the first handshake
message reveals who is calling, and aborts before answering an unknown key.
It reports `Authenticated` only after the initiator's key-confirmation
record (the first transport record, empty) decrypts: IK's first message can
be replayed by anyone who recorded it, but a replayer cannot produce that
record, so a replay never reaches the application, and until it arrives
frames stay capped at the handshake size.
"""

from dataclasses import dataclass
from enum import Enum
from hashlib import blake2b
from typing import Callable

from . import aegis, noise
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .framing import HEADER_LEN, MAX_FRAME, MAX_HANDSHAKE_FRAME, FrameDecoder, encode_frame

MAGIC = b"DOROTHY"
SUPPORTED_VERSIONS = (1,)
# A preamble lists at most this many versions: it is parsed before anything
# is authenticated, so it stays tiny and fixed-bounded.
MAX_OFFERED_VERSIONS = 8
PROLOGUE_LABEL = b"dorothy session prologue\x00"

# IK message 1 carries e (32), encrypted s (32 + 16) and an empty encrypted
# payload (16); message 2 carries e (32) and the encrypted one-byte version.
HANDSHAKE1_LEN = 32 + 48 + 16
HANDSHAKE2_LEN = 32 + 16 + 1

RECORD_DATA = 0
RECORD_CLOSE = 1
RECORD_CONFIRM = 2
DATA_RECORD = bytes((RECORD_DATA,))  # what every data record starts with
MAX_CLOSE_REASON = 1024  # bytes of UTF-8
TAG_LEN = aegis.TAG_LEN
NONCE_LEN = aegis.NONCE_LEN
# Both sides replace their key after this many records in one direction. At
# 2 MiB per record that is every 128 GiB: far below any nonce or key-usage
# limit of AEGIS-256 (whose 256-bit nonces never wrap here), so a key in
# memory protects a bounded amount of data.
REKEY_INTERVAL = 1 << 16
MAX_RECORD_PLAINTEXT = MAX_FRAME - TAG_LEN - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Authenticated:
    peer_static: bytes
    version: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    data: memoryview  # of the decrypted record, past its type byte


@dataclass(frozen=True, slots=True, kw_only=True)
class Closed:
    """The peer closed the session with an authenticated close record."""

    reason: str


class State(Enum):
    AWAIT_PREAMBLE = "await_preamble"  # responder
    AWAIT_HANDSHAKE1 = "await_handshake1"  # responder
    AWAIT_HANDSHAKE2 = "await_handshake2"  # initiator
    AWAIT_CONFIRM = "await_confirm"  # responder: keys ready, initiator unproven
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


def encode_preamble(versions: tuple[int, ...]) -> bytes:
    return MAGIC + bytes([len(versions)]) + bytes(versions)


def _prologue(preamble: bytes) -> bytes:
    return PROLOGUE_LABEL + preamble


class RecordCipher:
    """One direction of the transport: AEGIS-256, counter nonces, rekeying.
    Records are sealed straight into their frame and opened into one buffer
    (protocol/aegis.py says why not through pynacl's public functions)."""

    def __init__(self, key: bytes, rekey_interval: int = REKEY_INTERVAL):
        self._key = key
        self._counter = 0
        self._rekey_interval = rekey_interval

    def _nonce(self) -> bytes:
        return self._counter.to_bytes(8, "little") + bytes(NONCE_LEN - 8)

    def _advance(self) -> None:
        self._counter += 1
        if self._counter % self._rekey_interval == 0:
            self._key = blake2b(b"dorothy rekey", key=self._key, digest_size=32).digest()

    def seal_frame(self, plaintext) -> memoryview:
        """The frame carrying `plaintext` (any buffer) sealed: sealed
        straight into the frame, after its length header."""
        size = len(plaintext) + TAG_LEN
        if size > MAX_FRAME:
            raise LocalProtocolError(f"record of {size} bytes exceeds the {MAX_FRAME}-byte frame limit")
        frame = aegis.output_buffer(HEADER_LEN + size)
        frame[:HEADER_LEN] = size.to_bytes(HEADER_LEN, "big")
        aegis.seal_into(frame, HEADER_LEN, plaintext, self._nonce(), self._key)
        self._advance()
        return frame

    def open(self, ciphertext) -> memoryview:
        """The plaintext of one sealed record (bytes or a view of them)."""
        if len(ciphertext) < TAG_LEN:
            raise RemoteProtocolError(f"record of {len(ciphertext)} bytes is too short", code="bad_record")
        plaintext = aegis.output_buffer(len(ciphertext) - TAG_LEN)
        if not aegis.open_into(plaintext, ciphertext, self._nonce(), self._key):
            raise RemoteProtocolError(
                f"record {self._counter} failed authentication (tampered, reordered or replayed)",
                code="decrypt_failed",
            )
        self._advance()
        return plaintext


def derive_transport_keys(handshake: noise.HandshakeState) -> tuple[bytes, bytes]:
    """(initiator->responder, responder->initiator) AEGIS-256 keys.

    Derived from the Noise split keys with a label, so the ChaChaPoly keys
    the Noise spec would use are never used for a second cipher.
    """
    c1, c2 = handshake.split()
    keys = []
    for cipher in (c1, c2):
        keys.append(blake2b(b"dorothy transport aegis256", key=cipher.key, digest_size=32).digest())
    return keys[0], keys[1]


class Session:
    """One end of a Dorothy session. Feed bytes with `receive_data`, pull
    events with `next_event`; every method that must put bytes on the wire
    returns them."""

    def __init__(
        self,
        *,
        initiator: bool,
        static_private: bytes,
        ephemeral_private: bytes,
        remote_static: bytes | None = None,
        authorize: Callable[[bytes], bool] | None = None,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        rekey_interval: int = REKEY_INTERVAL,
    ):
        if initiator and remote_static is None:
            raise LocalProtocolError("the initiator must know the responder's static key (IK)")
        if not initiator and authorize is None:
            raise LocalProtocolError("the responder needs an authorize callback")
        self.initiator = initiator
        self._static = static_private
        self._ephemeral = ephemeral_private
        self._remote_static = remote_static
        self._authorize = authorize
        self._versions = versions
        self._rekey_interval = rekey_interval
        self._preamble_buffer = bytearray()
        self._frames = FrameDecoder(MAX_HANDSHAKE_FRAME)
        self._events: list = []
        self._handshake: noise.HandshakeState | None = None
        self._send: RecordCipher | None = None
        self._recv: RecordCipher | None = None
        self._eof = False
        self._outbox = bytearray()
        self._initiated = False
        self.version: int | None = None
        self.peer_static: bytes | None = None
        self.state = State.AWAIT_HANDSHAKE2 if initiator else State.AWAIT_PREAMBLE

    # -- sending -----------------------------------------------------------

    def initiate(self) -> bytes:
        """The initiator's opening bytes: preamble and handshake message 1."""
        if not self.initiator or self._initiated:
            raise LocalProtocolError("initiate() is called once, by the initiator")
        self._initiated = True
        preamble = encode_preamble(self._versions)
        self._handshake = noise.HandshakeState(
            noise.PROTOCOL_IK,
            initiator=True,
            prologue=_prologue(preamble),
            static_private=self._static,
            ephemeral_private=self._ephemeral,
            remote_static=self._remote_static,
        )
        return preamble + encode_frame(self._handshake.write_message(b""), MAX_HANDSHAKE_FRAME)

    def send_message(self, data: bytes) -> memoryview:
        """Seal application data. The initiator may call this as soon as the
        handshake completes; its first record is the key confirmation."""
        return self.send_record(DATA_RECORD + data)

    def send_record(self, record) -> memoryview:
        """Seal a data record the caller built itself: DATA_RECORD, then the
        message (any buffer). It lets a sender read a chunk straight into
        the buffer it is sealed from."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send application data in state {self.state.value}")
        if record[:1] != DATA_RECORD:
            raise LocalProtocolError("a data record starts with RECORD_DATA")
        if len(record) - 1 > MAX_RECORD_PLAINTEXT:
            raise LocalProtocolError(f"message of {len(record) - 1} bytes exceeds {MAX_RECORD_PLAINTEXT}")
        return self._send.seal_frame(record)

    def close(self, reason: str = "done") -> memoryview:
        """The authenticated close: without it, EOF reads as truncation."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot close in state {self.state.value}")
        self.state = State.CLOSED
        reason_bytes = reason.encode("utf-8")[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")
        return self._send.seal_frame(bytes((RECORD_CLOSE,)) + reason_bytes)

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the network; b"" means the peer closed the stream."""
        self._receive(lambda: self._take(data), end=not data)

    def receive_buffer(self, size: int) -> memoryview:
        """Once the handshake is done: where to receive at least `size`
        bytes straight from the socket, with no copy (then call
        `received_into`)."""
        if self.state not in (State.AWAIT_CONFIRM, State.OPEN):
            raise LocalProtocolError(f"no receive buffer in state {self.state.value}")
        return self._frames.receive_buffer(size)

    def received_into(self, count: int) -> None:
        """`count` bytes were received into the view `receive_buffer`
        returned; 0 means the peer closed the stream."""
        self._receive(lambda: self._frames.received_into(count), end=not count)

    def _receive(self, feed, *, end: bool) -> None:
        """Take new bytes (`feed`) or the end of the stream, then act on
        every frame they completed."""
        if self.state is State.ERROR:
            raise LocalProtocolError("session already failed")
        try:
            if end:
                self._eof = True
            else:
                feed()
            self._process_frames()
            if self._eof and self.state is not State.CLOSED:
                raise RemoteProtocolError(
                    "connection ended without an authenticated close (truncated)", code="truncated"
                )
        except ProtocolError:
            self.state = State.ERROR
            raise

    def _take(self, data: bytes) -> None:
        if self.state is State.AWAIT_PREAMBLE:
            self._preamble_buffer += data
            self._read_preamble()
        else:
            self._frames.receive_data(data)

    def bytes_wanted(self) -> int:
        """At least how many more bytes the session needs before it can
        produce another event (1 where that is not known): a transport may
        wait for that many before reading."""
        if self.state in (State.AWAIT_PREAMBLE, State.CLOSED, State.ERROR):
            return 1
        return self._frames.wanted

    def next_event(self):
        return self._events.pop(0) if self._events else None

    def _read_preamble(self) -> None:
        buffer = self._preamble_buffer
        if len(buffer) < len(MAGIC) + 1:
            if not MAGIC.startswith(bytes(buffer[: len(MAGIC)])):
                raise RemoteProtocolError("not a Dorothy peer (bad magic)", code="bad_magic")
            return
        if bytes(buffer[: len(MAGIC)]) != MAGIC:
            raise RemoteProtocolError("not a Dorothy peer (bad magic)", code="bad_magic")
        count = buffer[len(MAGIC)]
        if not 1 <= count <= MAX_OFFERED_VERSIONS:
            raise RemoteProtocolError(f"preamble offers {count} versions", code="bad_preamble")
        end = len(MAGIC) + 1 + count
        if len(buffer) < end:
            return
        preamble = bytes(buffer[:end])
        offered = set(preamble[len(MAGIC) + 1 :])
        common = offered.intersection(self._versions)
        if not common:
            raise RemoteProtocolError(
                f"no common protocol version: peer offers {sorted(offered)}, we speak {list(self._versions)}",
                code="version_mismatch",
            )
        self.version = max(common)
        self._handshake = noise.HandshakeState(
            noise.PROTOCOL_IK,
            initiator=False,
            prologue=_prologue(preamble),
            static_private=self._static,
            ephemeral_private=self._ephemeral,
        )
        self.state = State.AWAIT_HANDSHAKE1
        self._frames.receive_data(bytes(buffer[end:]))
        self._preamble_buffer = bytearray()

    def _process_frames(self) -> None:
        while self.state not in (State.AWAIT_PREAMBLE, State.CLOSED):
            frame = self._frames.next_frame()
            if frame is None:
                return
            if self.state is State.AWAIT_HANDSHAKE1:
                self._on_handshake1(bytes(frame))
            elif self.state is State.AWAIT_HANDSHAKE2:
                self._on_handshake2(bytes(frame))
            else:
                self._on_record(frame)

    def _on_handshake1(self, frame: bytes) -> None:
        if len(frame) != HANDSHAKE1_LEN:
            raise RemoteProtocolError(f"handshake message 1 has {len(frame)} bytes", code="bad_handshake")
        self._handshake.read_message(frame)
        peer = self._handshake.remote_static
        if not self._authorize(peer):
            raise RemoteProtocolError("peer key is not in the trust store", code="unknown_peer")
        self.peer_static = peer
        reply = self._handshake.write_message(bytes([self.version]))
        self._start_transport()
        self.state = State.AWAIT_CONFIRM
        self._outbox += encode_frame(reply, MAX_HANDSHAKE_FRAME)

    def data_to_send(self) -> bytes:
        """Bytes the session produced on its own while receiving (the
        responder's handshake message 2, the initiator's key confirmation);
        send them before anything else."""
        data, self._outbox = bytes(self._outbox), bytearray()
        return data

    def _on_handshake2(self, frame: bytes) -> None:
        if self._handshake is None:
            raise LocalProtocolError("call initiate() before feeding data")
        if len(frame) != HANDSHAKE2_LEN:
            raise RemoteProtocolError(f"handshake message 2 has {len(frame)} bytes", code="bad_handshake")
        payload = self._handshake.read_message(frame)
        version = payload[0]
        if version not in self._versions:
            raise RemoteProtocolError(f"responder chose version {version}, which we did not offer", code="bad_version")
        self.version = version
        self.peer_static = self._handshake.remote_static
        self._start_transport()
        self._frames.limit = MAX_FRAME  # the responder has proven its key
        self._outbox += self._send.seal_frame(bytes((RECORD_CONFIRM,)))
        self.state = State.OPEN
        self._events.append(Authenticated(peer_static=self.peer_static, version=version))

    def _start_transport(self) -> None:
        outbound, inbound = derive_transport_keys(self._handshake)
        if not self.initiator:
            outbound, inbound = inbound, outbound
        self._send = RecordCipher(outbound, self._rekey_interval)
        self._recv = RecordCipher(inbound, self._rekey_interval)
        self._handshake = None  # its ephemeral secrets are no longer needed

    def _on_record(self, frame: memoryview) -> None:
        if len(frame) < TAG_LEN + 1:
            raise RemoteProtocolError(f"record of {len(frame)} bytes is too short", code="bad_record")
        plaintext = self._recv.open(frame)
        kind, body = plaintext[0], plaintext[1:]
        if self.state is State.AWAIT_CONFIRM:
            if kind != RECORD_CONFIRM or body:
                raise RemoteProtocolError("the first record must be the key confirmation", code="bad_record")
            self.state = State.OPEN
            self._frames.limit = MAX_FRAME
            self._events.append(Authenticated(peer_static=self.peer_static, version=self.version))
        elif kind == RECORD_DATA:
            self._events.append(Message(data=body))
        elif kind == RECORD_CLOSE:
            self.state = State.CLOSED
            self._events.append(Closed(reason=bytes(body).decode("utf-8", "replace")))
        else:
            raise RemoteProtocolError(f"unknown record type {kind}", code="bad_record")
