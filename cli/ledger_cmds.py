"""`dorothy ledger ...`: the auditor's commands. They work offline on a copy
of a ledger, given the node key; in a node's home they default to its own
ledger and key."""

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from ..dorothyd import audit
from ..dorothyd.ledger import LEDGER_FILE
from ..dorothyd.note import unverified_checkpoint
from ..keys.nodekey import NodeKey
from ..protocol.paths import escape
from .client import ClientError
from .common import emit, existing_home, home_option
from .nodefiles import load_identity


def _iso(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ClientError(f"{text!r} is not an ISO 8601 time (e.g. 2026-11-29 or 2026-11-29T06:00:00Z)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _notes(paths) -> list[str]:
    notes = []
    for path in paths:
        notes.append(Path(path).read_text(encoding="utf-8"))
    return notes


def _own_checkpoints(directory: Path) -> list[str]:
    folder = directory / "checkpoints"
    return [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.note"))] if folder.is_dir() else []


def _target(home_path, file, node_key) -> tuple[Path, bytes, list[str]]:
    """(ledger file, signing public key, checkpoints known for it)."""
    if file is not None:
        if node_key is None:
            raise ClientError("--file needs --node-key (the node key of the ledger's node)")
        return Path(file), NodeKey.decode(node_key).sign_public, []
    home = existing_home(home_path)
    key = NodeKey.decode(node_key).sign_public if node_key else load_identity(home).node_key.sign_public
    return home.ledger_dir / LEDGER_FILE, key, _own_checkpoints(home.ledger_dir)


def _records(home_path, file) -> list:
    path = Path(file) if file else existing_home(home_path).ledger_dir / LEDGER_FILE
    return audit.read_records(path)


@click.group()
def ledger():
    """Inspect, verify, export and prove the transfer ledger."""


file_option = click.option("--file", type=click.Path(dir_okay=False), help="A ledger file (e.g. an auditor's copy).")
key_option = click.option("--node-key", help="The node key (dnk1...) of the node that wrote the ledger.")


@ledger.command()
@home_option
@file_option
@click.option("--json", "as_json", is_flag=True)
@click.option("--since", help="Only records at or after this UTC time.")
@click.option("--until", help="Only records before this UTC time.")
@click.option("--peer", help="Only records naming this peer (name or node key).")
@click.option("--transfer", "transfer_id", help="Only records of this transfer.")
def show(home_path, file, as_json, since, until, peer, transfer_id):
    """Show ledger records."""
    records = audit.filter_records(
        _records(home_path, file), since=_iso(since), until=_iso(until), peer=peer, transfer_id=transfer_id
    )
    if as_json:
        emit([audit.record_json(r) for r in records])
        return
    for r in records:
        f = r.fields
        what = " ".join(
            f"{k}={escape(str(f[k]))}" for k in ("transfer_id", "peer", "name", "direction", "error", "by") if k in f
        )
        click.echo(f"{r.seq:>6}  {r.time}  {r.event:<20} {what}")
        for item in f.get("files", []) if isinstance(f.get("files"), list) else []:
            click.echo(f"        {item.get('sha256', '-') or '-':64}  {item.get('size', ''):>12}  {escape(str(item.get('path')))}")


@ledger.command()
@home_option
@file_option
@key_option
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False), help="A checkpoint note (e.g. one a peer holds) the ledger must be consistent with.")
@click.option("--json", "as_json", is_flag=True)
def verify(home_path, file, node_key, checkpoints, as_json):
    """Verify signatures, chain and checkpoints; exit 1 naming the first bad record."""
    path, key, held = _target(home_path, file, node_key)
    result = audit.verify_ledger(path, key, checkpoints=held + _notes(checkpoints))
    if as_json:
        emit(
            {
                "ok": result.ok,
                "records": result.records,
                "root": result.root.hex(),
                "bad_record": result.seq,
                "offset": result.offset,
                "reason": result.reason,
                "detail": result.detail,
            }
        )
    elif result.ok:
        click.echo(f"ledger intact: {result.records} records, root {result.root.hex()}")
    else:
        where = f"record {result.seq} (offset {result.offset}): " if result.seq is not None else ""
        click.echo(f"ledger NOT intact: {where}{result.reason}: {result.detail}", err=True)
    sys.exit(0 if result.ok else 1)


@ledger.command()
@home_option
@file_option
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
def export(home_path, file, fmt):
    """Export every record as JSON lines or CSV (binary fields as hex)."""
    records = _records(home_path, file)
    click.echo(audit.export_jsonl(records) if fmt == "jsonl" else audit.export_csv(records), nl=False)


@ledger.command()
@home_option
@file_option
@key_option
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Prove against this checkpoint (default: the latest).")
@click.argument("transfer_id", metavar="ID")
def prove(home_path, file, node_key, checkpoint, transfer_id):
    """Inclusion proofs of a transfer's records against a signed checkpoint, verified."""
    path, key, held = _target(home_path, file, node_key)
    if checkpoint:
        note = Path(checkpoint).read_text(encoding="utf-8")
    elif held:
        note = max(held, key=lambda n: unverified_checkpoint(n).size)
    else:
        raise ClientError("no checkpoint to prove against; pass --checkpoint NOTE")
    size = unverified_checkpoint(note).size
    records = [r for r in audit.read_records(path) if r.fields.get("transfer_id") == transfer_id]
    if not records:
        raise ClientError(f"no records of transfer {escape(transfer_id)}")
    proofs = []
    for record in records:
        if record.seq >= size:
            raise ClientError(f"record {record.seq} is newer than the checkpoint (size {size}); take a newer checkpoint")
        proof = audit.inclusion_proof_for(path, record.seq, note)
        audit.verify_inclusion_json(proof, key)
        proofs.append({"event": record.event, **proof})
    emit({"transfer_id": transfer_id, "verified": True, "proofs": proofs})


@ledger.command("verify-proof")
@key_option
@click.argument("proof_file", type=click.Path(dir_okay=False))
def verify_proof(node_key, proof_file):
    """Verify a proof file written by `prove` or `consistency`, offline."""
    if node_key is None:
        raise ClientError("--node-key is required")
    key = NodeKey.decode(node_key).sign_public
    for proof in _proofs_in(Path(proof_file)):
        if "record" in proof:
            audit.verify_inclusion_json(proof, key)
        else:
            audit.verify_consistency_json(proof, key)
    click.echo("proof verified")


# What `prove` and `consistency` print around the proofs themselves.
PROOF_ANNOTATIONS = ("event", "verified", "transfer_id")


def _proofs_in(path: Path) -> list[dict]:
    """The proofs in a file written by `prove` (several) or `consistency`
    (one), or a single proof as SPEC.md section 6 spells it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        raise ClientError(f"{path} is not JSON") from None
    items = data.get("proofs", [data]) if isinstance(data, dict) else None
    if not (isinstance(items, list) and items and all(isinstance(item, dict) for item in items)):
        raise ClientError(f"{path} is not a proof written by 'dorothy ledger prove' or 'consistency'")
    return [{k: v for k, v in item.items() if k not in PROOF_ANNOTATIONS} for item in items]


@ledger.command()
@home_option
@file_option
@key_option
@click.argument("old_note", type=click.Path(dir_okay=False))
@click.argument("new_note", type=click.Path(dir_okay=False))
def consistency(home_path, file, node_key, old_note, new_note):
    """Prove (and verify) that a newer checkpoint extends an older one."""
    path, key, _ = _target(home_path, file, node_key)
    proof = audit.consistency_proof_for(path, *_notes([old_note, new_note]))
    audit.verify_consistency_json(proof, key)
    emit({"verified": True, **proof})


@ledger.command()
@click.argument("ledger_a", type=click.Path(dir_okay=False))
@click.argument("ledger_b", type=click.Path(dir_okay=False))
def reconcile(ledger_a, ledger_b):
    """Check that every transfer A sent to B is recorded by B as received with the same hashes and receipt, and vice versa."""
    differences = audit.reconcile(audit.read_records(ledger_a), audit.read_records(ledger_b))
    for line in differences:
        click.echo(escape(line))
    if differences:
        sys.exit(1)
    click.echo("ledgers reconcile: every transfer between them matches on both sides")
