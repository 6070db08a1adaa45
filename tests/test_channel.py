"""dorothyd/channel.py over real loopback TCP, where the receive low-water
mark (SO_RCVLOWAT) is in play: a receive that finds nothing waits for the
rest of the record it is reading, and never for bytes beyond it. And where
the kernel takes a record in pieces: sends write what it takes and wait
for room, within the idle deadline."""

import os
import socket

import pytest
import trio
import trio.testing

from dorothy.dorothyd.channel import LOW_WATER_SUPPORTED, RECEIVE_LOW_WATER_MAX, RECEIVE_LOW_WATER_MIN, accept, initiate
from dorothy.protocol import messages
from dorothy.protocol.errors import RemoteProtocolError

DEADLINE = 10.0  # seconds; a receive waiting for bytes never sent fails here

low_water = pytest.mark.skipif(not LOW_WATER_SUPPORTED, reason="the low-water mark is set on Linux only")


async def connected(make_node, idle_timeout: float = DEADLINE):
    """(initiator's channel, responder's channel) over 127.0.0.1."""
    alpha, bravo = make_node("alpha"), make_node("bravo")
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    channels = {}

    async def responder():
        stream = await listener.accept()
        channels["bravo"] = await accept(stream, bravo.identity, lambda key: key == alpha.node_key.dh_public, idle_timeout=idle_timeout)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        channels["alpha"] = await initiate(stream, alpha.identity, bravo.node_key.dh_public, idle_timeout=idle_timeout)
    await listener.aclose()
    return channels["alpha"], channels["bravo"]


def chunk(size: int) -> messages.Chunk:
    return messages.Chunk(file=0, index=0, compressed=False, data=os.urandom(size))


@low_water
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


@low_water
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
            assert 1 < low_water <= min(rest, RECEIVE_LOW_WATER_MAX)  # Linux may cap it lower
            assert not received
            await alpha.stream.send_all(frame[RECEIVE_LOW_WATER_MAX:])
    assert received == [message]
    await alpha.close()
    await bravo.close()


@low_water
async def test_a_link_slower_than_the_low_water_mark_is_slow_not_idle(make_node, mock_clock):
    # Bytes keep arriving, each gap shorter than the idle deadline, but a
    # whole low-water mark's worth takes longer: the receive must go on.
    # Time is the mock clock's, moved on by hand between the pieces.
    alpha, bravo = await connected(make_node, idle_timeout=1.0)
    message = chunk(2 << 20)
    frame = alpha.session.send_message(messages.encode(message))
    received = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_receive_into, bravo, received)
        for start in range(0, len(frame), 128 << 10):
            await alpha.stream.send_all(frame[start : start + (128 << 10)])
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(0.6)  # 8 pieces a mark: 4.8 s for one
    assert received == [message]
    await alpha.close()
    await bravo.close()


@low_water
async def test_a_peer_that_closes_in_the_middle_of_a_record_ends_the_receive(make_node):
    alpha, bravo = await connected(make_node)
    frame = alpha.session.send_message(messages.encode(chunk(2 << 20)))
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            async def receive():
                with pytest.raises(RemoteProtocolError) as raised:
                    await bravo.receive()
                assert raised.value.code == "truncated"
            nursery.start_soon(receive)
            await alpha.stream.send_all(frame[: RECEIVE_LOW_WATER_MAX // 2])
            await trio.testing.wait_all_tasks_blocked()
            await alpha.stream.aclose()
    await bravo.close()


def small_send_buffer(channel) -> None:
    """A send buffer far smaller than a record, fixed (no autotuning). (Not
    the receive buffer: fixed that small, a receive waiting for its
    low-water mark was never woken.)"""
    channel.stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)


async def test_a_record_larger_than_the_kernel_takes_at_once_arrives_whole(make_node):
    # The sender writes the record in pieces, and sleeps while the kernel
    # takes none: the receiver starts reading only once it does.
    alpha, bravo = await connected(make_node)
    small_send_buffer(alpha)
    message = chunk(4 << 20)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(alpha.send, message)
            await trio.testing.wait_all_tasks_blocked()
            assert await bravo.receive() == message
    await alpha.close()
    await bravo.close()


async def test_a_peer_that_stops_reading_is_dropped_after_the_idle_deadline(make_node, mock_clock):
    alpha, bravo = await connected(make_node, idle_timeout=1.0)
    small_send_buffer(alpha)
    outcome = []

    async def send():
        try:
            await alpha.send(chunk(4 << 20))
        except trio.TooSlowError:
            outcome.append("dropped")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(0.9)
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == []
        mock_clock.jump(0.2)
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == ["dropped"]
        nursery.cancel_scope.cancel()  # (were it still waiting)
    await trio.aclose_forcefully(alpha.stream)
    await bravo.close()


async def test_a_slow_reader_is_slow_not_idle(make_node, mock_clock):
    # The reader takes 16 KiB every 0.05 s (mock clock): the record takes
    # longer than the idle deadline to go out, and must go all the same.
    # The reader's buffer is fixed, so what the sender wrote before a read
    # is at most a few reads' worth: each read soon lets the sender on.
    alpha, bravo = await connected(make_node, idle_timeout=1.0)
    small_send_buffer(alpha)
    bravo.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    frame = alpha.session.send_message(messages.encode(chunk(512 << 10)))
    sent = []

    async def send():
        await alpha.send_raw(frame)
        sent.append(True)

    received = 0
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while received < len(frame):
                await trio.testing.wait_all_tasks_blocked()
                mock_clock.jump(0.05)
                received += len(await bravo.stream.receive_some(16 << 10))
    assert sent == [True] and received == len(frame)
    assert trio.current_time() > 1.5  # slower than the deadline indeed
    await trio.aclose_forcefully(alpha.stream)
    await trio.aclose_forcefully(bravo.stream)


async def test_a_send_on_a_connection_closed_here_says_so(make_node):
    alpha, bravo = await connected(make_node)
    await trio.aclose_forcefully(alpha.stream)
    with pytest.raises(trio.ClosedResourceError):
        await alpha.send(chunk(1 << 10))
    await trio.aclose_forcefully(bravo.stream)


async def test_a_send_to_a_peer_that_has_gone_fails_as_a_broken_connection(make_node):
    # trio's error for a connection that broke, as trio's own streams raise it.
    alpha, bravo = await connected(make_node)
    await trio.aclose_forcefully(bravo.stream)
    with trio.fail_after(DEADLINE), pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first sends may still be taken before the reset
            await alpha.send(chunk(1 << 20))
    await trio.aclose_forcefully(alpha.stream)
