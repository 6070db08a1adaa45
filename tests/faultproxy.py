"""A fault-injecting TCP proxy (trio) to put between two real daemons.

Each direction ("up": client to server, "down": back) passes through a
`Faults` plan: cut the connection at a byte offset, stall, add delay,
throttle to a rate, duplicate or flip bytes at offsets. Plans can be drawn
at random from a seed, so every failing run is reproducible from the seed
it prints. Also what bench/ runs as its rate-limited link (100 Mbit/s and
20 ms each way: `rate` and `delay`).

For tests that drive daemons as processes, `ProxyThread` runs the proxy in a
background thread with its own trio loop.

`plan` sets the standing faults for every later connection; `plan_each`
queues one plan per connection (the next connection takes the first, and so
on), after which the standing plan applies again. `history` says, for every
connection, which plan it had, how many bytes it carried each way and which
faults actually fired.
"""

import random
import threading
from collections import deque
from dataclasses import dataclass, field

import trio

BLOCK = 64 * 1024
# Blocks one direction holds in flight beyond what the link's rate times its
# delay needs: about a socket buffer's worth, so a peer that stops reading
# still pushes back on its sender as it would without the proxy.
SLACK_BLOCKS = 16
# How far the bottleneck may catch up after its task woke late.
BURST_SECONDS = 0.01
# What travels through a direction's pipe besides plain data.
DATA, AGAIN, CUT, EOF = "data", "again", "cut", "eof"


@dataclass
class Faults:
    cut_at: int | None = None  # close both directions once this many bytes passed
    stall_at: int | None = None  # stop forwarding (but keep the socket) from here on
    flip_at: list[int] = field(default_factory=list)  # xor 0x01 into these offsets
    duplicate_at: list[int] = field(default_factory=list)  # send the block holding this offset twice
    delay: float = 0.0  # one-way latency, in seconds (blocks in flight overlap)
    rate: float | None = None  # bytes per second

    @classmethod
    def random(cls, rng: random.Random, span: int) -> "Faults":
        kind = rng.choice(["cut", "cut", "flip", "duplicate", "stall", "slow"])
        offset = rng.randrange(span)
        if kind == "cut":
            return cls(cut_at=offset)
        if kind == "flip":
            return cls(flip_at=[offset])
        if kind == "duplicate":
            return cls(duplicate_at=[offset])
        if kind == "stall":
            return cls(stall_at=offset)
        return cls(rate=rng.choice([2e6, 8e6]), delay=rng.choice([0.0, 0.005]))


@dataclass
class Direction:
    faults: Faults = field(default_factory=Faults)
    passed: int = 0  # bytes forwarded over all connections


@dataclass
class Connection:
    """What one proxied connection was planned to suffer and what it did."""

    number: int  # 1 for the first connection
    up: Faults
    down: Faults
    passed: dict = field(default_factory=lambda: {"up": 0, "down": 0})
    fired: list = field(default_factory=list)  # e.g. ["up cut", "down flip"], in the order they happened
    closed: bool = False


class FaultProxy:
    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1"):
        self.target = target
        self.host = host
        self.up = Direction()
        self.down = Direction()
        self.connections = 0
        self.port: int | None = None
        self.queued: deque[tuple[Faults, Faults]] = deque()
        self.history: list[Connection] = []

    def plan(self, up: Faults | None = None, down: Faults | None = None) -> None:
        """Faults for connections opened from now on (offsets count from each connection's start)."""
        self.up.faults = up or Faults()
        self.down.faults = down or Faults()

    def plan_each(self, plans: list[tuple[Faults | None, Faults | None]]) -> None:
        """One (up, down) plan for each of the next len(plans) connections, in
        order; connections after them get the standing plan again."""
        self.queued.extend((up or Faults(), down or Faults()) for up, down in plans)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        up, down = self.queued.popleft() if self.queued else (self.up.faults, self.down.faults)
        record = Connection(self.connections, up, down)
        self.history.append(record)
        try:
            try:
                server = await trio.open_tcp_stream(*self.target)
            except OSError:
                await client.aclose()
                return
            async with client, server:
                async with trio.open_nursery() as nursery:
                    scope = nursery.cancel_scope
                    nursery.start_soon(self._pump, client, server, up, self.up, scope, record, "up")
                    nursery.start_soon(self._pump, server, client, down, self.down, scope, record, "down")
        finally:
            record.closed = True

    async def _pump(
        self, source, sink, faults: Faults, counter: Direction, scope: trio.CancelScope, record: Connection | None = None, name: str = ""
    ) -> None:
        """Read blocks, apply the plan, and hand them to `_deliver` through a
        pipe: a block enters at `rate` and leaves `delay` later, with later
        blocks in flight behind it, as on a real path (waiting `delay`
        before each block instead would cap a connection at one block per
        delay: 3.2 MiB/s at 20 ms, whatever the rate)."""
        fired = record.fired if record is not None else []
        in_flight = 2 * int((faults.rate or 0) * faults.delay / BLOCK) + SLACK_BLOCKS
        pipe_in, pipe_out = trio.open_memory_channel(in_flight)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._deliver, pipe_out, sink, counter, scope, record, name)
                async with pipe_in:
                    offset = 0
                    wire_free = trio.current_time()  # when the bottleneck finishes the last block
                    while True:
                        data = await source.receive_some(BLOCK)
                        now = trio.current_time()
                        # A late wake-up (a busy machine) must not cost link
                        # time: only a link idle for more than BURST_SECONDS
                        # restarts from now, as a real link's queue drains.
                        wire_free = max(wire_free, now - BURST_SECONDS) + (len(data) / faults.rate if faults.rate else 0.0)
                        if faults.rate:
                            await trio.sleep_until(wire_free)
                        due = max(wire_free, now) + faults.delay
                        if not data:
                            await pipe_in.send((due, EOF, b""))
                            return
                        end = offset + len(data)
                        if faults.cut_at is not None and end > faults.cut_at:
                            fired.append(f"{name} cut")
                            await pipe_in.send((due, CUT, data[: max(0, faults.cut_at - offset)]))
                            return
                        if faults.stall_at is not None and end > faults.stall_at:
                            fired.append(f"{name} stall")
                            await pipe_in.send((due, DATA, data[: max(0, faults.stall_at - offset)]))
                            await trio.sleep_forever()
                        block = bytearray(data)
                        for at in faults.flip_at:
                            if offset <= at < end:
                                fired.append(f"{name} flip")
                                block[at - offset] ^= 0x01
                        await pipe_in.send((due, DATA, block))
                        if any(offset <= at < end for at in faults.duplicate_at):
                            fired.append(f"{name} duplicate")
                            await pipe_in.send((due, AGAIN, block))
                        offset = end
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()

    @staticmethod
    async def _deliver(pipe_out, sink, counter: Direction, scope: trio.CancelScope, record: Connection | None, name: str) -> None:
        async with pipe_out:
            async for due, kind, block in pipe_out:
                await trio.sleep_until(due)
                if kind == EOF:
                    await sink.send_eof()
                    return
                await sink.send_all(block)
                if kind == CUT:
                    scope.cancel()
                    return
                if kind == DATA:  # a duplicate is not counted twice
                    counter.passed += len(block)
                    if record is not None:
                        record.passed[name] += len(block)


class ProxyThread:
    """Run a FaultProxy in a background thread: `with ProxyThread(proxy): ...`."""

    def __init__(self, proxy: FaultProxy):
        self.proxy = proxy
        self._ready = threading.Event()
        self._token = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.proxy.serve)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self.proxy

    def __exit__(self, *exc) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)
