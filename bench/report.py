"""Plain-text tables of the results (the JSON has every run)."""

MiB = 1 << 20


def _size(n: int) -> str:
    return f"{n / 2**30:.0f} GiB" if n >= 2**30 and n % 2**30 == 0 else f"{n / MiB:.0f} MiB"


def _num(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def throughput(summary: list[dict]) -> str:
    header = ["scenario", "tool", "rate", "(min-max MiB/s)", "wall s", "RSS send/recv MiB", "CPU send/recv s",
              "machine CPU s (cores)", "sync after s", "rate incl. sync", "ok"]
    rows = []
    for s in summary:
        what = f"{s['scenario']} {_size(s['bytes'])}" + (f", {s['files']} files" if s["files"] > 1 else "")
        rate = f"{s['MiB_s']:.1f} MiB/s" + (f" = {s['files_s']:.0f} files/s" if s["files"] > 1 else "")
        low, high = s["MiB_s_min_max"]
        rows.append([
            what, s["tool"], rate, f"{low:.0f}-{high:.0f}" if s["runs"] > 1 else "", _num(s["wall_s"], "{:.2f}"),
            f"{_num(s['rss_sender_MiB'], '{:.0f}')} / {_num(s['rss_receiver_MiB'], '{:.0f}')}",
            f"{_num(s['cpu_sender_s'])} / {_num(s['cpu_receiver_s'])}",
            f"{_num(s['machine_cpu_s'])} ({_num(s['busy_cores'], '{:.2f}')})", _num(s["sync_after_s"], "{:.2f}"),
            f"{s['durable_files_s']:.0f} files/s" if s["files"] > 1 else f"{s['durable_MiB_s']:.1f} MiB/s",
            "yes" if s["all_ok"] else "NO",
        ])
    return _table(header, rows)


def matrix(summary: list[dict]) -> str:
    """tool x scenario, median MiB/s (files/s for folders)."""
    scenarios = list(dict.fromkeys(s["scenario"] for s in summary))
    tools = list(dict.fromkeys(s["tool"] for s in summary))
    cell = {(s["tool"], s["scenario"]): s for s in summary}
    rows = []
    for tool in tools:
        row = [tool]
        for scenario in scenarios:
            s = cell.get((tool, scenario))
            if s is None:
                row.append("-")
            elif s["files"] > 1:
                row.append(f"{s['files_s']:.0f} files/s")
            else:
                row.append(f"{s['MiB_s']:.0f} MiB/s")
        rows.append(row)
    return _table(["tool"] + scenarios, rows)


def resume(results: dict) -> str:
    header = ["resume of a random file, fault at ~50%", "total s", "re-sent MiB", "details"]
    rows = []
    cut = results.get("dorothy_cut")
    if cut:
        rows.append([
            "dorothy: connection cut (FaultProxy)", _num(cut["wall_s"], "{:.2f}"), _num(cut["resent_bytes"] / MiB, "{:.2f}"),
            f"reconnected {cut['reconnect_after_s']}s after start; sender read {cut['sender_read_bytes'] / MiB:.0f} MiB "
            f"for {cut['size'] / MiB:.0f} MiB; receiver read {cut['receiver_read_bytes'] / MiB:.1f} MiB"
            + ("" if cut["ok"] else "  FAILED"),
        ])
    restart = results.get("dorothy_restart")
    if restart:
        durable = restart["durable_at_kill"]
        cost = "nothing left to send after the restart"
        if restart["restart_cost_s"] is not None:
            checked = restart.get("reverified_bytes")
            read = restart["receiver_read_bytes_before_flowing"]
            disk = restart.get("receiver_disk_read_bytes_before_flowing")
            cost = f"restart cost {restart['restart_cost_s']}s"
            cost += f" re-verifying {checked / MiB:.0f} MiB" if checked else ""
            if read is not None:
                cost += f" (read since start {read / MiB:.0f} MiB"
                cost += f", {disk / MiB:.0f} MiB from disk)" if disk is not None else ")"
        rows.append([
            "dorothy: receiver SIGKILL + restart", _num(restart["wall_s"], "{:.2f}"),
            _num(restart["resent_bytes"] / MiB, "{:.2f}"),
            f"{cost}; durable at kill {_num(durable and durable / MiB, '{:.0f}')} MiB; daemon up in "
            f"{restart['kill_to_daemon_ready_s']}s; kill to done {restart['kill_to_done_s']}s; "
            f"sender re-read {restart['sender_read_bytes_after_kill'] / MiB:.0f} MiB" + ("" if restart["ok"] else "  FAILED"),
        ])
    rs = results.get("rsync")
    if rs:
        rows.append([
            "rsync --partial, SIGINT, then --append-verify", _num(rs["wall_s"], "{:.2f}"), _num(rs["resent_bytes"] / MiB, "{:.2f}"),
            f"kept {rs['partial_kept_bytes'] / MiB:.0f} MiB; second run {rs['second_wall_s']:.2f}s" + ("" if rs["ok"] else "  FAILED"),
        ])
    return _table(header, rows)


def ratelimited(results: dict) -> str:
    header = ["tool", "payload MiB/s", "wall s", "bytes up the link", "ok"]
    rows = []
    for tool, r in results.get("runs", {}).items():
        wire = r.get("wire_up_bytes")
        rows.append([tool, _num(r["MiB_s"]), _num(r["wall_s"], "{:.2f}"),
                     f"{wire / MiB:.1f} MiB" if wire else "-", "yes" if r["ok"] else "NO"])
    return _table(header, rows)


def micro(results: dict) -> str:
    rows = [[name, f"{value:8.1f}"] for name, value in results["MiB_s"].items()]
    return _table(["single core, 1 MiB per call", "MiB/s"], rows)
