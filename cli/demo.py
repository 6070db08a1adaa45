"""`dorothy demo`: two real nodes on loopback, one sends a generated folder
to the other, and everything an auditor would check is shown and checked."""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import click

from ..keys.nodekey import NodeKey
from ..protocol.paths import escape
from ..protocol.receipt import open_receipt
from .localnodes import dorothy, pair
from .transfers import FINAL_STATES


def _make_folder(root: Path) -> Path:
    folder = root / "case-2026-0042"
    (folder / "photos").mkdir(parents=True)
    (folder / "logs").mkdir()
    (folder / "disk.img").write_bytes(os.urandom(3 * (1 << 20) + 12345))  # several chunks
    (folder / "logs" / "server.log").write_text(
        "".join(f"2026-11-29T06:{i // 60 % 60:02d}:{i % 60:02d}Z INFO request id={i} status=200\n" for i in range(20000))
    )
    (folder / "photos" / "IMG_0001 (copy);.jpg").write_bytes(os.urandom(40000))
    (folder / "photos" / "empty.txt").write_bytes(b"")
    (folder / "notes-ünïcode.txt").write_text("chain of custody: sealed bag 17\n")
    return folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@click.command()
@click.option("--keep", is_flag=True, help="Keep the temporary directory for inspection.")
def demo(keep):
    """Two nodes on loopback: exchange keys, send a folder, verify everything."""
    root = Path(tempfile.mkdtemp(prefix="dorothy-demo-"))
    alpha = bravo = None
    try:
        click.echo(f"== two nodes in {root}")
        alpha, bravo = pair(root, "alpha", "bravo")
        for node in (alpha, bravo):
            info = json.loads(node.run("id", "--json").stdout)
            click.echo(f"   {info['name']:<6} {node.address:<16} fingerprint {info['fingerprint']}")
        alpha.start()
        bravo.start()
        folder = _make_folder(root / "source")
        click.echo(f"== alpha sends {folder.name}/ to bravo")
        result = alpha.run("send", "bravo", folder, "--json", "--wait")
        transfer_id = json.loads(result.stdout)["id"]
        sent = alpha.status(transfer_id)
        received = bravo.wait_state(transfer_id, FINAL_STATES)
        click.echo(f"   alpha: {sent['state']}  bravo: {received['state']}  ({sent['bytes_total']} bytes)")
        click.echo("== receipt (signed by bravo, verified by alpha; checked again here)")
        bravo_key = NodeKey.decode(bravo.node_key())
        receipt = open_receipt(bytes.fromhex(sent["receipt"]), bravo_key.sign_public)
        click.echo(f"   transfer        {receipt.transfer_id.hex()}")
        click.echo(f"   manifest sha256 {receipt.manifest_hash.hex()}")
        click.echo(f"   signed by       bravo, fingerprint {bravo_key.fingerprint()}, at {receipt.time}")
        click.echo(f"   files           {len(receipt.file_sha256)} SHA-256 values")
        inbox = bravo.home / "inbox" / "alpha" / transfer_id
        failures = 0
        click.echo("== per-file SHA-256: sender / receipt / recomputed from bravo's inbox")
        by_path = {f["path"]: f for f in received["files"]}
        for f, in_receipt in zip(sent["files"], receipt.file_sha256):
            local = _sha256(inbox / f["path"])
            ok = f["sha256"] == by_path[f["path"]]["sha256"] == in_receipt.hex() == local
            failures += not ok
            click.echo(f"   {'ok  ' if ok else 'FAIL'} {local[:16]}… {f['size']:>9}  {escape(f['path'])}")
        click.echo("== ledgers")
        for node in (alpha, bravo):
            verify = node.run("ledger", "verify", check=False)
            failures += verify.returncode != 0
            click.echo(f"   {node.name}: {verify.stdout.strip() or verify.stderr.strip()}")
        ledgers = [node.home / "ledger" / "ledger.bin" for node in (alpha, bravo)]
        reconcile = dorothy("ledger", "reconcile", *ledgers, check=False)
        failures += reconcile.returncode != 0
        click.echo(f"   reconcile: {reconcile.stdout.strip() or reconcile.stderr.strip()}")
        if failures:
            raise click.ClickException(f"demo found {failures} problem(s)")
        click.echo("== all checks passed")
    except (RuntimeError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        for node in (alpha, bravo):
            if node is not None:
                node.stop()
        if keep:
            click.echo(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
