"""Deterministic payloads under WORK/data, generated once and reused.

- random-<N>MiB.bin: incompressible bytes from a seeded ChaCha20 stream
  (libsodium's randombytes_buf_deterministic, ~250 MiB/s), so every run on
  every machine sends the same bytes;
- text-<N>MiB.log: log-like lines (the generator of
  /work/shared/peers/gen_files.py, same seed), about 4.6x smaller under
  zstd level 1 per 1 MiB chunk; a shorter one is the prefix of a longer;
- small-<N>/: N files of 1-64 KiB in 100 folders, alternately cut from
  the text stream and from random bytes.

A file is reused when its size matches; a folder when its marker
(small-<N>.done, written last, outside the folder) says it is complete.
"""

import hashlib
import json
import os
import random
from pathlib import Path

from nacl.bindings import randombytes_buf_deterministic

MiB = 1 << 20
BLOCK = 16 * MiB
TEXT_SEED = 12345  # as in gen_files.py
SMALL_SEED = 4242
SMALL_MIN, SMALL_MAX = 1024, 64 * 1024
SMALL_FOLDERS = 100

LEVELS = ["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"]
COMPONENTS = ["ingest", "hasher", "transfer", "catalog", "auth", "storage", "scheduler"]
MESSAGES = [
    "chunk {a} of object {b:016x} stored offset={c} len={d}",
    "peer node-{a:03d} handshake ok rtt_us={c} cipher=xchacha20poly1305",
    "request id={b:016x} status=200 bytes={c} elapsed_ms={d}",
    "evidence item EV-{a:06d} sha256 verified ({c} bytes) in {d} ms",
    "retrying upload session={b:016x} attempt={a} backoff_ms={d}",
    "queue depth={a} inflight={d} dropped=0 window={c}",
    "case 2024-{a:05d}: custody record appended by user{d} seq={c}",
]


def random_block(label: str, index: int, size: int) -> bytes:
    seed = hashlib.sha256(f"dorothy-bench {label} {index}".encode()).digest()
    return randombytes_buf_deterministic(size, seed)


def text_blocks(seed: int = TEXT_SEED, lines_per_block: int = 20000):
    """Endless log-like text, in blocks of ~2 MiB."""
    rng = random.Random(seed)
    ts = 1_700_000_000_000  # ms
    while True:
        lines = []
        for _ in range(lines_per_block):
            ts += rng.randint(0, 50)
            s, ms = divmod(ts, 1000)
            msg = rng.choice(MESSAGES).format(
                a=rng.randint(0, 999), b=rng.getrandbits(64), c=rng.randint(0, 10_000_000), d=rng.randint(0, 5000)
            )
            lines.append(f"{s}.{ms:03d} {rng.choice(LEVELS):5s} [{rng.choice(COMPONENTS)}] pid={rng.randint(1000, 1100)} {msg}\n")
        yield "".join(lines).encode()


def _write(path: Path, size: int, blocks) -> None:
    partial = path.with_name(path.name + ".part")
    written = 0
    with open(partial, "wb") as f:
        for block in blocks:
            block = block[: size - written]
            f.write(block)
            written += len(block)
            if written >= size:
                break
    partial.rename(path)


def _ready(path: Path, size: int, log) -> bool:
    if path.exists() and path.stat().st_size == size:
        log(f"  {path}: present, reused")
        return True
    log(f"  {path}: generating {size / MiB:.0f} MiB ...")
    return False


def random_file(data_dir: Path, size: int, log=print) -> Path:
    path = data_dir / f"random-{size // MiB}MiB.bin"
    if not _ready(path, size, log):
        count = (size + BLOCK - 1) // BLOCK
        _write(path, size, (random_block("random", i, BLOCK) for i in range(count)))
    return path


def text_file(data_dir: Path, size: int, log=print) -> Path:
    path = data_dir / f"text-{size // MiB}MiB.log"
    if not _ready(path, size, log):
        _write(path, size, _text_prefix(data_dir, size) or text_blocks())
    return path


def _text_prefix(data_dir: Path, size: int):
    """The stream is deterministic, so a longer text file already holds
    this one as its prefix: copy it instead of generating again."""
    longer = [p for p in data_dir.glob("text-*MiB.log") if p.stat().st_size > size]
    if not longer:
        return None

    def blocks(source=min(longer, key=lambda p: p.stat().st_size)):
        with open(source, "rb") as f:
            while block := f.read(BLOCK):
                yield block

    return blocks()


def small_files(data_dir: Path, count: int, log=print) -> tuple[Path, int]:
    """The folder and its total bytes."""
    folder = data_dir / f"small-{count}"
    marker = data_dir / f"small-{count}.done"
    if marker.exists():
        total = json.loads(marker.read_text())["bytes"]
        log(f"  {folder}: present, reused")
        return folder, total
    log(f"  {folder}: generating {count} files ...")
    if folder.exists():
        for parent, _, names in os.walk(folder, topdown=False):
            for name in names:
                os.unlink(os.path.join(parent, name))
            os.rmdir(parent)
    rng = random.Random(SMALL_SEED)
    text = text_blocks(seed=SMALL_SEED)
    pool, pool_at = b"", 0
    total = 0
    for i in range(count):
        size = rng.randint(SMALL_MIN, SMALL_MAX)
        if i % 2:
            data = random_block("small", i, size)
        else:
            if pool_at + size > len(pool):
                pool, pool_at = next(text), 0
            data, pool_at = pool[pool_at : pool_at + size], pool_at + size
        sub = folder / f"d{i % SMALL_FOLDERS:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"item-{i:05d}.{'log' if i % 2 == 0 else 'bin'}").write_bytes(data)
        total += size
    marker.write_text(json.dumps({"files": count, "bytes": total}))
    return folder, total


def tree_size(folder: Path) -> tuple[int, int]:
    """(files, bytes) under a folder."""
    files = size = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(parent, name)).st_size
    return files, size
