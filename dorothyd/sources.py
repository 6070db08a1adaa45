"""Turning the paths an operator names into a signed manifest, and reading
them back chunk by chunk, refusing any source that changed since.

Names: a file travels under its base name, a directory under its base name
with the relative paths of the regular files inside it. Symbolic links and
special files are refused rather than followed or skipped: evidence should
not silently change shape on the way.
"""

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..protocol.errors import ProtocolError
from ..protocol.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, validate_manifest
from ..protocol.paths import quoted

# msgpack array header, the signature and their length prefixes
MANIFEST_ENVELOPE_OVERHEAD = 128


class SourceError(Exception):
    """The operator's input cannot be sent; the message names the path."""


class SourceChanged(Exception):
    """A source file changed after it was queued; sending it would deliver a mix."""


class SourceUnavailable(OSError):
    """A source could not be opened or read for a reason that may pass (too
    many open files, an I/O error): the attempt is retried, not failed."""


# Opening fails for good only when the file is gone, is no longer a plain
# file we may read, or a symbolic link took its place (O_NOFOLLOW).
_CHANGED_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.EPERM})


@dataclass(frozen=True)
class Source:
    path: str  # relative path in the transfer
    source: bytes  # absolute path on this node
    size: int
    mtime_ns: int


def _shown(path: str | bytes) -> str:
    return quoted(os.fsdecode(path))


def _entry(relative: str, absolute: str, st: os.stat_result) -> Source:
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError(f"{_shown(absolute)}: the name is not valid UTF-8") from None
    if stat.S_ISLNK(st.st_mode):
        raise SourceError(f"{_shown(absolute)}: symbolic links are not sent (name the target instead)")
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"{_shown(absolute)}: not a regular file")
    try:
        fd = os.open(absolute, os.O_RDONLY | os.O_NOFOLLOW)
        os.close(fd)
    except OSError as exc:
        raise SourceError(f"{_shown(absolute)}: cannot read: {exc.strerror}") from None
    return Source(relative, os.fsencode(absolute), st.st_size, st.st_mtime_ns)


def collect(paths: list[str]) -> list[Source]:
    sources = []
    for given in paths:
        absolute = os.path.abspath(given)
        try:
            st = os.lstat(absolute)
        except OSError as exc:
            raise SourceError(f"{_shown(given)}: {exc.strerror.lower()}") from None
        name = os.path.basename(absolute.rstrip("/")) or absolute
        if stat.S_ISDIR(st.st_mode):
            sources.extend(_walk(absolute, name))
        else:
            sources.append(_entry(name, absolute, st))
    if not sources:
        raise SourceError("nothing to send: the named directories hold no files")
    return sources


def _walk(root: str, name: str) -> list[Source]:
    found = []

    def fail(exc: OSError):
        raise SourceError(f"{_shown(exc.filename)}: cannot read: {exc.strerror}")

    for directory, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames.sort()
        for dirname in dirnames:
            if os.path.islink(os.path.join(directory, dirname)):
                raise SourceError(f"{_shown(os.path.join(directory, dirname))}: symbolic links are not sent")
        # One relpath per directory, not per file: it was half of walking 10,000 files.
        prefix = os.path.relpath(directory, root).replace(os.sep, "/")
        prefix = name if prefix == "." else f"{name}/{prefix}"
        for filename in sorted(filenames):
            absolute = os.path.join(directory, filename)
            found.append(_entry(f"{prefix}/{filename}", absolute, os.lstat(absolute)))
    return found


def build_manifest(
    sources: list[Source], *, transfer_id: bytes, sender: bytes, receiver: bytes, created: str, chunk_size: int
) -> Manifest:
    manifest = Manifest(
        transfer_id=transfer_id,
        sender=sender,
        receiver=receiver,
        created=created,
        chunk_size=chunk_size,
        files=tuple(FileEntry(s.path, s.size, s.mtime_ns) for s in sources),
    )
    try:
        validate_manifest(manifest)
    except ProtocolError as exc:
        raise SourceError(str(exc)) from None
    if len(manifest.encode()) > MAX_MANIFEST_BYTES - MANIFEST_ENVELOPE_OVERHEAD:
        raise SourceError(f"the list of {len(sources)} names is too large for one transfer; send it in parts")
    return manifest


class SourceReader:
    """Reads one queued file, checking it is still what was queued (blocking
    calls: run them in a worker thread)."""

    def __init__(self, source: bytes, size: int, mtime_ns: int, path: str):
        self._expected = (size, mtime_ns)
        self._path = path  # as the manifest names it; quoted only in an error
        try:
            self.fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in _CHANGED_ERRNOS:
                raise SourceChanged(f"{quoted(path)}: cannot open: {exc.strerror}") from None
            raise SourceUnavailable(exc.errno, f"{quoted(path)}: cannot open: {exc.strerror}") from None
        self.check()

    def check(self) -> None:
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns) != self._expected:
            raise SourceChanged(f"{quoted(self._path)} changed after it was queued (size or modification time differ)")

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` from `offset`: the chunk is read into place in the
        record it travels in, with no copy of its own."""
        try:
            read = os.preadv(self.fd, [buffer], offset)
        except OSError as exc:
            raise SourceUnavailable(exc.errno, f"{quoted(self._path)}: cannot read: {exc.strerror}") from None
        if read != len(buffer):
            raise SourceChanged(f"{quoted(self._path)} became shorter while it was being sent")

    def close(self) -> None:
        os.close(self.fd)
