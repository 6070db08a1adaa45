"""`dorothy send`, `status` and `cancel`: thin clients of the daemon."""

import os
import sys
import time

import click

from ..protocol.paths import escape
from .client import call
from .common import emit, existing_home, home_option

# The states a transfer never leaves (SPEC 7): the daemon's store.FINAL_STATES,
# spelled out here so that the client need not import the daemon.
FINAL_STATES = ("done", "failed", "cancelled")
# --wait asks the daemon to answer when the transfer ends (a `wait` request,
# at most WAIT_SECONDS at a time), or after REDRAW_SECONDS when a progress bar
# is to be redrawn.
WAIT_SECONDS = 50
REDRAW_SECONDS = 0.2


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def _line(t: dict) -> str:
    arrow = "->" if t["direction"] == "out" else "<-"
    pct = 100.0 * t["bytes_done"] / t["bytes_total"] if t["bytes_total"] else 100.0
    text = f"{t['id']}  {arrow} {escape(t['peer'])}  {t['state']:<9} {pct:5.1f}%  {_human(t['bytes_total'])}  {t['file_count']} files"
    if t["error"]:
        text += f"  ({escape(t['error'])})"
    return text


def _details(t: dict) -> str:
    lines = [_line(t), f"  manifest sha256 {t['manifest_hash']}"]
    for f in t["files"]:
        lines.append(f"  {f['sha256'] or '(pending)':64}  {f['size']:>14}  {escape(f['path'])}")
    return "\n".join(lines)


@click.command()
@home_option
@click.argument("peer_name", metavar="PEER")
@click.argument("paths", nargs=-1, required=True, metavar="PATH [PATH ...]")
@click.option("--json", "as_json", is_flag=True, help="Print {\"id\": ...}.")
@click.option("--wait", is_flag=True, help="Block until delivered (exit 0) or failed/cancelled (exit 1).")
def send(home_path, peer_name, paths, as_json, wait):
    """Queue one transfer of files and directories to PEER."""
    home = existing_home(home_path)
    absolute = [os.path.abspath(p) for p in paths]
    transfer_id = call(home.root, {"op": "send", "peer": peer_name, "paths": absolute})["id"]
    if as_json:
        emit({"id": transfer_id})
    else:
        click.echo(transfer_id)
    if wait:
        final = _wait(home.root, transfer_id)
        if final["state"] != "done":
            click.echo(f"dorothy: transfer {transfer_id} {final['state']}: {escape(final['error'] or '')}", err=True)
            sys.exit(1)


def _wait(root, transfer_id: str) -> dict:
    bar = sys.stderr.isatty()
    started, first_done, seconds = time.monotonic(), None, 0
    while True:
        t = call(root, {"op": "wait", "id": transfer_id, "seconds": seconds})["transfer"]
        if bar:
            if first_done is None:
                first_done = t["bytes_done"]
            _draw(t, time.monotonic() - started, t["bytes_done"] - first_done)
        if t["state"] in FINAL_STATES:
            if bar:
                click.echo("", err=True)
            return t
        seconds = REDRAW_SECONDS if bar else WAIT_SECONDS


def _draw(t: dict, elapsed: float, moved: int) -> None:
    total, done = t["bytes_total"], t["bytes_done"]
    fraction = done / total if total else 1.0
    rate = moved / elapsed if elapsed > 0 else 0.0
    eta = f"{(total - done) / rate:5.0f}s" if rate > 0 else "    ?"
    width = 30
    filled = int(width * fraction)
    bar = "#" * filled + "-" * (width - filled)
    sys.stderr.write(f"\r[{bar}] {fraction * 100:5.1f}%  {_human(rate)}/s  ETA {eta}  {t['state']:<9}")
    sys.stderr.flush()


@click.command()
@home_option
@click.argument("transfer_id", required=False, metavar="[ID]")
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Refresh until interrupted.")
def status(home_path, transfer_id, as_json, watch):
    """List transfers in both directions, or show one."""
    home = existing_home(home_path)
    while True:
        if transfer_id:
            t = call(home.root, {"op": "status", "id": transfer_id})["transfer"]
            output = t if as_json else _details(t)
        else:
            transfers = call(home.root, {"op": "status"})["transfers"]
            output = transfers if as_json else "\n".join(_line(t) for t in transfers) or "no transfers"
        if as_json:
            emit(output)
        else:
            click.echo(output)
        if not watch:
            return
        time.sleep(1.0)
        if not as_json:
            click.echo("")


@click.command()
@home_option
@click.argument("transfer_id", metavar="ID")
def cancel(home_path, transfer_id):
    """Cancel a transfer (either direction); its partial files are removed."""
    home = existing_home(home_path)
    call(home.root, {"op": "cancel", "id": transfer_id})
    click.echo(f"cancelled {transfer_id}")
