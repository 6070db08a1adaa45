"""A fault-injecting TCP proxy (trio) to put between two real daemons.

Each direction ("up": client to server, "down": back) passes through a
`Faults` plan: cut the connection at a byte offset, stall, add delay,
throttle to a rate, duplicate or flip bytes at offsets. Plans can be drawn
at random from a seed, so every failing run is reproducible from the seed
it prints. Also importable by bench/ for the rate-limited link.

For tests that drive daemons as processes, `ProxyThread` runs the proxy in a
background thread with its own trio loop.
"""

import random
import threading
from dataclasses import dataclass, field

import trio

BLOCK = 64 * 1024


@dataclass
class Faults:
    cut_at: int | None = None  # close both directions once this many bytes passed
    stall_at: int | None = None  # stop forwarding (but keep the socket) from here on
    flip_at: list[int] = field(default_factory=list)  # xor 0x01 into these offsets
    duplicate_at: list[int] = field(default_factory=list)  # send the block holding this offset twice
    delay: float = 0.0  # one-way latency added to every block, in seconds
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


class FaultProxy:
    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1"):
        self.target = target
        self.host = host
        self.up = Direction()
        self.down = Direction()
        self.connections = 0
        self.port: int | None = None

    def plan(self, up: Faults | None = None, down: Faults | None = None) -> None:
        """Faults for connections opened from now on (offsets count from each connection's start)."""
        self.up.faults = up or Faults()
        self.down.faults = down or Faults()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        up, down = self.up.faults, self.down.faults
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        async with client, server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, up, self.up, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, down, self.down, nursery.cancel_scope)

    async def _pump(self, source, sink, faults: Faults, counter: Direction, scope: trio.CancelScope) -> None:
        offset = 0
        next_time = trio.current_time()
        try:
            while True:
                data = await source.receive_some(BLOCK)
                if not data:
                    await sink.send_eof()
                    return
                end = offset + len(data)
                if faults.cut_at is not None and end > faults.cut_at:
                    await sink.send_all(data[: max(0, faults.cut_at - offset)])
                    scope.cancel()
                    return
                if faults.stall_at is not None and end > faults.stall_at:
                    await sink.send_all(data[: max(0, faults.stall_at - offset)])
                    await trio.sleep_forever()
                block = bytearray(data)
                for at in faults.flip_at:
                    if offset <= at < end:
                        block[at - offset] ^= 0x01
                if faults.delay:
                    await trio.sleep_until(trio.current_time() + faults.delay)
                if faults.rate:
                    next_time = max(next_time, trio.current_time()) + len(block) / faults.rate
                    await trio.sleep_until(next_time)
                await sink.send_all(block)
                if any(offset <= at < end for at in faults.duplicate_at):
                    await sink.send_all(block)
                offset = end
                counter.passed += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()


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
