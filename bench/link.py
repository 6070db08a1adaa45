"""Proxies between the tools: tests/faultproxy.py, plus a link emulator.

FaultProxy (cuts, counters) is used as it is. For the rate-limited link it
does not fit: it adds its `delay` to every block in turn before forwarding
it, a stall per block rather than latency, so 20 ms caps a connection at
64 KiB / 20 ms = 3.2 MiB/s (26 Mbit/s) whatever its rate. `Link` forwards
each direction through a pipe instead: a block enters at the link rate
(the bottleneck) and leaves `delay` later, with other blocks in flight
behind it, as on a real 100 Mbit/s path with 20 ms one way. It has
FaultProxy's public face (plan, up/down.passed, connections, port, serve),
so ProxyThread runs it, but none of its internals.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faultproxy import BLOCK, Faults, FaultProxy, ProxyThread  # noqa: E402

__all__ = ["Faults", "FaultProxy", "ProxyThread", "Link", "link_faults"]

# Blocks in one direction's pipe at once. At 100 Mbit/s and 20 ms a full
# pipe holds ~250 KB, a few dozen blocks; the bound only keeps memory finite.
MAX_IN_FLIGHT = 1024
# Token-bucket depth: how far the bottleneck may catch up after its task
# woke late (a busy 2-core machine), as a real link's queue would drain.
BURST_SECONDS = 0.01


def link_faults(mbit_per_s: float, delay_ms: float) -> Faults:
    """Only `rate` (bytes/s) and `delay` (s) of a Faults are used by Link."""
    return Faults(rate=mbit_per_s * 1e6 / 8, delay=delay_ms / 1000)


@dataclass
class _Direction:
    faults: Faults = field(default_factory=Faults)
    passed: int = 0


class Link:
    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1"):
        self.target = target
        self.host = host
        self.up = _Direction()
        self.down = _Direction()
        self.connections = 0
        self.port: int | None = None

    def plan(self, up: Faults | None = None, down: Faults | None = None) -> None:
        self.up.faults = up or Faults()
        self.down.faults = down or Faults()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        async with client, server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, self.up, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, self.down, nursery.cancel_scope)

    async def _pump(self, source, sink, direction: _Direction, scope: trio.CancelScope) -> None:
        faults = direction.faults
        pipe_in, pipe_out = trio.open_memory_channel(MAX_IN_FLIGHT)

        async def deliver():
            async with pipe_out:
                async for due, block in pipe_out:
                    await trio.sleep_until(due)
                    if block is None:
                        await sink.send_eof()
                        return
                    await sink.send_all(block)
                    direction.passed += len(block)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(deliver)
                wire_free = trio.current_time()  # when the bottleneck finishes the last block
                async with pipe_in:
                    while True:
                        data = await source.receive_some(BLOCK)
                        # a late wake-up must not cost link time: only an idle
                        # link (more than BURST_SECONDS behind) restarts from now
                        now = trio.current_time()
                        start = max(wire_free, now - BURST_SECONDS)
                        wire_free = start + (len(data) / faults.rate if faults.rate else 0.0)
                        if faults.rate:
                            await trio.sleep_until(wire_free)
                        # never delivered sooner than `delay` after it was read
                        due = max(wire_free, now) + faults.delay
                        await pipe_in.send((due, data or None))
                        if not data:
                            return
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()
