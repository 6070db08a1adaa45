"""The TCP listener: one task per connection, each owning its errors, so a
hostile or broken peer ends its own connection and nothing else.

Before authentication a connection gets only the handshake parser, a short
deadline, and one of a bounded number of slots.
"""

import trio

from ..protocol.errors import ProtocolError
from . import tuning
from .channel import ChannelClosed, accept
from .logs import log
from .node import Node
from .receiving import Incoming

# Unauthenticated connections held at once; more are closed on arrival, so a
# flood of half-open handshakes cannot starve trusted peers of memory.
MAX_UNAUTHENTICATED = 64


async def run_listener(node: Node, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    slots = trio.Semaphore(MAX_UNAUTHENTICATED)
    listeners = await trio.open_tcp_listeners(node.config.listen_port, host=node.config.listen_host)
    port = listeners[0].socket.getsockname()[1]
    log.info("listening on %s:%d", node.config.listen_host, port)
    task_status.started(port)
    await trio.serve_listeners(lambda stream: _handle(node, slots, stream), listeners)


def _address(stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


async def _handle(node: Node, slots: trio.Semaphore, stream: trio.SocketStream) -> None:
    address = _address(stream)
    found = {}

    def authorize(static: bytes) -> bool:
        peer = node.peer_for_static(static)
        found["peer"] = peer
        return peer is not None

    channel = None
    try:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            log.warning("connection from %s refused: too many unauthenticated connections", address)
            return
        try:
            channel = await accept(stream, node.identity, authorize, idle_timeout=node.config.idle_timeout_seconds)
        finally:
            slots.release()
        peer = found["peer"]
        log.info("connection from %s authenticated as peer %s", address, peer.name)
        await Incoming(node, channel, peer).run()
    except ProtocolError as exc:
        who = found.get("peer").name if found.get("peer") else address
        log.warning("connection from %s closed: %s (%s)", who, exc, exc.code)
    except ChannelClosed:
        pass
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
        log.info("connection from %s ended: %s", address, exc or type(exc).__name__)
    except Exception:
        log.exception("internal error while serving %s", address)
    finally:
        with trio.CancelScope(shield=True):
            if channel is not None:
                await channel.close()
            await trio.aclose_forcefully(stream)
            if channel is not None:  # a peer's connection, not a stranger's: one trim each
                await tuning.release_free_memory_at_end()  # a transfer's records: see tuning
