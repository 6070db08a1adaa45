"""Running SHA-256 of a file whose chunks may arrive out of order.

The hasher consumes chunks in offset order as they come; a chunk beyond the
hashed prefix is left on disk and read back when the prefix reaches it
(`catch_up`). In the usual in-order case no byte is read twice; after a
restart the prefix is rebuilt from disk once.
"""

import hashlib
import os


class FileHasher:
    def __init__(self):
        self._sha = hashlib.sha256()
        self.offset = 0

    def feed(self, offset: int, data: bytes) -> None:
        if offset == self.offset:
            self._sha.update(data)
            self.offset += len(data)

    def catch_up(self, fd: int, end: int, block: int = 1 << 20) -> None:
        """Hash what is on disk from the current prefix up to `end`."""
        while self.offset < end:
            data = os.pread(fd, min(block, end - self.offset), self.offset)
            if not data:
                raise OSError(f"file ends at {self.offset}, expected {end} bytes")
            self._sha.update(data)
            self.offset += len(data)

    def digest(self) -> bytes:
        return self._sha.digest()
