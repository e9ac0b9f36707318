"""``isc analyze``, ``isc replay`` and ``isc bench write-path``, run as a user runs them.

Each test starts the installed ``isc`` command (the one beside this Python) in a
subprocess with small sizes and seeded or hand-written traces, and checks its exit
status, its output (parsed back when it is JSON, CSV or a PNG) and, for user errors,
that stderr holds one clear line and no traceback.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from isc import DeltaBitmap, MemoryLUN
from isc.analysis import analyze
from isc.workload import IOBatch, read_msr, read_trace, replay, uniform

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
TIMEOUT = 120
_INSTALLED = shutil.which("isc", path=str(Path(sys.executable).parent))
ISC = [_INSTALLED] if _INSTALLED else [sys.executable, "-m", "isc.cli"]
"""The ``isc`` installed beside this Python (the venv's), else the package run as a module."""


def isc(*args: str, cwd: Path, prelude: str | None = None) -> subprocess.CompletedProcess:
    """Run ``isc ARGS``, or ``prelude`` then ``isc.cli.main(ARGS)`` in a fresh Python."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    if prelude is None:
        command = [*ISC, *args]
    else:
        code = f"{prelude}\nimport sys\nfrom isc.cli import main\nsys.exit(main(sys.argv[1:]))"
        command = [sys.executable, "-c", code, *args]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env=env, timeout=TIMEOUT, check=False
    )


def isc_json(*args: str, cwd: Path) -> dict:
    """Run ``isc ARGS --json``, which must succeed, and parse its report."""
    done = isc(*args, "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


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


def test_json_and_quiet_before_the_verb_are_the_verbs_own(tmp_path):
    args = ["analyze", *GENERATED, "--granularity", "4K,16K", "--interval", "1"]

    def simulated(report: dict) -> dict:
        """The report but the host-side timings, which each run measures anew."""
        return {**report, "results": [r["granularity"] for r in report["results"]]}

    first = simulated(json.loads(isc("--json", *args, cwd=tmp_path).stdout))
    assert first == simulated(isc_json(*args, cwd=tmp_path))
    quiet = isc("-q", *args, "--json", str(tmp_path / "out.json"), cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", quiet.stderr
    assert simulated(json.loads((tmp_path / "out.json").read_text())) == first
    assert_user_error(isc("-q", *args, "--json", cwd=tmp_path), 2, "--quiet contradicts")


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
    mixed = isc("analyze", "--trace", "t.csv", "--format", "msr", "--seed", "5", cwd=tmp_path)
    assert_user_error(mixed, 2, "--seed applies to --generate only")
    two = isc("analyze", "--trace", "t.csv", "--count", "5", "--io-size", "4K", cwd=tmp_path)
    assert_user_error(two, 2, "--count, --io-size apply to --generate only")
    missing = isc("analyze", "--trace", "none.csv", "--format", "msr", cwd=tmp_path)
    assert_user_error(missing, 1, "isc analyze: error:", "No such file", "none.csv")


def test_analyze_runtime_errors_exit_1_with_one_line(tmp_path):
    short = isc("analyze", *GENERATED, "--interval", "3600", cwd=tmp_path)
    assert_user_error(short, 1, "less than the update interval", "use an interval of at most")
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


# -- traces: their format told by their content, a pace for those without timestamps ---------

WRITES = 200  # the sample traces: a 4 KiB write every 10 ms, cycling over 1 MiB


def trace_files(tmp_path: Path) -> dict[str, Path]:
    """The same writes as an MSR Cambridge trace, blkparse output and a fio version 3 iolog,
    under names that say nothing of their format."""
    offsets = [(i * 40960) % (1 << 20) for i in range(WRITES)]
    texts = {
        "msr": msr_lines(WRITES),
        "blkparse": [
            f"  8,0    1 {i + 1:8d} {i // 100:5d}.{(i % 100) * 10_000_000:09d}  4162  Q   W "
            f"{offset // 512} + 8 [dd]"
            for i, offset in enumerate(offsets)
        ],
        "fio": ["fio version 3 iolog", "0 /dev/sdb add"]
        + [f"{i * 10_000} /dev/sdb write {offset} 4096" for i, offset in enumerate(offsets)],
    }
    paths = {}
    for number, (fmt, lines) in enumerate(texts.items()):
        paths[fmt] = tmp_path / f"trace{number}.txt"
        paths[fmt].write_text("\n".join(lines) + "\n")
    return paths


def figures(data: dict) -> list[tuple]:
    return [
        (r["granularity"], r["updates"], r["bytes_transferred"], r["isc"]["bytes"])
        for r in data["results"]
    ]


def test_analyze_tells_each_trace_format_from_its_content(tmp_path):
    paths = trace_files(tmp_path)
    seen = []
    for fmt, path in paths.items():
        data = isc_json("analyze", "--trace", path.name, "--interval", "0.5", cwd=tmp_path)
        expected = analyze(read_trace(path, fmt), interval=0.5)
        assert data["writes"] == WRITES
        assert figures(data) == figures(json.loads(expected.to_json()))
        assert data["workload"] == str(read_trace(path.name, fmt))
        seen.append(figures(data))
    assert seen[0] == seen[1] == seen[2]  # the same writes, whatever the format


def test_a_wrong_format_says_what_the_trace_looks_like(tmp_path):
    paths = trace_files(tmp_path)
    for command in ("analyze", "replay --lun v.img"):
        done = isc(
            *command.split(), "--trace", paths["msr"].name, "--format", "blkparse", cwd=tmp_path
        )
        assert_user_error(
            done,
            1,
            f"isc {command.split()[0]}: error: {paths['msr'].name}:1:",
            "read as format 'blkparse'",
            "looks like an MSR Cambridge trace (7 comma-separated fields)",
            "use format 'msr'",
        )
        assert "no I/O" not in done.stderr
    assert not (tmp_path / "v.img").exists()
    fio = isc("analyze", "--trace", paths["fio"].name, "--format", "msr", cwd=tmp_path)
    assert_user_error(fio, 1, "looks like a fio iolog", "use format 'fio'")
    (tmp_path / "notes.txt").write_text("measured on Tuesday\n")
    unknown = isc("analyze", "--trace", "notes.txt", cwd=tmp_path)
    assert_user_error(
        unknown, 1, "notes.txt:1: cannot tell the trace format", "'measured on Tuesday'"
    )


def untimed_fio(path: Path) -> Path:
    """A fio version 2 iolog: no timestamps, and no wait lines to stand in for them."""
    lines = ["fio version 2 iolog", "/dev/sdb add", "/dev/sdb open"]
    lines += [f"/dev/sdb write {(i * 40960) % (1 << 20)} 4096" for i in range(WRITES)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_trace_without_timestamps_runs_at_the_rate_given(tmp_path):
    untimed_fio(tmp_path / "job.log")
    refused = isc("analyze", "--trace", "job.log", cwd=tmp_path)
    assert_user_error(refused, 1, f"all {WRITES} I/Os", "at time 0", "--rate IOPS")
    assert "interval" not in refused.stderr.split(":")[-1]
    # 200 writes at 100 I/Os/s span 1.99 s: updates at 0.5, 1.0 and 1.5 s.
    job = ("--trace", "job.log")
    data = isc_json("analyze", *job, "--rate", "100", "--interval", "0.5", cwd=tmp_path)
    assert data["workload"] == "fio iolog job.log at 100 I/Os/s"
    assert data["duration"] == pytest.approx(1.99)
    assert {row["updates"] for row in data["results"]} == {3}
    # replay keeps the pace a rate gives: the last of 200 writes at 2000/s is due at 99.5 ms.
    report = isc_json("replay", *job, "--rate", "2000", "--lun", "v.img", cwd=tmp_path)
    assert report["timed"] is True and report["rate"] == 2000
    assert report["writes"] == WRITES and report["seconds"] >= (WRITES - 1) / 2000
    # --timed alone keeps no pace on such a trace, and says how to give it one.
    timed = isc("replay", *job, "--timed", "--lun", "v.img", cwd=tmp_path)
    assert timed.returncode == 0, timed.stderr
    assert "job.log has no timestamps" in timed.stderr and "--rate IOPS" in timed.stderr


def test_a_trace_shorter_than_the_interval_is_told_an_interval_that_fits(tmp_path):
    (tmp_path / "t.csv").write_text("\n".join(msr_lines(WRITES)) + "\n")
    done = isc("analyze", "--trace", "t.csv", cwd=tmp_path)  # 1.99 s against 60 s
    assert_user_error(done, 1, "lasts 1.99 s", "use an interval of at most 1.99 s")
    fits = isc_json("analyze", "--trace", "t.csv", "--interval", "1.99", cwd=tmp_path)
    assert {row["updates"] for row in fits["results"]} == {1}


# -- what the reports say --------------------------------------------------------------------


def test_the_table_states_the_rule_the_tie_and_a_legend_line_per_column(tmp_path):
    done = isc("analyze", *GENERATED, "--interval", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("gran "))
    columns = re.split(r"\s{2,}", header.strip())
    legend = lines[lines.index("columns (bytes: B, K = KiB, M = MiB, G = GiB):") + 1 :]
    for column in columns:
        assert any(re.match(rf"  {re.escape(column)}\s{{2,}}\S", line) for line in legend), column
    # 4 KiB-aligned 4 KiB writes cost the same at 2K and 4K: the larger wins, and says so.
    assert "recommended granularity: 4K (cost " in done.stdout
    assert any(line.startswith("rule: the least cost") for line in lines)
    assert "tie: 2K costs the same; the larger granularity wins" in lines
    assert not any(line.startswith("warning:") for line in lines)


def test_a_recommendation_on_fewer_than_three_updates_is_flagged(tmp_path):
    (warning,) = isc_json("analyze", *GENERATED, "--interval", "1.5", cwd=tmp_path)["warnings"]
    assert warning.startswith("the recommendation rests on 2 updates (fewer than 3)")
    table = isc("analyze", *GENERATED, "--interval", "1.5", cwd=tmp_path)
    assert f"warning: {warning}" in table.stdout.splitlines()


def test_reports_name_the_workload_in_words(tmp_path):
    words = "uniform workload: 3000 I/Os on 4.00 MiB at 1000 I/Os/s, seed 3"
    table = isc("analyze", *GENERATED, "--interval", "1", cwd=tmp_path)
    assert table.stdout.startswith(f"workload: {words}\n")
    data = isc("analyze", *GENERATED, "--interval", "1", "--json", cwd=tmp_path)
    assert json.loads(data.stdout)["workload"] == words
    replayed = isc("replay", *GENERATED, "--lun", "v.img", cwd=tmp_path)
    assert replayed.stdout.startswith(f"replayed {words} onto v.img")
    (tmp_path / "t.csv").write_text("\n".join(msr_lines(50)) + "\n")
    report = isc("replay", "--trace", "t.csv", "--lun", "w.img", "--json", cwd=tmp_path)
    assert json.loads(report.stdout)["workload"] == "MSR Cambridge trace t.csv"
    for done in (table, data, replayed, report):
        assert done.returncode == 0, done.stderr
        assert not re.search(r"<\w+|Workload|Reader", done.stdout), done.stdout


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
