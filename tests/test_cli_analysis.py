"""``isc analyze``, ``isc replay`` and ``isc bench write-path``, run as a user runs them.

Each test starts ``python -m isc.cli`` in a subprocess with small sizes and
checks its exit status, its output (parsed back when it is JSON, CSV or a
PNG) and, for user errors, that stderr holds one clear line and no traceback.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from isc import DeltaBitmap, MemoryLUN
from isc.analysis import analyze
from isc.workload import IOBatch, read_msr, replay, uniform

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
TIMEOUT = 120


def isc(*args: str, cwd: Path, prelude: str | None = None) -> subprocess.CompletedProcess:
    """Run ``isc ARGS`` (``python -m isc.cli``), or ``prelude`` then ``isc.cli.main(ARGS)``."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    if prelude is None:
        command = [sys.executable, "-m", "isc.cli", *args]
    else:
        code = f"{prelude}\nimport sys\nfrom isc.cli import main\nsys.exit(main(sys.argv[1:]))"
        command = [sys.executable, "-c", code, *args]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env=env, timeout=TIMEOUT, check=False
    )


def assert_user_error(done: subprocess.CompletedProcess, status: int, *phrases: str) -> None:
    """Exit ``status``, nothing on stdout, the phrases on stderr, no traceback."""
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    for phrase in phrases:
        assert phrase in last, done.stderr


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG
    image = pytest.importorskip("matplotlib.image")
    pixels = image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100


GENERATED = ("--generate", "uniform", "--volume-size", "4M", "--count", "3000", "--seed", "3")


# -- isc analyze ---------------------------------------------------------------------------


def test_analyze_prints_a_table_with_every_granularity_and_a_recommendation(tmp_path):
    done = isc("analyze", *GENERATED, "--interval", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    rows = [line.split()[0] for line in lines if line[:1].isdigit()]
    assert rows == ["2K", "4K", "8K", "16K", "32K", "64K"]
    assert "cost = bytes transferred + 1 x isc COFW bytes" in done.stdout
    assert any(line.startswith("recommended granularity: ") for line in lines)


def test_analyze_json_matches_the_library_and_csv_and_plot_go_to_files(tmp_path):
    done = isc(
        "analyze",
        *GENERATED,
        "--granularity",
        "4K,16K",
        "--interval",
        "0.5",
        "--bandwidth",
        "8M",
        "--save-area",
        "64K",
        "--cofw-weight",
        "2",
        "--json",
        "--csv",
        "out.csv",
        "--plot",
        "out.png",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    expected = analyze(
        uniform(4 << 20, 3000, seed=3),
        [4096, 16384],
        interval=0.5,
        bandwidth=8 << 20,
        save_area=64 << 10,
        cofw_weight=2,
    )
    assert data["recommended"] == expected.recommended
    for got, want in zip(data["results"], expected.results, strict=True):
        assert got["granularity"] == want.granularity
        assert got["bytes_transferred"] == want.bytes_transferred
        assert got["isc"]["bytes"] == want.isc.bytes
        assert got["classic"]["save_area_high_water"] == want.classic.save_area_high_water
        assert got["cost"] == want.cost
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text())))
    assert [int(row["granularity"]) for row in rows] == [4096, 16384]
    assert [int(row["no_clear_bytes"]) for row in rows] == [
        r.no_clear.bytes for r in expected.results
    ]
    assert_png(tmp_path / "out.png")


def msr_lines(count: int) -> list[str]:
    """An MSR trace: a 4 KiB write every 10 ms (in 100 ns ticks), cycling over 1 MiB."""
    return [
        f"{128166372000000000 + i * 100000},src,0,Write,{(i * 40960) % (1 << 20)},4096,100"
        for i in range(count)
    ]


def test_analyze_a_trace_stops_at_a_bad_line_unless_told_to_skip_it(tmp_path):
    lines = msr_lines(400)
    lines[150] = "128166373500000000,src,0,Erase,0,4096,100"
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    trace = ("analyze", "--trace", "t.csv", "--format", "msr", "--interval", "0.5")
    assert_user_error(isc(*trace, cwd=tmp_path), 1, "isc analyze: error:", "t.csv:151:", "Erase")
    done = isc(*trace, "--skip-bad", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "skipped 1 malformed" in done.stderr
    data = json.loads(done.stdout)
    assert data["writes"] == 399
    del lines[150]
    (tmp_path / "good.csv").write_text("\n".join(lines) + "\n")
    expected = analyze(read_msr(tmp_path / "good.csv"), interval=0.5)
    assert [r["isc"]["chunks"] for r in data["results"]] == [r.isc.chunks for r in expected.results]


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (("--granularity", "3K"), "must be a power of two from 2K to 64K"),
        (("--granularity", "128K"), "must be a power of two"),
        (("--interval", "0"), "must be a finite number > 0"),
        (("--bandwidth", "fast"), "is not a size"),
        (("--count", "-5"), "must be >= 1"),
        (("--format", "msr"), "--format and --skip-bad apply to --trace only"),
        (("--skew", "2"), "--skew applies to --generate hotspot only"),
        (("--json", "--csv"), "cannot both go to stdout"),
    ],
)
def test_analyze_bad_arguments_exit_2_with_one_line(tmp_path, args, phrase):
    done = isc("analyze", *GENERATED, *args, cwd=tmp_path)
    assert_user_error(done, 2, "isc analyze: error:", phrase)


def test_analyze_trace_argument_errors(tmp_path):
    assert_user_error(isc("analyze", cwd=tmp_path), 2, "one of the arguments --trace --generate")
    no_format = isc("analyze", "--trace", "t.csv", cwd=tmp_path)
    assert_user_error(no_format, 2, "--trace needs --format")
    mixed = isc("analyze", "--trace", "t.csv", "--format", "msr", "--rate", "5", cwd=tmp_path)
    assert_user_error(mixed, 2, "--rate apply to --generate only")
    missing = isc("analyze", "--trace", "none.csv", "--format", "msr", cwd=tmp_path)
    assert_user_error(missing, 1, "isc analyze: error:", "No such file", "none.csv")


def test_analyze_runtime_errors_exit_1_with_one_line(tmp_path):
    short = isc("analyze", *GENERATED, "--interval", "3600", cwd=tmp_path)
    assert_user_error(short, 1, "less than the update interval", "use a shorter interval")
    reads = isc("analyze", *GENERATED, "--write-fraction", "0", cwd=tmp_path)
    assert_user_error(reads, 1, "no writes")


def test_plot_without_matplotlib_fails_before_analysing(tmp_path):
    done = isc(
        "analyze",
        *GENERATED,
        "--plot",
        "x.png",
        cwd=tmp_path,
        prelude="import sys; sys.modules['matplotlib'] = None",
    )
    assert_user_error(done, 1, "isc analyze: error: plotting needs matplotlib", "isc[plot]")
    assert not (tmp_path / "x.png").exists()


# -- isc replay ----------------------------------------------------------------------------


def test_replay_creates_the_lun_and_tracks_exactly_the_chunks_written(tmp_path):
    done = isc(
        "replay", *GENERATED, "--lun", "v.img", "--granularity", "8K", "--json", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    workload = uniform(4 << 20, 3000, seed=3)
    batch = IOBatch.concat(workload)
    bitmap = DeltaBitmap(4 << 20, 8192)
    bitmap.record_writes(batch.offset, batch.length)
    assert report["writes"] == 3000 and report["bytes_written"] == int(batch.length.sum())
    assert report["chunks_tracked"] == bitmap.tracking_count
    assert report["session"] is True and report["granularity"] == 8192
    # The file holds what a replay of the same workload onto a memory LUN holds.
    model = MemoryLUN(4 << 20)
    replay(model, workload)
    assert (tmp_path / "v.img").read_bytes() == model.read(0, 4 << 20)


def test_replay_a_trace_onto_an_existing_lun_timed_and_without_a_session(tmp_path):
    lines = msr_lines(50)
    lines.append("128166372000000000,src,0,Write,2097152,4096,100")  # past a 2 MiB LUN
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "v.img").write_bytes(bytes(2 << 20))
    args = ("replay", "--trace", "t.csv", "--format", "msr", "--lun", "v.img")
    refused = isc(*args, cwd=tmp_path)
    assert_user_error(refused, 1, "isc replay: error:", "t.csv:51:", "past the volume size")
    done = isc(*args, "--skip-bad", "--timed", "--speed", "10", "--no-session", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "skipped 1 malformed or out-of-volume" in done.stderr
    assert "50 writes (200 KiB)" in done.stdout
    assert "no session" in done.stdout and "timed at 10x" in done.stdout
    # 50 writes 10 ms apart at 10x: the last one is due 49 ms after the start.
    seconds = float(done.stdout.split(" in ")[1].split(" s")[0])
    assert seconds >= 0.049
    assert (tmp_path / "v.img").stat().st_size == 2 << 20
    # A LUN that does not exist yet is made as large as the trace's extent.
    created = isc(*args[:-1], "new.img", "--skip-bad", "--volume-size", "1M", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert (tmp_path / "new.img").stat().st_size == 1 << 20
    del lines[-1]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    sized = isc(*args[:-1], "sized.img", cwd=tmp_path)
    assert sized.returncode == 0, sized.stderr
    extent = max((i * 40960) % (1 << 20) for i in range(50)) + 4096
    assert (tmp_path / "sized.img").stat().st_size == extent


def test_replay_refuses_a_volume_larger_than_the_lun(tmp_path):
    (tmp_path / "v.img").write_bytes(bytes(1 << 20))
    done = isc("replay", *GENERATED, "--lun", "v.img", cwd=tmp_path)
    assert_user_error(done, 1, "isc replay: error:", "larger than the LUN")


# -- isc bench write-path ------------------------------------------------------------------


def test_bench_write_path_reports_every_case_against_the_lun_write(tmp_path):
    done = isc(
        "bench",
        "write-path",
        "--granularity",
        "4K,64K",
        "--sizes",
        "4K,64K",
        "--count",
        "32",
        "--repeats",
        "1",
        "--dir",
        str(tmp_path),
        "--json",
        "--plot",
        "bench.png",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    rows = data["rows"]
    cases = {(r["lun"], r["write_size"], r["case"], r["granularity"]) for r in rows}
    for lun in ("MemoryLUN", "FileLUN"):
        for size in (4096, 65536):
            assert (lun, size, "no session", None) in cases
            for g in (4096, 65536):
                for case in ("unmarked", "marked, no COFW", "marked, COFW"):
                    assert (lun, size, case, g) in cases
    assert len(rows) == 2 * 2 * (1 + 2 * 3)
    for row in rows:
        assert row["ns_per_write"] > 0
        assert row["writes_per_second"] == pytest.approx(1e9 / row["ns_per_write"])
        if row["case"] == "no session":
            assert row["overhead"] == 0
    assert_png(tmp_path / "bench.png")
    assert not list(tmp_path.glob("isc-bench-*")), "the FileLUN's directory is removed"


def test_bench_write_path_table_and_bad_arguments(tmp_path):
    small = ("--count", "8", "--repeats", "1", "--granularity", "64K", "--sizes", "4K")
    done = isc("bench", "write-path", *small, "--lun", "memory", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "MemoryLUN" in done.stdout and "FileLUN" not in done.stdout
    assert "baseline" in done.stdout and "marked, COFW" in done.stdout
    bad = isc("bench", "write-path", "--lun", "tape", cwd=tmp_path)
    assert_user_error(bad, 2, "give memory, file or memory,file")
    assert_user_error(isc("bench", cwd=tmp_path), 2, "required")
    big = isc("bench", "write-path", "--sizes", "32M", "--lun", "memory", cwd=tmp_path)
    assert_user_error(big, 2, "isc bench write-path: error:", "at most 16M")


def test_the_help_names_the_new_commands(tmp_path):
    done = isc("--help", cwd=tmp_path)
    assert done.returncode == 0
    for command in ("analyze", "replay", "bench"):
        assert command in done.stdout
    for command in ("analyze", "replay"):
        assert isc(command, "--help", cwd=tmp_path).returncode == 0
