"""Small files that only their owner may touch: written durably, read warily.

Both the node key and the trust store are a few hundred bytes that decide who
this node is and whom it believes, so they share three habits:

* they are created owner-only (0600) from the first byte, never chmod-ed
  after the secret is already on disk;
* a write is durable before we report success: the data is fsync'd, and so is
  the directory, because a new or renamed file is only safe once the
  directory entry that names it is on disk too;
* a read checks what it is reading (a regular file, not too open, not too
  large) before it reads it, and reads at most a bounded number of bytes.

Every failure is a `KeysError` whose message names the file.
"""

import os
import shlex
import stat
from pathlib import Path

from .errors import KeysError, quoted

OWNER_ONLY_MODE = 0o600

# Reads go in chunks of this size; the files are small, so one read is usual.
READ_CHUNK = 16 * 1024

# O_CLOEXEC: the daemon may start helper processes; they must not inherit a
# descriptor of the key file.
_OPEN_FLAGS = os.O_CLOEXEC


def _os_failure(action: str, path: Path, err: OSError) -> KeysError:
    reason = err.strerror or str(err)
    return KeysError(f"cannot {action} {quoted(str(path), None)}: {reason}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_directory(directory: Path) -> None:
    """Make a create or rename inside `directory` survive a power cut."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS)
    except OSError as err:
        raise _os_failure("open directory", directory, err) from err
    try:
        os.fsync(fd)
    except OSError as err:
        raise _os_failure("sync directory", directory, err) from err
    finally:
        os.close(fd)


def _write_owner_only(fd: int, data: bytes) -> None:
    # The mode given to os.open is filtered by the umask; an odd umask could
    # leave the owner unable to read their own key, so set it exactly.
    os.fchmod(fd, OWNER_ONLY_MODE)
    _write_all(fd, data)
    os.fsync(fd)


def create_new_file(path: Path, data: bytes) -> None:
    """Create `path` holding `data`; refuse if anything already has that name.

    O_EXCL makes "does it exist?" and "create it" one step, so two callers can
    never both believe they created the file, and a symlink planted at `path`
    is refused rather than followed. If writing fails the half-written file is
    removed, so a retry is not blocked by our own debris.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS
    try:
        fd = os.open(path, flags, OWNER_ONLY_MODE)
    except FileExistsError as err:
        raise KeysError(
            f"{quoted(str(path), None)} already exists; refusing to overwrite it"
        ) from err
    except OSError as err:
        raise _os_failure("create", path, err) from err
    try:
        _write_owner_only(fd, data)
    except OSError as err:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise _os_failure("write", path, err) from err
    os.close(fd)
    fsync_directory(path.parent)


def replace_file(path: Path, data: bytes) -> None:
    """Atomically make `path` hold `data`: readers see the old or the new file.

    The new content goes to a temporary file in the same directory (a rename
    is only atomic within one filesystem), is fsync'd, then renamed over
    `path`. A crash at any point leaves either the old file or the new one.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS
    try:
        fd = os.open(temp, flags, OWNER_ONLY_MODE)
    except OSError as err:
        raise _os_failure("create a temporary file for", path, err) from err
    try:
        try:
            _write_owner_only(fd, data)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise _os_failure("write", path, err) from err
    fsync_directory(path.parent)


def read_guarded_file(
    path: Path,
    *,
    what: str,
    max_bytes: int,
    forbidden_mode_bits: int,
    why_owner_only: str,
    missing_ok: bool = False,
) -> bytes | None:
    """Read a small file after checking its type, permissions and size.

    `what` names the file for the operator ("node key file"). A file whose
    mode has any of `forbidden_mode_bits` is refused the way ssh refuses a
    private key others can read, with `why_owner_only` and the chmod that
    fixes it. Returns None for a missing file when `missing_ok`.
    """
    path = Path(path)
    shown = quoted(str(path), None)
    # O_NONBLOCK: opening a FIFO planted at `path` must not hang the caller;
    # it is refused below as not a regular file. It changes nothing for
    # regular files.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _OPEN_FLAGS)
    except FileNotFoundError as err:
        if missing_ok:
            return None
        raise KeysError(f"{what} {shown} does not exist") from err
    except OSError as err:
        raise _os_failure("open", path, err) from err
    try:
        # fstat the descriptor we will read, not the name: the name could be
        # swapped for another file between a stat and an open.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeysError(f"{what} {shown} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & forbidden_mode_bits:
            raise KeysError(
                f"Permissions {mode:04o} for {shown} are too open: "
                f"{why_owner_only}. Run: chmod 600 {shlex.quote(str(path))}"
            )
        if info.st_size > max_bytes:
            raise KeysError(
                f"{what} {shown} is {info.st_size} bytes, more than any real "
                f"one ({max_bytes} bytes at most)"
            )
        return _read_at_most(fd, max_bytes, what, shown)
    except OSError as err:
        raise _os_failure("read", path, err) from err
    finally:
        os.close(fd)


def _read_at_most(fd: int, max_bytes: int, what: str, shown: str) -> bytes:
    # The size was checked, but the file can grow after fstat; stop reading
    # one byte past the limit either way.
    chunks = []
    total = 0
    while total <= max_bytes:
        chunk = os.read(fd, min(READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    raise KeysError(f"{what} {shown} grew past {max_bytes} bytes while being read")
