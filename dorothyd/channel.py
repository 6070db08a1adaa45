"""A protocol.Session driven over a trio stream: the only place where
session bytes meet a socket.

Before authentication a peer gets a short deadline and nothing but the
handshake parser; afterwards every receive has an idle deadline so a stalled
peer cannot hold a transfer slot forever.
"""

import fcntl
import os
import socket
import sys
import termios

import trio

from ..protocol import messages
from ..protocol.session import Authenticated, Closed, Message, Session

RECEIVE_SIZE = 1 << 20
HANDSHAKE_TIMEOUT = 10.0
# A TCP socket's bytes are received straight into the session's buffer
# (Session.receive_buffer): no allocation per read and no join per record.
# On Linux, a receive that finds nothing to read also sleeps until the rest
# of the record it is reading has arrived, up to RECEIVE_LOW_WATER_MAX
# (SO_RCVLOWAT), instead of waking for whatever the kernel holds: a
# receiving daemon had read each 2 MiB record in about 11 pieces, each a
# trip through trio's scheduler, and now in 3 or 4. Shorter remainders are
# read as they come: a folder of small files has one record per file, and
# a socket option per record would cost more than the wake-ups it saves.
# (1 GiB of random data, alternating runs, with write_batch's direct
# writer: 319 -> 381 MiB/s median with the low-water mark; then 331 -> 359
# with the receive into the buffer, and 4.8 -> 4.3 CPU seconds.)
RECEIVE_LOW_WATER_MAX = RECEIVE_SIZE
RECEIVE_LOW_WATER_MIN = 64 << 10
LOW_WATER_SUPPORTED = sys.platform == "linux" and hasattr(socket, "SO_RCVLOWAT")


def _bytes_waiting(sock) -> int:
    """Bytes received and not yet read (FIONREAD); 0 for a closed socket."""
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder, signed=True)
    except (OSError, ValueError):  # ValueError: closed meanwhile (fileno -1)
        return 0


class ChannelClosed(Exception):
    """The peer closed the session cleanly (authenticated close)."""


class Channel:
    def __init__(self, stream: trio.abc.Stream, session: Session, idle_timeout: float):
        self.stream = stream
        self.session = session
        self.idle_timeout = idle_timeout
        self.peer_static = session.peer_static
        self._socket = getattr(stream, "socket", None)  # None: a stream of another kind (tests)
        # The socket's SO_RCVLOWAT (None: not to be set).
        self._low_water = 1 if self._socket is not None and LOW_WATER_SUPPORTED else None

    async def send(self, message) -> None:
        await self.send_raw(self.session.send_message(messages.encode(message)))

    async def send_raw(self, frame) -> None:
        """A record already sealed by `session.send_message` (in a worker).
        A peer that stops reading gets the same idle deadline as one that
        stops sending: on a socket, the deadline runs from the last bytes
        the kernel took, so a slow reader is slow, not idle."""
        with trio.fail_after(self.idle_timeout) as idle:
            if self._socket is None:  # a stream of another kind (tests)
                await self.stream.send_all(frame)
            else:
                await self._send_to_socket(memoryview(frame), idle)

    async def _send_to_socket(self, frame: memoryview, idle: trio.CancelScope) -> None:
        """trio's send_all passes through the scheduler after every send
        call that the kernel accepted, and loopback takes a 2 MiB record in
        about 9 pieces: a sending daemon spent 44% of its event loop's CPU
        in Python (perf). Here the record is written while the kernel takes
        bytes, and the task sleeps only when it takes none. (write(2) on a
        connected socket is send(2) without flags; trio's socket object has
        no send that does not yield.) 1 GiB of random data, 6 alternating
        runs: 335 -> 368 MiB/s median, 4.36 -> 4.15 CPU seconds."""
        await trio.lowlevel.checkpoint_if_cancelled()
        sent = 0
        while sent < len(frame):
            # Asked again each time: after a close by another task while we
            # waited, the number may already name a file opened since.
            fd = self._socket.fileno()
            if fd == -1:
                raise trio.ClosedResourceError("the connection was closed while a record was being sent")
            try:
                sent += os.write(fd, frame[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._socket)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            idle.deadline = trio.current_time() + self.idle_timeout
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive(self):
        """The next transfer message; raises ChannelClosed on a clean close."""
        while True:
            event = self.session.next_event()
            if isinstance(event, Message):
                return messages.decode(event.data)
            if isinstance(event, Closed):
                raise ChannelClosed(event.reason)
            if event is None:
                await self._pump()

    async def _pump(self) -> None:
        self._set_low_water(self.session.bytes_wanted())
        with self.session.receive_buffer(RECEIVE_SIZE) as buffer:
            count = await self._receive_into(buffer)
        self.session.received_into(count)

    async def _receive_into(self, buffer: memoryview) -> int:
        """Bytes received into `buffer` (0 at the end of the stream). The
        idle deadline counts bytes that arrive below the low-water mark
        too: a link too slow to bring the mark's bytes within the deadline
        is slow, not idle, and from then on this connection is read as
        things come. (So a peer that falls silent is dropped within two
        deadlines of its last byte, not one.)"""
        if self._socket is None:  # a stream of another kind (tests): its bytes are copied in
            with trio.fail_after(self.idle_timeout):
                data = await self.stream.receive_some(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        while True:
            with trio.move_on_after(self.idle_timeout):
                try:
                    return await self._socket.recv_into(buffer)
                except OSError as exc:  # as trio's SocketStream reports it
                    raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            if self._low_water in (None, 1) or not _bytes_waiting(self._socket):
                raise trio.TooSlowError
            self._set_low_water(1)
            self._low_water = None

    def _set_low_water(self, wanted: int) -> None:
        """Have the kernel wake a waiting receive once `wanted` bytes are
        in, or the socket ends or fails. (A receive reads at once what is
        already there, and waits only when there is nothing.) The session
        never wants more than completes its next record, so this cannot
        wait for bytes the peer has no reason to send."""
        if self._low_water is None:
            return
        low_water = min(wanted, RECEIVE_LOW_WATER_MAX) if wanted >= RECEIVE_LOW_WATER_MIN else 1
        if low_water != self._low_water:
            try:
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low_water)
            except OSError:  # refused here: read as things come
                self._low_water = None
                return
            self._low_water = low_water

    async def close(self, reason: str = "done") -> None:
        """Authenticated close, then the socket; never raises."""
        try:
            with trio.move_on_after(5):
                await self.stream.send_all(self.session.close(reason))
        except Exception:
            pass
        await trio.aclose_forcefully(self.stream)


async def connect(host: str, port: int, identity, peer_dh_public: bytes, *, connect_timeout: float, idle_timeout: float) -> Channel:
    with trio.fail_after(connect_timeout):
        stream = await trio.open_tcp_stream(host, port)
    try:
        return await initiate(stream, identity, peer_dh_public, idle_timeout=idle_timeout)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def initiate(stream: trio.abc.Stream, identity, peer_dh_public: bytes, *, idle_timeout: float) -> Channel:
    """Run the initiator's handshake; the responder must hold `peer_dh_public`."""
    session = Session(
        initiator=True,
        static_private=identity.dh_private,
        ephemeral_private=os.urandom(32),
        remote_static=peer_dh_public,
    )
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        await stream.send_all(session.initiate())
        while not isinstance(session.next_event(), Authenticated):
            session.receive_data(await stream.receive_some(RECEIVE_SIZE))
        await stream.send_all(session.data_to_send())  # key confirmation
    return Channel(stream, session, idle_timeout)


async def accept(stream: trio.abc.Stream, identity, authorize, *, idle_timeout: float) -> Channel:
    """Run the responder's handshake. The returned channel's peer has proven
    its key: its key-confirmation record decrypted."""
    session = Session(
        initiator=False,
        static_private=identity.dh_private,
        ephemeral_private=os.urandom(32),
        authorize=authorize,
    )
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        while True:
            event = session.next_event()
            if isinstance(event, Authenticated):
                return Channel(stream, session, idle_timeout)
            data = await stream.receive_some(RECEIVE_SIZE)
            session.receive_data(data)
            reply = session.data_to_send()
            if reply:
                await stream.send_all(reply)
