"""The protocol's own error types.

As in h11, there are two families: `LocalProtocolError` means *we* tried to do
something the protocol does not allow (a bug or misuse on this side);
`RemoteProtocolError` means the peer sent something illegal. Every decoder that
sees network bytes raises only `RemoteProtocolError` (or returns events), never
another exception: the fuzz tests hold it to that.
"""


class ProtocolError(Exception):
    """Base class. `code` is a stable machine-readable name for logs and the wire."""

    code = "protocol_error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class LocalProtocolError(ProtocolError):
    code = "local_error"


class RemoteProtocolError(ProtocolError):
    code = "remote_error"
