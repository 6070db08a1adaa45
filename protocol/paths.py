"""Relative paths inside a transfer: validation and safe display.

A received name is never used as a filesystem path as it stands: it must
pass `validate_path`, and the whole list must pass `check_collisions`,
before the receiver creates anything. Names otherwise keep every character
the evidence had (newlines, escapes, `;`, non-ASCII), and `escape` is how
they are shown to people, so that no name can drive a terminal.
"""

import unicodedata

from .errors import RemoteProtocolError

# Linux limits: PATH_MAX counts bytes of the whole path, NAME_MAX those of a
# component.
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
# Deeper than any evidence tree, and shallow enough for every tool that
# walks a tree by recursion (Python's shutil.rmtree and os.walk among them:
# about 1,000 levels) to remove or read it.
MAX_PATH_COMPONENTS = 256


class PathError(RemoteProtocolError):
    code = "bad_path"


def escape(text: str) -> str:
    """Printable ASCII stays; everything else (controls, escapes, non-ASCII,
    backslash itself) becomes a Python-style escape, so output is one line
    of plain characters that still names the file unambiguously."""
    return text.encode("unicode_escape").decode("ascii").replace("'", "\\'")


def quoted(text: str) -> str:
    return f"'{escape(text)}'"


def validate_path(path: object) -> str:
    if type(path) is not str:
        raise PathError("a path in the manifest is not a string")

    def bad(why: str) -> PathError:  # the name is escaped only for an error: 10,000 paths per offer
        return PathError(f"path {quoted(path)} {why}")

    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("is not valid UTF-8") from None
    if not path:
        raise PathError("empty path")
    if len(encoded) > MAX_PATH_BYTES:
        raise bad(f"is longer than {MAX_PATH_BYTES} bytes")
    if "\x00" in path:
        raise bad("contains NUL")
    if path.startswith("/"):
        raise bad("is absolute")
    # Whole-list tests, and each component's length only when the path could
    # hold a long one: the receiver checks every name of an offer.
    components = path.split("/")
    if len(components) > MAX_PATH_COMPONENTS:
        raise bad(f"has more than {MAX_PATH_COMPONENTS} components")
    if "" in components:
        raise bad("has an empty component")
    for dots in (".", ".."):
        if dots in components:
            raise bad(f"has a {dots!r} component")
    if len(encoded) > MAX_COMPONENT_BYTES:
        for component in components:
            if len(component.encode("utf-8")) > MAX_COMPONENT_BYTES:
                raise bad(f"has a component longer than {MAX_COMPONENT_BYTES} bytes")
    return path


def _fold(path: str) -> str:
    # Case-insensitive and normalising filesystems (NTFS, APFS, exFAT) treat
    # these as one name; evidence copied onwards must not silently merge.
    # Unicode's canonical caseless match (D145): casefolding can undo NFC,
    # hence normalising on both sides of it. ASCII is its own NFC, and its
    # casefold is lower(): the fast way for most names.
    if path.isascii():
        return path.lower()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", path).casefold())


def check_collisions(paths: list[str]) -> None:
    """Refuse duplicates, case/normalisation collisions, and a name used both
    as a file and as a directory."""
    files: dict[str, str] = {}
    directories: dict[str, str] = {}
    for path in paths:
        folded = _fold(path)
        other = files.get(folded)
        if other == path:
            raise PathError(f"duplicate path {quoted(path)}")
        if other is not None:
            raise PathError(f"path {quoted(path)} collides with {quoted(other)} on case-insensitive filesystems")
        if folded in directories:
            raise PathError(f"path {quoted(path)} is a file, but {quoted(directories[folded])} needs it to be a directory")
        # A directory already listed had its parents checked then, and any
        # file named like one of them since was refused above: siblings (most
        # paths of a folder) skip the walk up.
        if folded.rpartition("/")[0] not in directories:
            parts = folded.split("/")
            for depth in range(1, len(parts)):
                prefix = "/".join(parts[:depth])
                if prefix in files:
                    raise PathError(f"path {quoted(path)} needs {quoted(files[prefix])} to be a directory, but it is a file")
                directories.setdefault(prefix, path)
        files[folded] = path
