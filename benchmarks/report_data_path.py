"""Print the data-path benchmark results as the data-path tables of ``benchmarks/README.md``.

Usage: ``python benchmarks/report_data_path.py RESULTS.json...``: the
``--benchmark-json`` output of ``test_bench_write_path.py`` and/or
``test_bench_copy.py``, from one run or several (their rows are merged).
Medians throughout. The issue's targets are checked against the figures and
printed last: met, not met, or inconclusive when other processes kept more
than ``BUSY_LIMIT`` CPUs busy while the rows ran. ``busy elsewhere`` is that
load (the machine has two CPUs): figures from rows where it is high are slowed
by something else.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from report import _time

WRITE_TARGET = 0.25  # most a session may add to a 4 KiB FileLUN.write, unmarked or no COFW
FULL_TARGET = 0.90  # least share of each peer's speed an unmarked full copy reaches
INCREMENTAL_TARGET = 20.0  # least speed-up of the incremental copy over each peer
BUSY = "busy elsewhere"
BUSY_LIMIT = 0.25  # CPUs used by other processes above which a verdict is inconclusive
SESSION_CASES = ("unmarked", "marked, no COFW", "marked, COFW")


def _median(row: dict) -> float:
    return row["stats"]["median"]


def _per_write(row: dict) -> float:
    return _median(row) / row["extra_info"]["items"]


def _busy(row: dict) -> str:
    busy = row["extra_info"].get("busy_elsewhere")
    return "" if busy is None else f"{busy:.2f}"


def _busiest(*rows: dict) -> float | None:
    busy = [r["extra_info"]["busy_elsewhere"] for r in rows if "busy_elsewhere" in r["extra_info"]]
    return max(busy, default=None)


def _busy_share(rows: list[dict]) -> float | None:
    """``busy elsewhere`` over several rows: other CPU seconds over their summed wall time."""
    timed = [r["extra_info"] for r in rows if "test_seconds" in r["extra_info"]]
    wall = sum(e["test_seconds"] for e in timed)
    if not wall:
        return None
    return sum(e["busy_elsewhere"] * e["test_seconds"] for e in timed) / wall


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _find(rows: list[dict], test: Callable[[dict], bool]) -> dict | None:
    return next((r for r in rows if test(r["extra_info"])), None)


class Report:
    """The Markdown report of one results file; ``render()`` returns it."""

    def __init__(self, runs: list[dict]) -> None:
        self.groups: dict[str, list[dict]] = {}
        self.lines = []
        for data in runs:
            for row in data["benchmarks"]:
                self.groups.setdefault(row["group"] or "", []).append(row)
            machine = data.get("machine_info", {})
            cpu = machine.get("cpu", {})
            self.lines.append(
                f"Run {data.get('datetime', '?')}, {cpu.get('brand_raw', '?')}, "
                f"{cpu.get('count', '?')} CPUs, Python {machine.get('python_version', '?')}: "
                f"{len(data['benchmarks'])} rows. Medians."
            )
        self.targets: list[str] = []

    def _verdict(self, ok: bool, text: str, busy: float | None) -> None:
        if busy is not None and busy > BUSY_LIMIT:
            verdict = f"inconclusive (busy elsewhere {busy:.2f} CPUs)"
        else:
            verdict = "met" if ok else "not met"
        self.targets.append(f"- **{verdict}**: {text}")

    # -- host writes ---------------------------------------------------------------
    def write_path(self, group: str, rows: list[dict]) -> None:
        loop = _find(rows, lambda e: e["case"] == "floor")
        raw = _find(rows, lambda e: e["case"] == "raw")
        lun = _find(rows, lambda e: e["case"] == "no session")
        if loop is None or raw is None or lun is None:
            return
        floor, base, raw_time = _per_write(loop), _per_write(lun), _per_write(raw)

        def overhead(row: dict) -> float:
            # What the session adds over the LUN write timed beside it (else the
            # LUN write row), less the loop both pay.
            paired = row["extra_info"].get("paired_write", base)
            return (_per_write(row) - paired) / (paired - floor)

        info = lun["extra_info"]
        raw_name, lun_name = raw["extra_info"]["impl"], info["impl"]
        busy = _busy_share(rows)
        busy_text = "?" if busy is None else f"{busy:.2f}"
        self.lines += [
            "",
            f"### {group} ({info['where']})",
            "",
            f"Per write: loop only {_time(floor)}, {raw_name} {_time(raw_time)}, "
            f"{lun_name} {_time(base)} ({(base - raw_time) / (raw_time - floor):+.0%} over "
            f"{raw_name}). Overhead = (Session.write - {lun_name}) / ({lun_name} - loop "
            f"only), {lun_name} timed in rounds interleaved with the row's own; COFW as a "
            f"multiple of {lun_name}. Busy elsewhere: {busy_text} CPUs over these rows.",
            "",
        ]
        sessions = [r for r in rows if r["extra_info"]["impl"] == "Session.write"]
        table = []
        worst = 0.0
        for g in sorted({r["extra_info"]["granularity"] for r in sessions}):
            cells = [f"{g // 1024} KiB"]
            for case in SESSION_CASES:
                row = _find(sessions, lambda e, k=(g, case): (e["granularity"], e["case"]) == k)
                if row is None:
                    cells += ["", ""]
                elif case == "marked, COFW":
                    paired = row["extra_info"].get("paired_write", base)
                    cells += [_time(_per_write(row)), f"{_per_write(row) / paired:.3g}x"]
                else:
                    cells += [_time(_per_write(row)), f"{overhead(row):+.0%}"]
                    worst = max(worst, overhead(row))
            table.append(cells)
        columns = ["granularity"]
        for case in SESSION_CASES:
            columns += [case, "overhead"]
        self.lines += _table(columns, table)
        if info["lun"] == "FileLUN" and info["write_size"] == 4096:
            self._verdict(
                worst <= WRITE_TARGET,
                f"unmarked and marked-without-COFW writes add at most {worst:.0%} to a 4 KiB "
                f"FileLUN.write on {info['where']} (worst granularity; target ≤ "
                f"{WRITE_TARGET:.0%})",
                busy,
            )

    # -- copies --------------------------------------------------------------------
    def full_copy(self, group: str, rows: list[dict]) -> None:
        peers = {
            name: row
            for name in ("python preadv/pwrite", "cp --sparse=never")
            if (row := _find(rows, lambda e, n=name: e["impl"] == n)) is not None
        }
        table = []
        for row in sorted(rows, key=_median):
            info = row["extra_info"]
            io = f"{info['io_size'] >> 20} MiB" if "io_size" in info else ""
            speed = f"{info['bytes'] / _median(row) / 1e9:.2f}"
            cells = [info["impl"], io, _time(_median(row)), speed]
            cells += [f"{_median(peer) / _median(row):.0%}" for peer in peers.values()]
            table.append([*cells, _busy(row)])
            if info["impl"] != "isc":
                continue
            for name, peer in peers.items():
                share = _median(peer) / _median(row)
                self._verdict(
                    share >= FULL_TARGET,
                    f"{group}, io_size {info['io_size'] >> 20} MiB: isc runs at {share:.0%} "
                    f"of {name}'s speed (target ≥ {FULL_TARGET:.0%})",
                    _busiest(row, peer),
                )
        columns = ["impl", "io size", "median", "GB/s", *(f"% of {p}" for p in peers), BUSY]
        self.lines += ["", f"### {group} ({rows[0]['extra_info']['where']})", ""]
        self.lines += _table(columns, table)

    def incremental(self, group: str, rows: list[dict]) -> None:
        isc = _find(rows, lambda e: e["impl"] == "isc")
        if isc is None:
            return
        table = []
        for row in sorted(rows, key=_median):
            ratio = _median(row) / _median(isc)
            table.append([row["extra_info"]["impl"], _time(_median(row)), f"{ratio:.3g}"])
            table[-1].append(_busy(row))
            if row is not isc:
                self._verdict(
                    ratio >= INCREMENTAL_TARGET,
                    f"{group}: the incremental copy is {ratio:.0f}x faster than "
                    f"{row['extra_info']['impl']} (target ≥ {INCREMENTAL_TARGET:.0f}x)",
                    _busiest(row, isc),
                )
        changed = isc["extra_info"]["changed"]
        self.lines += [
            "",
            f"### {group} ({isc['extra_info']['where']})",
            "",
            f"{changed / 2**20:.1f} MiB changed per round; ÷ isc = median / isc's median.",
            "",
        ]
        self.lines += _table(["impl", "median", "÷ isc", BUSY], table)

    def host_writer(self, group: str, rows: list[dict]) -> None:
        idle = _find(rows, lambda e: e["impl"].startswith("idle"))
        if idle is None:
            return
        idle_rate = idle["extra_info"]["writes_per_second"]
        table = []
        for row in rows:
            info = row["extra_info"]
            copy = row is not idle
            lat = info["latency_ns"]
            table.append(
                [
                    info["impl"],
                    _time(_median(row)) if copy else "",
                    f"{statistics.median(info['cofw_chunks']):.0f}" if copy else "",
                    f"{info['save_area_high_water'] / 2**20:.0f} MiB" if copy else "",
                    f"{info['writes_per_second'] / 1000:.0f}k",
                    f"{info['writes_per_second'] / idle_rate:.0%}",
                    *(_time(lat[k] / 1e9) for k in ("median", "p99", "max")),
                    _busy(row),
                ]
            )
        columns = ["host writer during", "copy median", "COFW chunks per copy", "save area peak"]
        columns += ["host writes/s", "vs idle", "latency median", "p99", "max", BUSY]
        self.lines += ["", f"### {group} ({idle['extra_info']['where']})", ""]
        self.lines += _table(columns, table)

    def render(self) -> str:
        kinds = (
            ("host write", self.write_path),
            ("full copy", self.full_copy),
            ("incremental copy", self.incremental),
            ("copy 1 GiB with a host writer", self.host_writer),
        )
        for group, rows in self.groups.items():
            for prefix, show in kinds:
                if group.startswith(prefix):
                    show(group, rows)
        return "\n".join([*self.lines, "", "### Targets", "", *self.targets])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="--benchmark-json output files")
    args = parser.parse_args()
    print(Report([json.loads(path.read_text()) for path in args.results]).render())


if __name__ == "__main__":
    main()
