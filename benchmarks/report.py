"""Print a pytest-benchmark JSON file as Markdown tables, one per group.

Usage: ``python benchmarks/report.py RESULTS.json``

Each row gives the entry's median, its ratio to isc's median (``÷ isc``) in the same group
(the row whose ``impl`` is exactly ``isc``; above 1 means slower than isc),
the median per item (write, run or call) when the benchmark says how many items
one call handles, and the bitmap bandwidth (bit-packed bitmap bytes / median)
when it names a bitmap size. Groups keep the order in which they ran; rows are
sorted by median.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _time(seconds: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _per_item(row: dict) -> str:
    items = row["extra_info"].get("items") or 0
    if not items:
        return ""
    return f"{row['stats']['median'] / items * 1e9:.3g} ns/{row['extra_info']['unit']}"


def _bandwidth(row: dict) -> str:
    nbytes = row["extra_info"].get("bitmap_bytes")
    return f"{nbytes / row['stats']['median'] / 1e9:.3g}" if nbytes else ""


def _table(rows: list[dict]) -> list[str]:
    base = next((r for r in rows if r["extra_info"].get("impl") == "isc"), None)
    columns = ["impl", "median", "÷ isc"]
    per_item = any(r["extra_info"].get("items") for r in rows)
    bandwidth = any(r["extra_info"].get("bitmap_bytes") for r in rows)
    notes = any(r["extra_info"].get("note") for r in rows)
    columns += ["per item"] * per_item + ["bitmap GB/s"] * bandwidth + ["note"] * notes
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in sorted(rows, key=lambda r: r["stats"]["median"]):
        impl = row["extra_info"].get("impl", row["name"])
        median = row["stats"]["median"]
        ratio = f"{median / base['stats']['median']:.3g}" if base else ""
        cells = [f"**{impl}**" if row is base else impl, _time(median), ratio]
        cells += [_per_item(row)] * per_item + [_bandwidth(row)] * bandwidth
        cells += [row["extra_info"].get("note", "")] * notes
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return lines


def report(data: dict) -> str:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    out = [
        f"Run {data.get('datetime', '?')}, {cpu.get('brand_raw', '?')}, "
        f"{cpu.get('count', '?')} CPUs, Python {machine.get('python_version', '?')}. "
        "Medians; ÷ isc = median / isc's median (above 1: slower than isc).",
    ]
    groups: dict[str, list[dict]] = {}
    for row in data["benchmarks"]:
        groups.setdefault(row["group"] or "", []).append(row)
    for group, rows in groups.items():
        out += ["", f"#### {group}", "", *_table(rows)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a --benchmark-json output file")
    args = parser.parse_args()
    print(report(json.loads(args.results.read_text())))


if __name__ == "__main__":
    main()
