"""The control socket's `wait` request, and the CLI as a thin client of it.

`dorothy send --wait` must return when the receipt is recorded, not at the
next poll: these tests run on trio's MockClock, where virtual time moves
only when every task is blocked, so an answer that needed a timer to fire
shows up as time that passed."""

import subprocess
import sys

import pytest
import trio
import trio.testing

from types import SimpleNamespace

from dorothy.dorothyd import audit, outbox, receiving
from dorothy.dorothyd import node as node_module
from dorothy.dorothyd.clock import iso_now
from dorothy.dorothyd.control import MAX_WAIT_SECONDS, _dispatch
from dorothy.dorothyd.node import Running
from dorothy.dorothyd.queueing import RequestError, cancel_transfer, queue_transfer
from dorothy.dorothyd.store import Store
from dorothy.protocol.errors import RemoteProtocolError

from conftest import add_transfer, introduce

TRANSFER = "ab" * 16


def with_transfer(make_node, state="active"):
    node = make_node("alpha")
    add_transfer(
        node.store, id=TRANSFER, direction="out", peer="bravo", peer_node_key="dnk1", state=state,
        manifest=b"", manifest_hash=b"\x00" * 32, files=[("a.bin", b"/a.bin", 10, 0)], now=iso_now(),
    )
    return node


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_wait_answers_the_moment_the_transfer_ends(make_node, clock):
    node = with_transfer(make_node)
    replies = []
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        async def waiter():
            replies.append(await _dispatch(node, {"op": "wait", "id": TRANSFER, "seconds": MAX_WAIT_SECONDS}))

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        node.store.update(TRANSFER, iso_now(), bytes_done=5)  # progress alone does not end the wait
        await trio.testing.wait_all_tasks_blocked()
        assert replies == []
        node.store.update(TRANSFER, iso_now(), state="done", bytes_done=10)
    assert replies[0]["transfer"]["state"] == "done"
    assert replies[0]["transfer"]["files"] is None
    assert trio.current_time() == started  # no timer fired: answered on the update


async def test_the_list_of_transfers_counts_files_without_listing_them(make_node):
    # A node's history of files grows without bound (a phone extraction is
    # 50,000): the list carries counts; one transfer's status, its files.
    node = with_transfer(make_node)
    listed = (await _dispatch(node, {"op": "status"}))["transfers"]
    assert [(t["id"], t["file_count"], t["files"]) for t in listed] == [(TRANSFER, 1, None)]
    one = (await _dispatch(node, {"op": "status", "id": TRANSFER}))["transfer"]
    assert one["file_count"] == 1 and [f["path"] for f in one["files"]] == ["a.bin"]


async def test_the_receipt_travels_only_with_the_files(make_node, clock):
    # A receipt lists every file's SHA-256, so it grows with the files: the
    # list of all transfers and a wait would otherwise carry every receipt.
    node = with_transfer(make_node)
    node.store.update(TRANSFER, iso_now(), state="done", receipt=b"\x01signed receipt")
    assert (await _dispatch(node, {"op": "status", "id": TRANSFER}))["transfer"]["receipt"] == b"\x01signed receipt".hex()
    assert (await _dispatch(node, {"op": "status", "id": TRANSFER, "files": False}))["transfer"]["receipt"] is None
    assert (await _dispatch(node, {"op": "wait", "id": TRANSFER, "seconds": 1}))["transfer"]["receipt"] is None
    assert [t["receipt"] for t in (await _dispatch(node, {"op": "status"}))["transfers"]] == [None]


async def test_wait_gives_the_transfer_as_it_is_after_the_given_seconds(make_node, clock):
    node = with_transfer(make_node)
    started = trio.current_time()
    reply = await _dispatch(node, {"op": "wait", "id": TRANSFER, "seconds": 7})
    assert reply["transfer"]["state"] == "active"
    assert trio.current_time() - started == pytest.approx(7)


async def test_wait_on_a_finished_transfer_answers_at_once(make_node, clock):
    node = with_transfer(make_node, state="failed")
    started = trio.current_time()
    reply = await _dispatch(node, {"op": "wait", "id": TRANSFER, "seconds": 30})
    assert reply["transfer"]["state"] == "failed"
    assert trio.current_time() == started


@pytest.mark.parametrize("seconds", [-1, MAX_WAIT_SECONDS + 1, "5", True, None, float("nan")])
async def test_wait_refuses_a_bad_duration_by_name(make_node, seconds):
    node = with_transfer(make_node)
    with pytest.raises(RequestError, match="'seconds' must be a number from 0 to"):
        await _dispatch(node, {"op": "wait", "id": TRANSFER, "seconds": seconds})


async def test_wait_for_an_unknown_transfer_names_it(make_node):
    node = with_transfer(make_node)
    with pytest.raises(RequestError, match="no transfer with id 'cd"):
        await _dispatch(node, {"op": "wait", "id": "cd" * 16, "seconds": 1})


async def test_a_cancellation_stands_when_the_running_attempt_fails_meanwhile(make_node, tmp_path):
    alpha, bravo = make_node("alpha"), make_node("bravo")
    introduce(alpha, bravo)
    source = tmp_path / "a.bin"
    source.write_bytes(b"x" * 100)
    transfer_id = await queue_transfer(alpha, "bravo", [str(source)])
    alpha.running[transfer_id] = Running(trio.CancelScope())
    alpha.store.update(transfer_id, iso_now(), state="active")
    row = alpha.store.get(transfer_id)
    record = alpha.record

    async def attempt_fails_while_the_cancellation_is_recorded(event, fields):
        refused = OSError(111, "Connection refused")
        await outbox._classify(alpha, row, refused, refused)
        await record(event, fields)

    alpha.record = attempt_fails_while_the_cancellation_is_recorded
    await cancel_transfer(alpha, row)
    assert alpha.store.get(transfer_id)["state"] == "cancelled"


async def test_a_shutdown_while_a_send_is_queued_leaves_neither_record_nor_transfer(make_node, tmp_path, monkeypatch):
    """Queueing adds file rows in steps, the event loop free between them;
    a shutdown cancelling it there must not leave a transfer_queued record
    for a transfer that does not exist."""
    alpha, bravo = make_node("alpha"), make_node("bravo")
    introduce(alpha, bravo)
    for n in range(5):
        (tmp_path / "case").mkdir(exist_ok=True)
        (tmp_path / "case" / f"{n}.bin").write_bytes(b"x")
    monkeypatch.setattr(node_module, "FILE_ROWS_PER_STEP", 2)
    add_files = alpha.store.add_files
    with trio.CancelScope() as shutdown:
        def add_files_then_shut_down(*args):
            add_files(*args)
            shutdown.cancel()  # lands at the next checkpoint

        alpha.store.add_files = add_files_then_shut_down
        await queue_transfer(alpha, "bravo", [str(tmp_path / "case")])
    assert shutdown.cancelled_caught
    records = audit.read_records(alpha.home.ledger_dir / "ledger.bin")
    assert [r.event for r in records if r.event == "transfer_queued"] == []
    assert alpha.store.all_transfers() == []
    alpha.store.close()
    reopened = Store(alpha.home.state_db)
    try:
        assert reopened._db.execute("SELECT count(*) FROM files").fetchone()[0] == 0
    finally:
        reopened.close()


async def test_a_receiver_failing_a_transfer_refuses_a_cancel_meanwhile(make_node, monkeypatch):
    """A sender's unrecoverable protocol error fails the incoming transfer.
    While its partial copy is being deleted the transfer is ending: an
    operator's cancel then is refused (SPEC 4.11), and the ledger holds one
    ending for it, not two."""
    bravo = make_node("bravo")
    add_transfer(
        bravo.store, id=TRANSFER, direction="in", peer="alpha", peer_node_key="dnk1", state="waiting",
        manifest=b"", manifest_hash=b"\x00" * 32, files=[("a.bin", None, 10, 0)], now=iso_now(),
    )
    real_discard, refusals = receiving.discard_received, []

    def discard_while_the_operator_cancels(*args):
        try:
            trio.from_thread.run(cancel_transfer, bravo, bravo.store.get(TRANSFER))
        except RequestError as exc:
            refusals.append(str(exc))
        real_discard(*args)

    monkeypatch.setattr(receiving, "discard_received", discard_while_the_operator_cancels)

    class ClosedChannel:
        async def send(self, message):
            raise trio.ClosedResourceError

    incoming = receiving.Incoming(bravo, ClosedChannel(), SimpleNamespace(name="alpha"))
    incoming.id = TRANSFER
    await incoming._fail_permanently(RemoteProtocolError("chunk out of range", code="bad_chunk"))
    assert len(refusals) == 1 and "is ending right now" in refusals[0]
    assert bravo.store.get(TRANSFER)["state"] == "failed" and TRANSFER not in bravo.running
    records = audit.read_records(bravo.home.ledger_dir / "ledger.bin")
    endings = [r.event for r in records if r.fields.get("transfer_id") == TRANSFER]
    assert endings == ["transfer_failed"]


@pytest.mark.parametrize("direction", ["out", "in"])
async def test_a_transfer_that_is_ending_cannot_be_cancelled(make_node, direction):
    """Between a verified receipt (or the receiver's finalization) and the
    final state, a cancel could only race the ending: it is refused, and
    nothing is written."""
    node = make_node("alpha")
    add_transfer(
        node.store, id=TRANSFER, direction=direction, peer="bravo", peer_node_key="dnk1", state="active",
        manifest=b"", manifest_hash=b"\x00" * 32, files=[("a.bin", b"/a.bin", 10, 0)], now=iso_now(),
    )
    node.running[TRANSFER] = Running(trio.CancelScope(), ending=True)
    records = node.ledger.size
    with pytest.raises(RequestError, match="is ending right now"):
        await _dispatch(node, {"op": "cancel", "id": TRANSFER})
    assert node.store.get(TRANSFER)["state"] == "active"
    assert not node.running[TRANSFER].cancel_scope.cancel_called
    assert node.ledger.size == records  # no transfer_cancelled


def test_the_transfer_commands_load_only_what_they_use():
    """Every CLI command starts a Python process, and `send` and `status`
    only speak JSON over a Unix socket: trio's import alone was half of a
    start-up, and every command's libraries (libsodium, the ledger) two
    thirds of what remained (`python -X importtime`)."""
    script = (
        "import sys\n"
        "from dorothy.cli.main import main\n"
        "for command in ('send', 'status'):\n"
        "    try:\n"
        "        main([command, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('trio', 'nacl', 'zstandard', 'msgpack', 'dorothy.dorothyd.ledger', 'dorothy.keys.identity')\n"
        "print(sorted(set(heavy) & set(sys.modules)))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "Queue one transfer" in loaded.stdout  # the commands did run
    assert loaded.stdout.strip().splitlines()[-1] == "[]"
