"""The CLI's side of the control socket: one JSON request, one JSON reply."""

import json
import socket
from pathlib import Path

MAX_REPLY = 64 << 20


class ClientError(Exception):
    pass


def call(home: Path, request: dict, timeout: float = 60.0) -> dict:
    path = home / "control.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ClientError(f"no dorothyd is running for {home}; start it with: dorothyd --home {home}") from None
        except PermissionError:
            raise ClientError(f"permission denied on {path}: the daemon belongs to another user") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            data = sock.recv(1 << 16)
            if not data:
                break
            reply += data
            if len(reply) > MAX_REPLY:
                raise ClientError("reply from dorothyd is too large")
    except socket.timeout:
        raise ClientError("dorothyd did not answer in time") from None
    finally:
        sock.close()
    try:
        answer = json.loads(reply)
    except ValueError:
        raise ClientError("dorothyd closed the connection without an answer") from None
    if not answer.get("ok"):
        raise ClientError(answer.get("error", "dorothyd refused the request"))
    return answer
