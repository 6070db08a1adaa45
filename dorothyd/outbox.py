"""The outbox: runs queued outgoing transfers until each is delivered,
failed or cancelled.

Connection problems are retried with exponential backoff and full jitter;
each transfer waits on its own schedule, so a peer that is down holds up
nobody else. Concurrency is capped in total and per peer.
"""

import random

import trio

from ..keys.errors import KeysError
from ..protocol.errors import ProtocolError
from ..protocol.paths import quoted
from . import tuning
from .channel import ChannelClosed, connect
from .clock import iso_now
from .logs import log
from .node import Node, Running
from .sending import PermanentFailure, TransferAborted, deliver, notify_ended
from .sources import SourceChanged, SourceUnavailable

IDLE_POLL_SECONDS = 30.0


def first_leaf(exc: BaseException) -> BaseException:
    """Nurseries wrap errors in exception groups; classification wants the cause."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def backoff(attempts: int, initial: float, maximum: float) -> float:
    return random.uniform(0, min(maximum, initial * 2 ** min(attempts, 30)))


async def run_outbox(node: Node, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            now = trio.current_time()
            next_due = now + IDLE_POLL_SECONDS
            per_peer: dict[str, int] = {}
            for tid in node.running:
                row = node.store.get(tid)
                if row is not None and row["direction"] == "out":
                    per_peer[row["peer"]] = per_peer.get(row["peer"], 0) + 1
            active = sum(per_peer.values())
            for row in node.store.pending_outgoing():
                if row["id"] in node.running:
                    continue
                due = node.retry_at.get(row["id"], 0.0)
                if due > now:
                    next_due = min(next_due, due)
                    continue
                if active >= node.config.max_active_total:
                    break
                if per_peer.get(row["peer"], 0) >= node.config.max_active_per_peer:
                    continue
                per_peer[row["peer"]] = per_peer.get(row["peer"], 0) + 1
                active += 1
                scope = trio.CancelScope()
                node.running[row["id"]] = Running(scope)
                nursery.start_soon(_attempt, node, row["id"], scope)
            await node.outbox_wakeup(max(0.0, next_due - trio.current_time()))


async def _attempt(node: Node, transfer_id: str, scope: trio.CancelScope) -> None:
    store = node.store
    running = node.running[transfer_id]
    try:
        with scope:
            row = store.get(transfer_id)
            # Only an ended transfer the peer must still hear of is pending
            # in a final state (Store.pending_outgoing).
            telling = row["state"] in ("cancelled", "failed")
            if not telling:
                store.update(transfer_id, iso_now(), state="active", attempts=row["attempts"] + 1)
            try:
                if telling:
                    await _connect_and(node, row, lambda peer, channel: notify_ended(node, row, peer, channel))
                else:
                    await _connect_and(node, row, lambda peer, channel: deliver(node, row, peer, running, channel))
            except BaseException as exc:
                if telling:
                    await _retry_notice(node, row, first_leaf(exc), exc)
                else:
                    await _classify(node, row, first_leaf(exc), exc)
    finally:
        del node.running[transfer_id]
        node.wake_outbox()


async def _connect_and(node: Node, row, job) -> None:
    """Connect to the transfer's peer and run `job(peer, channel)`."""
    try:
        peer = node.trust.get(row["peer"])
    except KeysError:
        raise PermanentFailure(f"peer {quoted(row['peer'])} was removed from the trust store") from None
    if str(peer.node_key) != row["peer_node_key"]:
        raise PermanentFailure(f"the key of peer {quoted(peer.name)} changed after this transfer was queued")
    channel = await connect(
        peer.host,
        peer.port,
        node.identity,
        peer.node_key.dh_public,
        connect_timeout=node.config.connect_timeout_seconds,
        idle_timeout=node.config.idle_timeout_seconds,
    )
    try:
        await job(peer, channel)
    finally:
        with trio.CancelScope(shield=True):
            await channel.close()
            await tuning.release_free_memory_at_end()  # a transfer's records: see tuning


async def _classify(node: Node, row, cause: BaseException, original: BaseException) -> None:
    """Decide between retrying later and failing for good."""
    if node.running[row["id"]].cancelled_by_operator:
        # The control server recorded the cancellation, and it stands.
        if not isinstance(cause, trio.Cancelled):
            log.warning("transfer %s: cancelled while its attempt failed: %s", row["id"], _describe(cause))
        return
    if isinstance(cause, trio.Cancelled):
        raise original
    if isinstance(cause, TransferAborted) and cause.aborted.final:
        state = "cancelled" if cause.aborted.code == "cancelled" else "failed"
        return await _end(node, row, state, f"receiver: {cause.aborted.reason}")
    source_changed = isinstance(cause, SourceChanged) or (
        isinstance(cause, ProtocolError) and cause.code == "source_changed"
    )
    if source_changed:
        # The receiver may hold part of it: tell it (outbox, fresh connection).
        return await _end(node, row, "failed", str(cause), notify_peer=True)
    if isinstance(cause, PermanentFailure):
        return await _end(node, row, "failed", str(cause))
    if isinstance(cause, ProtocolError) and cause.code in ("bad_receipt", "bad_signature"):
        return await _end(node, row, "failed", str(cause))
    if isinstance(cause, (OSError, trio.TooSlowError, trio.BrokenResourceError, ProtocolError, ChannelClosed, TransferAborted)):
        attempts = row["attempts"] + 1
        delay = backoff(attempts, node.config.retry_initial_seconds, node.config.retry_max_seconds)
        node.retry_at[row["id"]] = trio.current_time() + delay
        message = _describe(cause)
        node.store.update(row["id"], iso_now(), state="waiting", error=message)
        log.info("transfer %s: %s; retrying in %.1fs", row["id"], message, delay)
        return
    raise original


async def _retry_notice(node: Node, row, cause: BaseException, original: BaseException) -> None:
    if isinstance(cause, trio.Cancelled):
        raise original
    if isinstance(cause, PermanentFailure):
        node.store.update(row["id"], iso_now(), notify_peer=0)  # the peer is gone: nobody to tell
        return
    attempts = row["attempts"] + 1
    delay = backoff(attempts, node.config.retry_initial_seconds, node.config.retry_max_seconds)
    node.store.update(row["id"], iso_now(), attempts=attempts)
    node.retry_at[row["id"]] = trio.current_time() + delay
    log.info("transfer %s: cannot tell %s it is %s yet (%s)", row["id"], row["peer"], row["state"], _describe(cause))


def _describe(cause: BaseException) -> str:
    if isinstance(cause, SourceUnavailable):
        return f"source unavailable, will retry: {cause.strerror}"
    if isinstance(cause, trio.TooSlowError):
        return "peer did not answer in time"
    if isinstance(cause, OSError):
        return f"cannot reach peer: {cause.strerror or cause}"
    if isinstance(cause, TransferAborted):
        return f"receiver: {cause.aborted.reason}"
    return str(cause) or type(cause).__name__


async def _end(node: Node, row, state: str, error: str, *, notify_peer: bool = False) -> None:
    node.store.update(row["id"], iso_now(), state=state, error=error, notify_peer=int(notify_peer))
    node.sender_hashers.pop(row["id"], None)
    event = "transfer_cancelled" if state == "cancelled" else "transfer_failed"
    fields = {"transfer_id": row["id"], "peer": row["peer"], "direction": "out"}
    fields.update({"by": "receiver"} if state == "cancelled" else {"error": error})
    await node.record(event, fields)
    log.warning("transfer %s %s: %s", row["id"], state, error)
