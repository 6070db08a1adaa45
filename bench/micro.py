"""Single-core limits: what one core does per second with the stages a
chunk goes through, measured in the bench's own process (~0.5 s each).

Every figure is MiB/s of chunk payload, 1 MiB per call as Dorothy's
default chunk. "allocating" is PyNaCl's API (a fresh bytes object per
call, which glibc serves with mmap/munmap above its mmap threshold; the
bench process does not apply dorothyd's mallopt tuning, so these are the
untuned figures); "prealloc" calls libsodium through nacl._sodium into one
reused output buffer.
"""

import hashlib
import time
import zlib

import nacl.bindings as sodium
import trio
import zstandard
from nacl._sodium import ffi, lib

from dorothy.dorothyd.storage import chunk_check
from dorothy.protocol.compression import compress_if_smaller, decompress_exact

from .data import random_block, text_blocks

MiB = 1 << 20
CHUNK = MiB


def _rate(fn, seconds: float, nbytes: int = CHUNK) -> float:
    fn()  # warm up
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return calls * nbytes / MiB / elapsed


def _aead_prealloc(encrypt, tag_len: int, message: bytes, nonce: bytes, key: bytes):
    out = ffi.new("unsigned char[]", len(message) + tag_len)
    out_len = ffi.new("unsigned long long *")
    source = ffi.from_buffer(message)

    def seal():
        rc = encrypt(out, out_len, source, len(message), ffi.NULL, 0, ffi.NULL, nonce, key)
        assert rc == 0

    return seal


async def _trio_loopback(seconds: float) -> float:
    """One trio task sends 1 MiB blocks over 127.0.0.1, another receives."""
    block = bytes(CHUNK)
    received = 0
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        server_ready = trio.Event()
        accepted: list = []

        async def accept():
            accepted.append(await listeners[0].accept())
            server_ready.set()

        nursery.start_soon(accept)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await server_ready.wait()
        server = accepted[0]
        started = trio.current_time()

        async def send():
            with trio.move_on_after(seconds):
                while True:
                    await client.send_all(block)
            await client.aclose()

        nursery.start_soon(send)
        while data := await server.receive_some(CHUNK):
            received += len(data)
        elapsed = trio.current_time() - started
        await server.aclose()
        await listeners[0].aclose()
    return received / MiB / elapsed


def run(seconds: float = 0.5) -> dict:
    text = next(text_blocks())[:CHUNK]
    noise = random_block("micro", 0, CHUNK)
    key32, nonce32, nonce12 = bytes(range(32)), bytes(32), bytes(12)
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=True)
    packed = compressor.compress(text)
    decompressor = zstandard.ZstdDecompressor()
    results = {
        "sha256": _rate(lambda: hashlib.sha256(noise).digest(), seconds),
        "crc32 (zlib)": _rate(lambda: zlib.crc32(noise), seconds),
        "held-chunk check (aegis256 mac)": _rate(lambda: chunk_check(noise), seconds),
        "aegis256 seal, allocating (pynacl)": _rate(
            lambda: sodium.crypto_aead_aegis256_encrypt(noise, None, nonce32, key32), seconds
        ),
        "aegis256 seal, prealloc (nacl._sodium)": _rate(
            _aead_prealloc(lib.crypto_aead_aegis256_encrypt, 32, noise, nonce32, key32), seconds
        ),
        "chacha20-poly1305 seal, allocating (pynacl)": _rate(
            lambda: sodium.crypto_aead_chacha20poly1305_ietf_encrypt(noise, None, nonce12, key32), seconds
        ),
        "chacha20-poly1305 seal, prealloc (nacl._sodium)": _rate(
            _aead_prealloc(lib.crypto_aead_chacha20poly1305_ietf_encrypt, 16, noise, nonce12, key32), seconds
        ),
        "zstd-1 compress, text": _rate(lambda: compressor.compress(text), seconds),
        "zstd-1 compress, random (a full attempt)": _rate(lambda: compressor.compress(noise), seconds),
        "zstd-1 sampled attempt, random (compress_if_smaller)": _rate(lambda: compress_if_smaller(noise), seconds),
        "zstd decompress, text (one-shot)": _rate(lambda: decompressor.decompress(packed), seconds),
        "zstd decompress, text (dorothy decompress_exact)": _rate(lambda: decompress_exact(packed, len(text)), seconds),
        "trio loopback send+receive (one thread)": trio.run(_trio_loopback, max(seconds, 0.2)),
    }
    return {
        "chunk_bytes": CHUNK,
        "seconds_each": seconds,
        "zstd1_text_ratio": round(len(text) / len(packed), 2),
        "MiB_s": {name: round(value, 1) for name, value in results.items()},
    }
