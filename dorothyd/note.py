"""C2SP signed notes with Ed25519, and the ledger's tlog-checkpoint body.

A signed note (c2sp.org/signed-note) is UTF-8 text, a blank line, then
lines `— <key name> base64(key ID || signature)`. A checkpoint
(c2sp.org/tlog-checkpoint) is a note whose text is the origin, the decimal
tree size and the base64 root hash, one per line, then extension lines.
tlog-checkpoint has no time field, so the ledger puts the signing time in
one extension line, `time <RFC 3339 UTC>`; the whole text is signed, so the
time is as authentic as the root (SPEC.md section 6 says why).

Pure functions: no I/O, no clock. The signer is duck-typed: `.sign(bytes)`
returns a 64-byte detached Ed25519 signature, `.signing_key.verify_key` is a
nacl.signing.VerifyKey.
"""

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone

import nacl.exceptions
import nacl.signing

from .merkle import EMPTY_ROOT, HASH_SIZE, MAX_TREE_SIZE

# Signature type identifier byte for Ed25519 (signed-note, "Signature types").
ED25519_TYPE = b"\x01"
ED25519_PUBLIC_SIZE = 32
ED25519_SIGNATURE_SIZE = 64
KEY_ID_SIZE = 4
EM_DASH = "\u2014"
# The spec says verifiers SHOULD bound a note and MUST accept 16 signatures;
# post-quantum ones reach ~5 kB, so 16 of them in base64 are ~110 kB.
MAX_NOTE_BYTES = 128 * 1024
MAX_SIGNATURES = 32
# Our origins are ~31 characters; the bound only keeps a hostile note small.
MAX_ORIGIN_CHARS = 256
# The origin names the log by its key: SHA-256 of the Ed25519 public key,
# truncated to 64 bits (enough to tell nodes apart; authenticity comes from
# the signature, never from this name).
ORIGIN_PREFIX = "dorothy-ledger/"
ORIGIN_KEY_HEX_CHARS = 16
TIME_EXTENSION = "time "
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_SIZE_RE = re.compile(r"0|[1-9][0-9]{0,19}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{8}")


class NoteError(ValueError):
    """A note, verifier key or checkpoint is malformed or does not verify."""


def format_utc(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-11-29T06:40:00.123456Z.

    Shared with ledger records so every time in the ledger has one form.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("times must be timezone-aware")
    t = moment.astimezone(timezone.utc)
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T"
        f"{t.hour:02d}:{t.minute:02d}:{t.second:02d}.{t.microsecond:06d}Z"
    )


def parse_utc(text: object) -> datetime:
    """The inverse of format_utc; anything not in exactly that form is refused."""
    if type(text) is not str or not _TIME_RE.fullmatch(text):
        raise ValueError(f"not an RFC 3339 UTC time with microseconds: {text!r}")
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    if format_utc(moment) != text:
        raise ValueError(f"not a canonical time: {text!r}")
    return moment


def _b64decode_canonical(text: str, what: str) -> bytes:
    """Strict base64 whose re-encoding is the same text, so that a note has
    exactly one spelling (unused low bits in the last character would
    otherwise give several)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise NoteError(f"{what} is not base64") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise NoteError(f"{what} is not canonical base64")
    return raw


def _check_key_name(name: object) -> str:
    if type(name) is not str or not name:
        raise NoteError("key name must be a non-empty string")
    if any(ch.isspace() or ch == "+" or ord(ch) < 0x20 for ch in name):
        raise NoteError(f"key name {name!r} contains a space, '+' or control character")
    return name


def _check_public(sign_public: object) -> bytes:
    if type(sign_public) is not bytes or len(sign_public) != ED25519_PUBLIC_SIZE:
        raise NoteError(f"an Ed25519 public key is {ED25519_PUBLIC_SIZE} bytes")
    return sign_public


def key_id(name: str, sign_public: bytes) -> bytes:
    """SHA-256(name || 0x0A || 0x01 || public key)[:4] (signed-note)."""
    material = _check_key_name(name).encode() + b"\n" + ED25519_TYPE + _check_public(sign_public)
    return hashlib.sha256(material).digest()[:KEY_ID_SIZE]


def verifier_key(name: str, sign_public: bytes) -> str:
    """`name+hex(key ID)+base64(0x01 || public key)`."""
    encoded = base64.b64encode(ED25519_TYPE + _check_public(sign_public)).decode()
    return f"{name}+{key_id(name, sign_public).hex()}+{encoded}"


def _parse_verifier_key(vkey: object) -> tuple[str, bytes, bytes]:
    if type(vkey) is not str:
        raise NoteError("verifier key must be a string")
    parts = vkey.split("+", 2)  # the base64 key may itself contain "+"
    if len(parts) != 3 or not _KEY_ID_RE.fullmatch(parts[1]):
        raise NoteError("verifier key is not name+keyid+key")
    name = _check_key_name(parts[0])
    raw = _b64decode_canonical(parts[2], "verifier key")
    if len(raw) != 1 + ED25519_PUBLIC_SIZE or raw[:1] != ED25519_TYPE:
        raise NoteError("verifier key is not an Ed25519 key")
    if key_id(name, raw[1:]).hex() != parts[1]:
        raise NoteError("verifier key ID does not match its name and key")
    return name, bytes.fromhex(parts[1]), raw[1:]


def _check_text(text: object) -> str:
    if type(text) is not str:
        raise NoteError("note must be a string")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise NoteError("note is not valid UTF-8") from exc
    if size > MAX_NOTE_BYTES:
        raise NoteError(f"note of {size} bytes exceeds {MAX_NOTE_BYTES}")
    if any(ord(ch) < 0x20 and ch != "\n" for ch in text):
        raise NoteError("note contains a control character other than newline")
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    return text


def _split_note(note: object) -> tuple[str, list[tuple[str, bytes]]]:
    """(text, [(key name, key ID || signature)]) before any verification."""
    note = _check_text(note)
    cut = note.rfind("\n\n")
    if cut < 0:
        raise NoteError("note has no blank line before its signatures")
    text, lines = note[: cut + 1], note[cut + 2 : -1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note has more than {MAX_SIGNATURES} signatures")
    signatures = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) != 3 or fields[0] != EM_DASH:
            raise NoteError(f"malformed signature line {line!r}")
        raw = _b64decode_canonical(fields[2], "signature")
        if len(raw) <= KEY_ID_SIZE:
            raise NoteError("signature too short")
        signatures.append((_check_key_name(fields[1]), raw))
    return text, signatures


def sign_note(text: str, name: str, signer) -> str:
    """The note `text` signed by `signer` under key name `name`."""
    _check_text(text)
    sign_public = signer.signing_key.verify_key.encode()
    signature = signer.sign(text.encode("utf-8"))
    if type(signature) is not bytes or len(signature) != ED25519_SIGNATURE_SIZE:
        raise NoteError("signer did not return a 64-byte Ed25519 signature")
    encoded = base64.b64encode(key_id(name, sign_public) + signature).decode()
    note = f"{text}\n{EM_DASH} {name} {encoded}\n"
    _check_text(note)
    return note


def verify_note(note: str, vkey: str) -> str:
    """The text of `note` if the key `vkey` signed it; NoteError otherwise.

    As signed-note requires: signatures by other keys are ignored, a failing
    signature by this key rejects the note, and so does having none.
    """
    name, kid, sign_public = _parse_verifier_key(vkey)
    text, signatures = _split_note(note)
    verify_key = nacl.signing.VerifyKey(sign_public)
    found = False
    for signer_name, raw in signatures:
        if signer_name != name or raw[:KEY_ID_SIZE] != kid:
            continue
        if len(raw) != KEY_ID_SIZE + ED25519_SIGNATURE_SIZE:
            raise NoteError(f"signature by {name} has the wrong length")
        try:
            verify_key.verify(text.encode("utf-8"), raw[KEY_ID_SIZE:])
        except nacl.exceptions.BadSignatureError as exc:
            raise NoteError(f"signature by {name} does not verify") from exc
        found = True
    if not found:
        raise NoteError(f"note has no signature by {name}")
    return text


def checkpoint_origin(sign_public: bytes) -> str:
    """`dorothy-ledger/<first 16 hex of SHA-256(public key)>`, also the key name."""
    digest = hashlib.sha256(_check_public(sign_public)).hexdigest()
    return ORIGIN_PREFIX + digest[:ORIGIN_KEY_HEX_CHARS]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed tree head: the ledger's first `size` records hash to `root_hash`."""

    origin: str
    size: int
    root_hash: bytes
    timestamp: datetime

    def __post_init__(self) -> None:
        if len(_check_key_name(self.origin)) > MAX_ORIGIN_CHARS:
            raise NoteError(f"origin longer than {MAX_ORIGIN_CHARS} characters")
        if type(self.size) is not int or not 0 <= self.size <= MAX_TREE_SIZE:
            raise NoteError("tree size must be an integer in [0, 2^64)")
        if type(self.root_hash) is not bytes or len(self.root_hash) != HASH_SIZE:
            raise NoteError(f"root hash must be {HASH_SIZE} bytes")
        if self.size == 0 and self.root_hash != EMPTY_ROOT:
            raise NoteError("an empty tree's root is SHA-256 of nothing")
        try:
            format_utc(self.timestamp)
        except (ValueError, AttributeError, TypeError) as exc:
            raise NoteError("timestamp must be a timezone-aware datetime") from exc

    def encode(self) -> str:
        root_b64 = base64.b64encode(self.root_hash).decode()
        return f"{self.origin}\n{self.size}\n{root_b64}\n{TIME_EXTENSION}{format_utc(self.timestamp)}\n"

    @classmethod
    def parse(cls, text: str) -> "Checkpoint":
        """Exactly four lines, each in the one form `encode` writes."""
        lines = _check_text(text)[:-1].split("\n")
        if len(lines) != 4:
            raise NoteError("checkpoint must have origin, size, root and time lines")
        origin, size, root_b64, time_line = lines
        if not _SIZE_RE.fullmatch(size):
            raise NoteError(f"tree size {size!r} is not a canonical decimal")
        if not time_line.startswith(TIME_EXTENSION):
            raise NoteError("checkpoint lacks its time extension line")
        try:
            timestamp = parse_utc(time_line[len(TIME_EXTENSION) :])
        except ValueError as exc:
            raise NoteError(str(exc)) from exc
        return cls(origin, int(size), _b64decode_canonical(root_b64, "root hash"), timestamp)


def unverified_checkpoint(note: str) -> Checkpoint:
    """The checkpoint in a signed note WITHOUT checking any signature: only
    for choosing a file name or key before `verify_checkpoint`."""
    text, _ = _split_note(note)
    return Checkpoint.parse(text)


def verify_checkpoint(note: str, sign_public: bytes) -> Checkpoint:
    """The checkpoint in `note`, if the ledger key `sign_public` signed it.

    The origin must be the one derived from that key, and the signature must
    be under that origin as key name (tlog-checkpoint: "SHOULD match").
    """
    origin = checkpoint_origin(sign_public)
    text = verify_note(note, verifier_key(origin, sign_public))
    checkpoint = Checkpoint.parse(text)
    if checkpoint.origin != origin:
        raise NoteError(f"checkpoint origin {checkpoint.origin!r} is not this key's {origin!r}")
    return checkpoint
