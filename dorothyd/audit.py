"""Offline audit of a copy of a node's ledger: verify, prove, export, reconcile.

Pure functions over a ledger file and the node's public key; nothing here
writes, and nothing needs the node to be running. The auditor CLI wires
these to commands. Failure reasons come from ledger.py's fixed vocabulary.
"""

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import nacl.signing

from . import merkle
from .ledger import (
    BAD_SIGNATURE,
    BROKEN_CHAIN,
    GAP,
    GENESIS_PREV,
    REORDERED,
    TRUNCATED_BEFORE_CHECKPOINT,
    Record,
    RecordError,
    check_signature,
    decode_record,
    link_error,
    scan,
)
from .note import Checkpoint, NoteError, unverified_checkpoint, verify_checkpoint

INCLUSION_FORMAT = "dorothy-inclusion-v1"
CONSISTENCY_FORMAT = "dorothy-consistency-v1"
# Events that name a peer by `name`/`node_key` rather than `peer`/`peer_node_key`.
_PEER_EVENTS = frozenset({"peer_added", "peer_removed", "peer_key_changed"})
# A spreadsheet runs a cell starting with these as a formula; peer names and
# paths come from other nodes, so CSV cells get a leading ' (OWASP advice).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class AuditError(Exception):
    """The input cannot be audited as asked (unreadable ledger, bad proof)."""


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """`ok`, or the first bad record: `seq` is the position it holds (the
    sequence number it should carry), `offset` where its frame starts.
    `records` and `root` cover the records verified before it."""

    ok: bool
    records: int
    root: bytes
    seq: int | None = None
    offset: int | None = None
    reason: str | None = None
    detail: str = ""


def _verify_key(sign_public: bytes) -> nacl.signing.VerifyKey:
    if type(sign_public) is not bytes or len(sign_public) != 32:
        raise AuditError("the node key must be a 32-byte Ed25519 public key")
    return nacl.signing.VerifyKey(sign_public)


def _open(path: str | os.PathLike) -> tuple[int, int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc.strerror}") from exc
    return fd, os.fstat(fd).st_size


def read_records(path: str | os.PathLike) -> list[Record]:
    """Every record, decoded strictly (signatures are verify_ledger's job)."""
    fd, size = _open(path)
    try:
        return list(scan(fd, 0, size, None))
    except RecordError as err:
        raise AuditError(f"record at offset {err.offset}: {err}") from err
    finally:
        os.close(fd)


def _later_has_seq(fd: int, start: int, end: int, seq: int) -> bool:
    """Does a record after `start` carry `seq`? Tells a swap from a deletion."""
    try:
        return any(record.seq == seq for record in scan(fd, start, end, None))
    except RecordError:
        return False


def verify_ledger(
    path: str | os.PathLike, sign_public: bytes, *, checkpoints: Sequence[str] = ()
) -> VerifyResult:
    """Check every record's signature, sequence and chain, then every
    checkpoint (the node's own or held by peers) against the records.

    Streams the file: memory is O(log n) plus one record. A clean cut at a
    record boundary looks like a shorter valid ledger; only a checkpoint for
    a larger tree reveals it.
    """
    key = _verify_key(sign_public)
    heads, bad_notes = [], []
    for index, note in enumerate(checkpoints):
        try:
            heads.append(verify_checkpoint(note, sign_public))
        except NoteError as exc:
            bad_notes.append(f"checkpoint {index + 1}: {exc}")
    wanted = {head.size for head in heads}
    roots = {0: merkle.EMPTY_ROOT}
    tree, prev = merkle.CompactRange(), GENESIS_PREV

    def failed(reason: str, detail: str, offset: int | None, seq: int | None) -> VerifyResult:
        return VerifyResult(False, tree.size, tree.root(), seq, offset, reason, detail)

    fd, size = _open(path)
    try:
        for record in scan(fd, 0, size, key):
            reason = link_error(record, tree.size, prev)
            if reason == GAP and _later_has_seq(fd, record.end, size, tree.size):
                reason = REORDERED
            if reason == BROKEN_CHAIN:
                detail = f"record {tree.size}'s prev is not the hash of the record before it"
                return failed(reason, detail, record.offset, tree.size)
            if reason:
                detail = f"record {tree.size} carries sequence number {record.seq}"
                return failed(reason, detail, record.offset, tree.size)
            prev = record.digest
            tree.append(record.leaf_hash)
            if tree.size in wanted:
                roots[tree.size] = tree.root()
    except RecordError as err:
        return failed(err.reason, err.detail, err.offset, tree.size)
    finally:
        os.close(fd)
    if bad_notes:
        return failed(BAD_SIGNATURE, bad_notes[0], None, None)
    for head in sorted(heads, key=lambda h: h.size):
        if head.size > tree.size:
            detail = f"a checkpoint commits to {head.size} records; the file holds {tree.size}"
            return failed(TRUNCATED_BEFORE_CHECKPOINT, detail, size, tree.size)
        if roots[head.size] != head.root_hash:
            detail = f"the first {head.size} records do not hash to the checkpoint's root"
            return failed(TRUNCATED_BEFORE_CHECKPOINT, detail, None, None)
    return VerifyResult(True, tree.size, tree.root())


def _leaves_matching(records: list[Record], head: Checkpoint) -> list[bytes]:
    """The first head.size leaf hashes, if they hash to the head's root."""
    if head.size > len(records):
        raise AuditError(f"checkpoint for {head.size} records; the ledger holds {len(records)}")
    leaves = [record.leaf_hash for record in records[: head.size]]
    if merkle.root(leaves) != head.root_hash:
        raise AuditError(f"the ledger's first {head.size} records do not match the checkpoint")
    return leaves


def _checkpoint(note: str) -> Checkpoint:
    try:
        return unverified_checkpoint(note)
    except NoteError as exc:
        raise AuditError(f"checkpoint: {exc}") from exc


def inclusion_proof_for(path: str | os.PathLike, seq: int, checkpoint_note: str) -> dict:
    """A JSON-able proof that record `seq` is in the tree `checkpoint_note` signs."""
    records, head = read_records(path), _checkpoint(checkpoint_note)
    if not 0 <= seq < head.size:
        raise AuditError(f"record {seq} is not in a tree of {head.size} records")
    leaves = _leaves_matching(records, head)
    return {
        "format": INCLUSION_FORMAT,
        "seq": seq,
        "record": records[seq].payload.hex(),
        "proof": [h.hex() for h in merkle.inclusion_proof(seq, leaves)],
        "checkpoint": checkpoint_note,
    }


def _fields(proof: object, keys: set[str], fmt: str) -> dict:
    if type(proof) is not dict or proof.keys() != keys or proof.get("format") != fmt:
        raise AuditError(f"not a {fmt} proof")
    return proof


def _hashes(items: object) -> list[bytes]:
    if type(items) is not list or not all(type(h) is str for h in items):
        raise AuditError("proof hashes must be a list of hex strings")
    try:
        return [bytes.fromhex(h) for h in items]
    except ValueError as exc:
        raise AuditError("proof hash is not hex") from exc


def _verified_head(note: object, sign_public: bytes) -> Checkpoint:
    try:
        return verify_checkpoint(note, sign_public)
    except NoteError as exc:
        raise AuditError(f"checkpoint: {exc}") from exc


def verify_inclusion_json(proof: dict, sign_public: bytes) -> Record:
    """The proven record, if the node signed both it and the checkpoint and
    the Merkle path joins them; AuditError otherwise."""
    fields = _fields(proof, {"format", "seq", "record", "proof", "checkpoint"}, INCLUSION_FORMAT)
    head = _verified_head(fields["checkpoint"], sign_public)
    try:
        record = decode_record(bytes.fromhex(fields["record"]))
        check_signature(record, _verify_key(sign_public))
        if record.seq != fields["seq"]:
            raise AuditError("the record's sequence number is not the proof's")
        hashes = _hashes(fields["proof"])
        merkle.verify_inclusion(record.seq, head.size, record.leaf_hash, hashes, head.root_hash)
    except (ValueError, TypeError, RecordError) as exc:
        raise AuditError(f"inclusion proof rejected: {exc}") from exc
    return record


def consistency_proof_for(path: str | os.PathLike, old_note: str, new_note: str) -> dict:
    """A JSON-able proof that the tree of `new_note` extends that of `old_note`."""
    records = read_records(path)
    old, new = _checkpoint(old_note), _checkpoint(new_note)
    if old.size > new.size:
        raise AuditError("the old checkpoint is larger than the new one")
    leaves = _leaves_matching(records, new)
    _leaves_matching(records, old)
    hashes = merkle.consistency_proof(old.size, leaves) if old.size else []
    return {"format": CONSISTENCY_FORMAT, "old": old_note, "new": new_note, "proof": [h.hex() for h in hashes]}


def verify_consistency_json(proof: dict, sign_public: bytes) -> tuple[Checkpoint, Checkpoint]:
    """Both checkpoints, if the node signed them and the newer extends the older."""
    fields = _fields(proof, {"format", "old", "new", "proof"}, CONSISTENCY_FORMAT)
    old = _verified_head(fields["old"], sign_public)
    new = _verified_head(fields["new"], sign_public)
    hashes = _hashes(fields["proof"])
    if old.size == 0:
        # Every tree extends the empty one (whose root Checkpoint checks);
        # RFC 9162 has no proof for it, so none may be given.
        if hashes or new.size < old.size:
            raise AuditError("a consistency proof from the empty tree must be empty")
        return old, new
    try:
        merkle.verify_consistency(old.size, new.size, hashes, old.root_hash, new.root_hash)
    except merkle.ProofError as exc:
        raise AuditError(f"consistency proof rejected: {exc}") from exc
    return old, new


def _names_peer(record: Record, peer: str) -> bool:
    fields = record.fields
    if record.event in _PEER_EVENTS:
        return peer in (fields.get("name"), fields.get("node_key"), fields.get("new_node_key"))
    return peer in (fields.get("peer"), fields.get("peer_node_key"))


def filter_records(
    records: list[Record],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    peer: str | None = None,
    transfer_id: str | None = None,
) -> list[Record]:
    """Records with since <= time < until, naming `peer` (by name or node
    key) and `transfer_id`; a criterion left as None does not filter."""
    return [
        r
        for r in records
        if (since is None or r.timestamp >= since)
        and (until is None or r.timestamp < until)
        and (peer is None or _names_peer(r, peer))
        and (transfer_id is None or r.fields.get("transfer_id") == transfer_id)
    ]


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def record_json(record: Record) -> dict:
    """One record as JSON-able values, bytes as lower-case hex."""
    return {
        "seq": record.seq,
        "time": record.time,
        "event": record.event,
        "fields": _jsonable(record.fields),
        "prev": record.prev.hex(),
        "sig": record.sig.hex(),
        "sha256": record.digest.hex(),
    }


def export_jsonl(records: list[Record]) -> str:
    return "".join(json.dumps(record_json(r), ensure_ascii=True) + "\n" for r in records)


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def export_csv(records: list[Record]) -> str:
    """seq, time, event, transfer_id, peer, sha256, fields (as JSON)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["seq", "time", "event", "transfer_id", "peer", "sha256", "fields"])
    for r in records:
        row = [r.seq, r.time, r.event, r.fields.get("transfer_id"), r.fields.get("peer"), r.digest.hex()]
        row.append(json.dumps(_jsonable(r.fields), ensure_ascii=True, sort_keys=True))
        writer.writerow([_cell(value) for value in row])
    return out.getvalue()


@dataclass(frozen=True, slots=True)
class _Node:
    name: str
    node_key: str
    records: list[Record]

    @classmethod
    def of(cls, records: list[Record], label: str) -> "_Node":
        for r in records:
            if r.event == "node_created":
                name, key = r.fields.get("name"), r.fields.get("node_key")
                if type(name) is str and type(key) is str:
                    return cls(name, key, records)
        raise AuditError(f"ledger {label} has no usable node_created record")

    def transfers(self, event: str, peer: "_Node") -> tuple[dict[str, Record], list[str]]:
        """This node's `event` records with `peer`, by transfer id, and a line
        for every transfer id recorded more than once."""
        found: dict[str, Record] = {}
        repeated = []
        for r in self.records:
            if r.event == event and r.fields.get("peer_node_key") == peer.node_key:
                tid = str(r.fields.get("transfer_id"))
                if tid in found:
                    repeated.append(f"transfer {tid}: {self.name} records {event} more than once")
                found.setdefault(tid, r)
        return found, repeated


def _files(record: Record) -> dict[str, tuple[object, object]]:
    files = record.fields.get("files")
    entries = files if type(files) is list else []
    return {str(f.get("path")): (f.get("size"), f.get("sha256")) for f in entries if type(f) is dict}


def _compare(tid: str, sent: Record, got: Record, sender: _Node, receiver: _Node) -> list[str]:
    lines = []
    who = f"{sender.name} (delivered) and {receiver.name} (received)"
    if sent.fields.get("manifest_hash") != got.fields.get("manifest_hash"):
        lines.append(f"transfer {tid}: manifest_hash differs between {who}")
    sent_files, got_files = _files(sent), _files(got)
    for path in sorted(sent_files.keys() | got_files.keys()):
        if sent_files.get(path) != got_files.get(path):
            versions = f"{sent_files.get(path)} vs {got_files.get(path)}"
            lines.append(f"transfer {tid}: file {path!r} (size, sha256) differs between {who}: {versions}")
    if type(sent.fields.get("receipt")) is not bytes or sent.fields.get("receipt") != got.fields.get("receipt"):
        lines.append(f"transfer {tid}: receipt bytes differ between {who}")
    return lines


def _one_way(sender: _Node, receiver: _Node) -> list[str]:
    sent, lines = sender.transfers("transfer_delivered", receiver)
    got, repeated = receiver.transfers("transfer_received", sender)
    lines += repeated
    for tid, record in sent.items():
        if tid in got:
            lines += _compare(tid, record, got[tid], sender, receiver)
        else:
            lines.append(
                f"transfer {tid}: {sender.name} recorded it delivered to {receiver.name},"
                f" who has no transfer_received for it"
            )
    for tid in (tid for tid in got if tid not in sent):
        lines.append(
            f"transfer {tid}: {receiver.name} recorded it received from {sender.name},"
            f" who has no transfer_delivered for it"
        )
    return lines


def reconcile(records_a: list[Record], records_b: list[Record]) -> list[str]:
    """Every difference between what A and B recorded about transfers between
    them, one line each naming the transfer id; empty when they agree.
    Each ledger's node_created record says whose it is."""
    a, b = _Node.of(records_a, "A"), _Node.of(records_b, "B")
    return _one_way(a, b) + _one_way(b, a)
