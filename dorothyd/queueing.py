"""What an operator can ask of the node's transfers: queue one, describe
one, cancel one. The control server is only the transport for these."""

import os

import trio

from ..protocol.manifest import manifest_hash, sign_manifest
from ..protocol.paths import quoted
from .clock import iso_now
from .logs import log
from .node import Node, node_key_bytes
from .sources import build_manifest, collect
from .storage import discard_received
from .store import FINAL_STATES


class RequestError(Exception):
    """The request cannot be done; the message is for the operator."""


async def queue_transfer(node: Node, peer_name: str, paths: list[str]) -> str:
    """Sign a manifest for `paths`, record it in the ledger and the queue,
    and return the transfer id. Fails on any unreadable or unsendable path."""
    peer = node.trust.get(peer_name)
    sources = await trio.to_thread.run_sync(collect, paths)
    transfer_id = os.urandom(16)

    def signed_manifest():
        # In a worker thread, as collecting is: for 100,000 names, checking
        # and signing the manifest took 0.6 s, during which the event loop
        # would serve no one.
        manifest = build_manifest(
            sources,
            transfer_id=transfer_id,
            sender=node_key_bytes(node.node_key),
            receiver=node_key_bytes(peer.node_key),
            created=iso_now(),
            chunk_size=node.config.chunk_size,
        )
        return manifest, sign_manifest(manifest, node.identity.sign), manifest_hash(manifest.encode())

    manifest, envelope, digest = await trio.to_thread.run_sync(signed_manifest)
    tid = transfer_id.hex()
    files = [(s.path, s.source, s.size, s.mtime_ns) for s in sources]
    await node.add_file_rows(tid, files)
    # The record, then the transfer row, shielded: a shutdown must not leave
    # a queued record with no transfer behind it.
    with trio.CancelScope(shield=True):
        await node.record(
            "transfer_queued",
            {
                "transfer_id": tid,
                "peer": peer.name,
                "peer_node_key": str(peer.node_key),
                "manifest_hash": digest.hex(),
                "files": [{"path": s.path, "size": s.size} for s in sources],
            },
        )
        node.store.add_transfer_row(
            id=tid,
            direction="out",
            peer=peer.name,
            peer_node_key=str(peer.node_key),
            state="queued",
            manifest=envelope,
            manifest_hash=digest,
            bytes_total=manifest.total_bytes,
            now=iso_now(),
        )
    log.info("queued transfer %s to %s: %d files, %d bytes", tid, peer.name, len(sources), manifest.total_bytes)
    node.just_queued = (tid, manifest, digest)
    node.wake_outbox()
    return tid



def describe(node: Node, row, files: list | None = None) -> dict:
    """A transfer as `dorothy status --json` shows it, with `files` (its
    rows, read with Node.files) for `dorothy status ID`; without, for
    progress polls, waits and the list of all transfers: a folder can list
    100,000. The receipt goes with the files: it holds every file's
    SHA-256 (10,000 files: 660 KB of hex in each reply, and the daemon
    spent 0.1 s encoding the answer to `send --wait`)."""
    running = node.running.get(row["id"])
    bytes_done = row["bytes_done"]
    if running is not None and row["state"] not in FINAL_STATES:
        bytes_done = max(bytes_done, running.bytes_done)
    return {
        "id": row["id"],
        "peer": row["peer"],
        "direction": row["direction"],
        "state": row["state"],
        "bytes_total": row["bytes_total"],
        "bytes_done": bytes_done,
        "file_count": node.store.file_count(row["id"]) if files is None else len(files),
        "files": None
        if files is None
        else [{"path": f.path, "size": f.size, "sha256": f.sha256.hex() if f.sha256 else None} for f in files],
        "error": row["error"],
        "created": row["created"],
        "updated": row["updated"],
        "manifest_hash": row["manifest_hash"].hex(),
        "receipt": row["receipt"].hex() if row["receipt"] and files is not None else None,
    }


def find(node: Node, transfer_id: str):
    row = node.store.get(transfer_id.lower())
    if row is None:
        raise RequestError(f"no transfer with id {quoted(transfer_id)}; see 'dorothy status'")
    return row


async def cancel_transfer(node: Node, row) -> None:
    """Cancel in any non-final state; a running attempt is stopped and tells
    the peer, and partial incoming data is removed."""
    if row["state"] in FINAL_STATES:
        raise RequestError(f"transfer {row['id']} is already {row['state']}")
    running = node.running.get(row["id"])
    if running is not None and running.ending:
        raise RequestError(f"transfer {row['id']} is ending right now; see 'dorothy status {row['id']}'")
    inbox = node.home.peer_inbox(row["peer"])
    if row["direction"] == "in" and await trio.to_thread.run_sync((inbox / row["id"]).exists):
        # Published, then a restart came before its receipt: cancelled, the
        # ledger would deny a complete copy that sits in the inbox.
        raise RequestError(
            f"transfer {row['id']} is already complete in the inbox (a restart came before its receipt);"
            f" it is recorded as received when {row['peer']} connects again"
        )
    # An outgoing cancellation is also delivered to the peer, on a fresh
    # connection (see outbox), so that it drops its partial copy.
    notify = 1 if row["direction"] == "out" and row["state"] != "queued" else 0
    node.store.update(row["id"], iso_now(), state="cancelled", error="cancelled by operator", notify_peer=notify)
    # Stop a running attempt before anything here awaits: an attempt that
    # fails meanwhile (a refused connection) would otherwise record its own
    # state, "waiting", over the operator's cancellation.
    if running is not None:
        running.cancelled_by_operator = True
        running.cancel_scope.cancel()
    if node.just_queued is not None and node.just_queued[0] == row["id"]:
        node.just_queued = None  # 100,000 names need not wait for the next send
    fields = {"transfer_id": row["id"], "peer": row["peer"], "direction": row["direction"], "by": "operator"}
    await node.record("transfer_cancelled", fields)
    if row["direction"] == "in":
        node.received_hashes.pop(row["id"], None)
        node.store.drop_chunks(row["id"])
        if running is None:
            await trio.to_thread.run_sync(discard_received, node.home.partial_dir, inbox, row["id"])
    node.wake_outbox()
    log.info("transfer %s cancelled by operator", row["id"])
