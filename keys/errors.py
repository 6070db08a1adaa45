"""The one error type of the keys package.

The CLI prints `str(err)` to an operator and the daemon writes it to its log,
so every message is a single line that says what is wrong and, where there is
one, what to do about it. Values that came from outside (a pasted key, a file
name, a peer name) are shown with `quoted()`, which escapes control characters
so that a stray newline in the input cannot split the message.
"""

# A pasted value can be arbitrarily long; an operator needs enough of it to
# recognise it, not all of it.
QUOTE_LIMIT = 80


class KeysError(Exception):
    """A key, key file, peer entry or trust store that cannot be used."""

    def __init__(self, message: str):
        # Messages are built to be one line; this keeps that promise even when
        # an unusual path (one containing a newline) slips into one.
        super().__init__(" ".join(message.splitlines()))


def quoted(text: str, limit: int | None = QUOTE_LIMIT) -> str:
    """`text` in quotes with control characters escaped, cut to `limit` chars."""
    if limit is not None and len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)
