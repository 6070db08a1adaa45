"""The control server: a Unix socket in the node's home, owner-only, through
which the CLI queues, inspects and cancels transfers.

One JSON object per line each way. Requests are bounded in size; a bad
request gets an error reply and ends only its own connection.
"""

import json
import os
import shutil
import socket
import struct

import trio

from ..protocol.paths import quoted
from .logs import log
from .node import Node, iso_now, node_key_bytes
from .sources import SourceError, build_manifest, collect
from .store import FINAL_STATES
from ..keys.errors import KeysError
from ..protocol.manifest import manifest_hash, sign_manifest

MAX_REQUEST = 1 << 20


class RequestError(Exception):
    pass


async def run_control(node: Node, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    path = node.home.control_socket
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if path.exists() or path.is_symlink():
        path.unlink()
    old_umask = os.umask(0o177)  # the socket is created owner-only, with no window
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(lambda stream: _serve(node, stream), [listener])
    finally:
        with trio.CancelScope(shield=True):
            path.unlink(missing_ok=True)


def _same_user(stream: trio.SocketStream) -> bool:
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


async def _serve(node: Node, stream: trio.SocketStream) -> None:
    try:
        if not _same_user(stream):
            await stream.send_all(_line({"ok": False, "error": "permission denied"}))
            return
        buffer = b""
        while b"\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
            if len(buffer) > MAX_REQUEST:
                raise RequestError("request too large")
        request = json.loads(buffer.split(b"\n", 1)[0])
        if not isinstance(request, dict):
            raise RequestError("request must be a JSON object")
        reply = {"ok": True, **await _dispatch(node, request)}
    except (RequestError, SourceError, KeysError) as exc:
        reply = {"ok": False, "error": str(exc)}
    except (ValueError, UnicodeDecodeError):
        reply = {"ok": False, "error": "malformed request"}
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
    try:
        await stream.send_all(_line(reply))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=True).encode() + b"\n"


async def _dispatch(node: Node, request: dict) -> dict:
    op = request.get("op")
    if op == "ping":
        return {"name": node.config.name}
    if op == "send":
        return await _send(node, request)
    if op == "status":
        return _status(node, request)
    if op == "cancel":
        return await _cancel(node, request)
    raise RequestError(f"unknown operation {op!r}")


def _string_list(request: dict, key: str) -> list[str]:
    value = request.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RequestError(f"'{key}' must be a non-empty list of strings")
    return value


async def _send(node: Node, request: dict) -> dict:
    peer_name = request.get("peer")
    if not isinstance(peer_name, str):
        raise RequestError("'peer' must be a string")
    peer = node.trust.get(peer_name)
    sources = await trio.to_thread.run_sync(collect, _string_list(request, "paths"))
    transfer_id = os.urandom(16)
    manifest = build_manifest(
        sources,
        transfer_id=transfer_id,
        sender=node_key_bytes(node.node_key),
        receiver=node_key_bytes(peer.node_key),
        created=iso_now(),
    )
    envelope = sign_manifest(manifest, node.identity.sign)
    digest = manifest_hash(manifest.encode())
    tid = transfer_id.hex()
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
    node.store.add_transfer(
        id=tid,
        direction="out",
        peer=peer.name,
        peer_node_key=str(peer.node_key),
        state="queued",
        manifest=envelope,
        manifest_hash=digest,
        files=[(s.path, s.source, s.size, s.mtime_ns) for s in sources],
        now=iso_now(),
    )
    log.info("queued transfer %s to %s: %d files, %d bytes", tid, peer.name, len(sources), manifest.total_bytes)
    node.wake_outbox()
    return {"id": tid}


def transfer_json(node: Node, row) -> dict:
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
        "files": [
            {"path": f.path, "size": f.size, "sha256": f.sha256.hex() if f.sha256 else None}
            for f in node.store.files(row["id"])
        ],
        "error": row["error"],
        "created": row["created"],
        "updated": row["updated"],
        "manifest_hash": row["manifest_hash"].hex(),
        "receipt": row["receipt"].hex() if row["receipt"] else None,
    }


def _find(node: Node, request: dict):
    transfer_id = request.get("id")
    if not isinstance(transfer_id, str):
        raise RequestError("'id' must be a string")
    row = node.store.get(transfer_id.lower())
    if row is None:
        raise RequestError(f"no transfer with id {quoted(transfer_id)}; see 'dorothy status'")
    return row


def _status(node: Node, request: dict) -> dict:
    if request.get("id") is not None:
        return {"transfer": transfer_json(node, _find(node, request))}
    return {"transfers": [transfer_json(node, row) for row in node.store.all_transfers()]}


async def _cancel(node: Node, request: dict) -> dict:
    row = _find(node, request)
    if row["state"] in FINAL_STATES:
        raise RequestError(f"transfer {row['id']} is already {row['state']}")
    node.store.update(row["id"], iso_now(), state="cancelled", error="cancelled by operator")
    fields = {"transfer_id": row["id"], "peer": row["peer"], "direction": row["direction"], "by": "operator"}
    await node.record("transfer_cancelled", fields)
    running = node.running.get(row["id"])
    if running is not None:
        running.cancelled_by_operator = True
        running.cancel_scope.cancel()
    if row["direction"] == "in":
        node.store.drop_chunks(row["id"])
        if running is None:
            await trio.to_thread.run_sync(shutil.rmtree, node.home.partial_dir / row["id"], True)
    log.info("transfer %s cancelled by operator", row["id"])
    return {"id": row["id"], "state": "cancelled"}
