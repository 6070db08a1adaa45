"""dorothyd/channel.py over real loopback TCP, where the receive low-water
mark (SO_RCVLOWAT) is in play: a receive that finds nothing waits for the
rest of the record it is reading, and never for bytes beyond it."""

import os
import socket

import pytest
import trio
import trio.testing

from dorothy.dorothyd.channel import RECEIVE_LOW_WATER_MAX, RECEIVE_LOW_WATER_MIN, accept, initiate
from dorothy.protocol import messages

DEADLINE = 10.0  # seconds; a receive waiting for bytes never sent fails here

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_RCVLOWAT"), reason="no SO_RCVLOWAT on this platform")


async def connected(make_node):
    """(initiator's channel, responder's channel) over 127.0.0.1."""
    alpha, bravo = make_node("alpha"), make_node("bravo")
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    channels = {}

    async def responder():
        stream = await listener.accept()
        channels["bravo"] = await accept(stream, bravo.identity, lambda key: key == alpha.node_key.dh_public, idle_timeout=DEADLINE)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        channels["alpha"] = await initiate(stream, alpha.identity, bravo.node_key.dh_public, idle_timeout=DEADLINE)
    await listener.aclose()
    return channels["alpha"], channels["bravo"]


def chunk(size: int) -> messages.Chunk:
    return messages.Chunk(file=0, index=0, compressed=False, data=os.urandom(size))


async def test_records_of_every_size_arrive_while_the_receiver_waits(make_node):
    # Each record is sent only once the receiver sleeps for it: the case
    # where a low-water mark above what the peer sends would never wake it.
    alpha, bravo = await connected(make_node)
    sizes = [2 << 20, 1, RECEIVE_LOW_WATER_MIN - 1, RECEIVE_LOW_WATER_MIN + 1, 3 << 20, RECEIVE_LOW_WATER_MAX + 7]
    sent = [m for size in sizes for m in (chunk(size), messages.FileDone(file=0, sha256=bytes(32)))] + [messages.Done()]
    received = []
    with trio.fail_after(DEADLINE):
        for message in sent:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: _receive_into(bravo, received))
                await trio.testing.wait_all_tasks_blocked()
                await alpha.send(message)
    assert received == sent
    await alpha.close()
    await bravo.close()


async def _receive_into(channel, received: list) -> None:
    received.append(await channel.receive())


async def test_a_receive_sleeps_until_the_rest_of_its_record_is_in(make_node):
    alpha, bravo = await connected(make_node)
    message = chunk(2 << 20)
    frame = alpha.session.send_message(messages.encode(message))
    received = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            async def receive():
                received.append(await bravo.receive())
            nursery.start_soon(receive)
            # Loopback delivers what send_all sent before it returns.
            await alpha.stream.send_all(frame[: RECEIVE_LOW_WATER_MAX])
            await trio.testing.wait_all_tasks_blocked()
            rest = len(frame) - RECEIVE_LOW_WATER_MAX
            low_water = bravo.stream.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
            assert low_water == min(rest, RECEIVE_LOW_WATER_MAX)
            assert not received
            await alpha.stream.send_all(frame[RECEIVE_LOW_WATER_MAX:])
    assert received == [message]
    await alpha.close()
    await bravo.close()
