"""A blocking call running in a worker thread while the event loop goes on:
start it, do other work, then `await result()`. The daemon uses it to
overlap disk writes with receiving, and compression with reading."""

import trio


class InFlight:
    def __init__(self, fn, *args, tag=None):
        self.tag = tag  # what the caller needs back with the result
        self._done = trio.Event()
        self._outcome = None
        self._taken = False
        token = trio.lowlevel.current_trio_token()

        def deliver(outcome) -> None:
            self._outcome = outcome
            token.run_sync_soon(self._done.set)

        trio.lowlevel.start_thread_soon(lambda: fn(*args), deliver)

    async def settle(self) -> None:
        """Wait for the call to end, without taking its result."""
        await self._done.wait()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def unaccounted(self) -> bool:
        """Finished successfully, and its result not yet taken."""
        return not self._taken and self._outcome is not None and not hasattr(self._outcome, "error")

    async def result(self):
        await self._done.wait()
        self._taken = True
        return self._outcome.unwrap()
