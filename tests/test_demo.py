"""isc demo: the main job runs end to end and verifies every update."""

import subprocess
import sys

from isc import demo


def test_the_demo_verifies_every_update():
    lines: list[str] = []
    assert demo.run(seed=3, out=lines.append) == 0
    rows = [line for line in lines if line.startswith(("unmarked full", "incremental"))]
    assert len(rows) == 1 + demo.UPDATES
    assert all(row.endswith("consistent") for row in rows[1:])
    assert lines[-1] == "all destinations verified"


def test_isc_demo_exits_zero_and_prints_the_table():
    done = subprocess.run(
        [sys.executable, "-m", "isc.cli", "demo", "--seed", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "all destinations verified" in done.stdout
    assert done.stdout.count("consistent") >= demo.UPDATES
