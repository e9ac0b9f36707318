"""``benchmarks/compare_qemu.py``: the side-by-side run of isc and QEMU's backup, end to end.

A tiny run (a 16 MiB volume, one of each copy, short write windows) drives
the real ``qemu-storage-daemon``, ``isc serve`` and the libnbd host writer,
and must check every copy byte for byte and pass. A run whose point-in-time
image is tampered with must notice and exit 1. Times are never asserted on:
the script reports them, the benchmark README reads them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare_qemu  # noqa: E402
import datapath  # noqa: E402
import host_writer  # noqa: E402

TINY = [
    "--size", "16M", "--rounds", "1", "--repeat", "1", "--load-repeat", "1",
    "--qd", "1", "--idle-seconds", "0.2", "--perf", "8:0",
]  # fmt: skip
RUN_LIMIT = 300  # seconds a tiny run may take before the test fails


def needed_tools() -> None:
    """Skip, naming the Debian packages, unless every peer the script drives is here."""
    for tool, package in (
        ("qemu-storage-daemon", "qemu-system-common"),
        ("qemu-img", "qemu-utils"),
        ("nbdcopy", "libnbd-bin"),
    ):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed; it comes with {package} (.ci/run installs it)")
    try:
        host_writer.writer_python()
    except host_writer.LibnbdMissing as exc:
        pytest.skip(str(exc))


def tiny_run(script: str, tiny: list[str], tmp_path: Path) -> tuple[dict, str]:
    """Run ``benchmarks/script`` with ``tiny``'s options in ``tmp_path``; its JSON results
    and its output, once it exited 0 (the test fails with its output otherwise)."""
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, BENCHMARKS / script, *tiny, "--dir", tmp_path, "--json", out],
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text()), done.stdout


def test_a_tiny_run_checks_every_copy_and_reports_both_systems(tmp_path: Path):
    needed_tools()
    results, output = tiny_run("compare_qemu.py", TINY, tmp_path)
    checks = results["checks"]
    # Per system: idle full copies, incrementals, copies under writes; plus cp, nbdcopy.
    assert len(checks) >= 12 and all(check["ok"] for check in checks)
    assert {"QEMU full copy, defaults", "isc marked full copy", "cp"} <= {
        check["copy"] for check in checks
    }
    for system, copies in (("qemu", ["full"]), ("isc", ["marked", "unmarked"])):
        figures = results[system]
        assert len(figures["incremental"]) == 1
        windows = figures["load"]["1"]
        assert windows["idle"]["writes"] > 0
        for name in copies:
            assert windows[name]["copy_seconds"] > 0
            assert windows[name]["rate"] == pytest.approx(
                windows[name]["writes"] / windows[name]["seconds"]
            )
    targets = [t["target"] for t in results["targets"]]
    assert targets[:2] == [
        "isc incremental no slower than QEMU's",
        "isc marked full copy at least as fast as QEMU tuned",
    ]
    # The worst stall is a target of its own; the idle row gives each system's own.
    assert {
        "isc worst host write stall during a marked full copy <= 3 ms, qd 1",
        "isc worst host write stall during an unmarked full copy <= 3 ms, qd 1",
    } <= set(targets)
    idle_row = next(line for line in output.splitlines() if "qd 1, idle" in line)
    assert idle_row.count("stall") == 2
    assert "| incremental copy after" in output
    assert "0 mismatched" in output
    assert not list(tmp_path.glob("isc-compare-*"))  # the volume's files are gone


def test_a_copy_that_differs_from_its_image_fails_the_run(tmp_path, monkeypatch, capsys):
    needed_tools()
    snapshot = compare_qemu.Run.snapshot

    def tampered(run: compare_qemu.Run) -> Path:
        image = snapshot(run)
        with open(image, "r+b") as f:
            f.seek(12345)
            byte = f.read(1)
            f.seek(12345)
            f.write(bytes([byte[0] ^ 0xFF]))
        return image

    monkeypatch.setattr(compare_qemu.Run, "snapshot", tampered)
    assert compare_qemu.main([*TINY, "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH: QEMU full copy under writes, qd 1" in out
    assert "at byte 12345" in out
    assert "isc marked full copy under writes, qd 1" in out


def test_first_difference_finds_the_first_differing_byte(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    data = bytes(range(256)) * (datapath.PIECE // 128)  # two pieces of the check
    a.write_bytes(data)
    b.write_bytes(data)
    assert datapath.first_difference(b, a, len(data)) is None
    changed = bytearray(data)
    changed[datapath.PIECE + 7] ^= 1
    b.write_bytes(changed)
    assert datapath.first_difference(b, a, len(data)) == datapath.PIECE + 7
    b.write_bytes(data[:-3])  # shorter: differs where it ends
    assert datapath.first_difference(b, a, len(data)) == len(data) - 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "100K", "--granularity", "64K"], "multiple of --granularity"),
        (["--change", "0"], "--change must be in"),
        (["--rounds", "0"], "must be at least 1"),
        (["--perf", "8"], "WORKERS:CHUNK"),
        (["--perf", "8:1M:fast"], "WORKERS:CHUNK"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        compare_qemu.parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_x_perf_settings():
    assert compare_qemu.x_perf("16:0:copy-range") == {
        "max-workers": 16,
        "max-chunk": 0,
        "use-copy-range": True,
    }
    assert compare_qemu.x_perf("8:1M") == {
        "max-workers": 8,
        "max-chunk": 1 << 20,
        "use-copy-range": False,
    }
