"""A protocol.Session driven over a trio stream: the only place where
session bytes meet a socket.

Before authentication a peer gets a short deadline and nothing but the
handshake parser; afterwards every receive has an idle deadline so a stalled
peer cannot hold a transfer slot forever.
"""

import os

import trio

from ..protocol import messages
from ..protocol.session import Authenticated, Closed, Message, Session

RECEIVE_SIZE = 1 << 20
HANDSHAKE_TIMEOUT = 10.0


class ChannelClosed(Exception):
    """The peer closed the session cleanly (authenticated close)."""


class Channel:
    def __init__(self, stream: trio.abc.Stream, session: Session, idle_timeout: float):
        self.stream = stream
        self.session = session
        self.idle_timeout = idle_timeout
        self.peer_static = session.peer_static

    async def send(self, message) -> None:
        await self.send_raw(self.session.send_message(messages.encode(message)))

    async def send_raw(self, frame: bytes) -> None:
        """A record already sealed by `session.send_message` (in a worker).
        A peer that stops reading gets the same idle deadline as one that
        stops sending."""
        with trio.fail_after(self.idle_timeout):
            await self.stream.send_all(frame)

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
        with trio.fail_after(self.idle_timeout):
            data = await self.stream.receive_some(RECEIVE_SIZE)
        self.session.receive_data(data)

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
