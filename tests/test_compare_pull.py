"""``benchmarks/compare_pull.py``: isc's pull backup beside QEMU's pull mode, end to end.

A tiny run (a 16 MiB volume, two rounds, short write windows) drives the
real ``qemu-storage-daemon`` through its fleecing graph, ``isc serve`` and
the libnbd pulling client and host writer, and must check every pull byte
for byte and pass. A run whose image at the mark is tampered with must
notice on both systems and exit 1. Times are never asserted on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare_pull  # noqa: E402
from test_compare_qemu import needed_tools, tiny_run  # noqa: E402

TINY = ["--size", "16M", "--rounds", "2", "--load-seconds", "0.2"]


def test_a_tiny_run_checks_every_pull_of_both_systems(tmp_path: Path):
    needed_tools()
    results, output = tiny_run("compare_pull.py", TINY, tmp_path)
    checked = [check["copy"] for check in results["checks"]]
    assert all(check["ok"] for check in results["checks"])
    for system in (compare_pull.QEMU, compare_pull.ISC_SIDE):
        figures = results[system]
        pulls = len(figures["quiet"]) + len(figures["loaded"])
        assert len(figures["quiet"]) == 2 and figures["loaded"]
        assert sum(name.startswith(f"{system} pull") for name in checked) == pulls
        assert sum(f"{system} pull under host writes" in name for name in checked) == len(
            figures["loaded"]
        )
        # 1% of 16 MiB is round(2.56) = 3 blocks of 64 KiB.
        assert {run["bytes"] for run in figures["quiet"]} == {3 * 65536}
        for run in figures["loaded"]:  # each pull's write window, then an idle one as long
            assert run["idle"]["seconds"] >= run["writer"]["seconds"] > 0
        assert figures["summary"]["writer_rate"] > 0 and figures["summary"]["idle_rate"] > 0
        assert figures["summary"]["window"] >= 0.2
    assert f"- {len(checked)} pulls checked byte for byte, 0 mismatched" in output
    assert "| bytes read per pull | 192K | 192K |  |" in output
    assert not list(tmp_path.glob("isc-pull-*"))  # the volumes are gone


def test_a_pull_that_differs_from_the_image_at_the_mark_fails_the_run(
    tmp_path, monkeypatch, capsys
):
    needed_tools()
    snapshot = compare_pull.snapshot

    def tampered(source: Path, image: Path) -> None:
        snapshot(source, image)
        with open(image, "r+b") as f:
            f.seek(12345)
            byte = f.read(1)
            f.seek(12345)
            f.write(bytes([byte[0] ^ 0xFF]))

    monkeypatch.setattr(compare_pull, "snapshot", tampered)
    assert compare_pull.main([*TINY, "--rounds", "1", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for system in (compare_pull.QEMU, compare_pull.ISC_SIDE):
        assert f"MISMATCH: {system} pull, seed" in out
    assert "at byte 12345" in out
    assert " 0 mismatched" not in out


def test_bad_arguments_exit_2_naming_the_problem(capsys):
    for argv, message in (
        (["--size", "100K"], "--size must be a positive multiple of 64 KiB"),
        (["--change", "0"], "--change must be in (0, 1]"),
        (["--rounds", "0"], "--rounds must be at least 1"),
    ):
        with pytest.raises(SystemExit, match=r"^2$"):
            compare_pull.parse_args(argv)
        assert message in capsys.readouterr().err


def test_a_tiny_run_with_a_fresh_client_per_pull_checks_every_pull(tmp_path: Path):
    needed_tools()
    results, output = tiny_run(
        "compare_pull.py", [*TINY, "--rounds", "1", "--fresh-client"], tmp_path
    )
    assert results["checks"] and all(check["ok"] for check in results["checks"])
    assert "median of 1; a new process per pull)" in output


def test_the_daemon_client_reports_a_failed_pull_and_serves_the_next(tmp_path: Path):
    needed_tools()
    script = tmp_path / "pull.py"
    script.write_text(compare_pull.pull_script())
    missing = f"nbd+unix:///vol?socket={tmp_path / 'no.sock'}"
    failed = r"(?s)the pulling client failed: .*nbd_connect_uri"
    with compare_pull.PullClient(script, fresh=False) as client:
        for _ in range(2):
            with pytest.raises(RuntimeError, match=failed):
                client.pull(missing, "qemu:dirty-bitmap:vol", tmp_path / "backup.img")
