"""The control server: a Unix socket in the node's home, owner-only, through
which the CLI queues, inspects and cancels transfers.

One JSON object per line each way. Requests are bounded in size; a bad
request gets an error reply and ends only its own connection.
"""

import json
import os
import socket
import struct

import trio

from ..keys.errors import KeysError
from .logs import log
from .node import Node
from .queueing import RequestError, cancel_transfer, describe, find, queue_transfer
from .sources import SourceError
from .store import FINAL_STATES

MAX_REQUEST = 1 << 20
# A `wait` holds its connection at most this long (the CLI's socket timeout
# is 60 s); a client that waits longer asks again.
MAX_WAIT_SECONDS = 50


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
    """One request, one reply. Whatever goes wrong stays in this connection:
    an unexpected error is logged and answered, never raised to the daemon."""
    async with stream:
        try:
            # Read first, refuse after: a client refused before its request
            # was read would see a broken pipe instead of the reason.
            request = await _read_request(stream)
            if not _same_user(stream):
                reply = {"ok": False, "error": "permission denied: the daemon belongs to another user"}
            else:
                reply = {"ok": True, **await _dispatch(node, request)}
        except (RequestError, SourceError, KeysError) as exc:
            reply = {"ok": False, "error": str(exc)}
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception as exc:  # noqa: BLE001 - the daemon keeps serving everyone else
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        try:
            await stream.send_all(_line(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _read_request(stream: trio.SocketStream) -> dict:
    buffer = b""
    while b"\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise RequestError("request ended early")
        buffer += data
        if len(buffer) > MAX_REQUEST:
            raise RequestError("request too large")
    try:
        request = json.loads(buffer.split(b"\n", 1)[0])
    except (ValueError, RecursionError):
        raise RequestError("malformed request") from None
    if not isinstance(request, dict):
        raise RequestError("request must be a JSON object")
    return request


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=True).encode() + b"\n"


def _string_list(request: dict, key: str) -> list[str]:
    value = request.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RequestError(f"'{key}' must be a non-empty list of strings")
    return value


def _id(request: dict) -> str:
    value = request.get("id")
    if not isinstance(value, str):
        raise RequestError("'id' must be a string")
    return value


def _seconds(request: dict) -> float:
    value = request.get("seconds")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_WAIT_SECONDS:
        raise RequestError(f"'seconds' must be a number from 0 to {MAX_WAIT_SECONDS}")
    return value


async def _wait(node: Node, transfer_id: str, seconds: float) -> dict:
    """The transfer once it is in a final state, or as it is after `seconds`."""
    row = find(node, transfer_id)
    with trio.move_on_after(seconds):
        while row["state"] not in FINAL_STATES:
            await node.next_update()
            row = find(node, transfer_id)
    return describe(node, row)


async def _dispatch(node: Node, request: dict) -> dict:
    op = request.get("op")
    if op == "ping":
        return {"name": node.config.name}
    if op == "send":
        peer = request.get("peer")
        if not isinstance(peer, str):
            raise RequestError("'peer' must be a string")
        return {"id": await queue_transfer(node, peer, _string_list(request, "paths"))}
    if op == "status" and request.get("id") is not None:
        row = find(node, _id(request))
        files = await node.files(row["id"]) if request.get("files", True) is not False else None
        return {"transfer": describe(node, row, files)}
    if op == "status":
        # Without their files: every transfer's would grow without bound
        # (a phone extraction is 50,000), past what a reply may carry.
        return {"transfers": [describe(node, row) for row in node.store.all_transfers()]}
    if op == "wait":
        return {"transfer": await _wait(node, _id(request), _seconds(request))}
    if op == "cancel":
        row = find(node, _id(request))
        await cancel_transfer(node, row)
        return {"id": row["id"], "state": "cancelled"}
    raise RequestError(f"unknown operation {op!r}")
