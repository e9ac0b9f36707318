"""Granularity analysis: the simulated updates against a direct, per-write computation.

:func:`direct` is the oracle: one Python loop over the writes with plain sets
of chunks and a dict of sent times, written straight from the model in the
``isc.analysis`` docstring. :func:`isc.analysis.analyze` must match it
exactly, for every granularity, on hand-made and random small workloads.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from dataclasses import astuple, dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isc import ParameterError, RangeError
from isc._plot import PlotUnavailable
from isc.analysis import (
    DEFAULT_GRANULARITIES,
    MAX_UPDATES,
    Analysis,
    analyze,
    bitmap_memory,
    workload_extent,
)
from isc.workload import IO, IOBatch, hotspot, read_fio, sequential, uniform

K = 1024


# -- the oracle -------------------------------------------------------------------------


@dataclass
class Variant:
    chunks: int = 0
    bytes: int = 0
    high_water: int = 0
    overruns: int = 0


@dataclass
class Direct:
    updates: int = 0
    skipped: int = 0
    covered: int = 0
    chunks_sent: int = 0
    bytes_sent: int = 0
    longest: float = 0.0
    isc: Variant = field(default_factory=Variant)
    no_clear: Variant = field(default_factory=Variant)
    classic: Variant = field(default_factory=Variant)


def direct(ios: list[IO], size: int, g: int, interval: float, bandwidth: float, capacity: int):
    """The model, one write at a time, with sets (see the isc.analysis docstring)."""
    out = Direct()

    def chunk_bytes(c: int) -> int:
        return min(g, size - c * g)

    tracking: set[int] = set()
    written = 0
    k = 1
    transfer: dict | None = None

    def start() -> None:
        nonlocal tracking, transfer
        u = k * interval
        sent = {}
        done = 0
        for c in sorted(tracking):
            done += chunk_bytes(c)
            sent[c] = u + done / bandwidth
        tracking = set()
        end = max(sent.values(), default=u)
        transfer = {"k": k, "end": end, "sent": sent, "held": {}, "peak": 0}
        transfer.update(isc=set(), no_clear=set(), classic=set())
        out.updates += 1
        out.covered = written
        out.chunks_sent += len(sent)
        out.bytes_sent += done
        out.longest = max(out.longest, end - u)

    def end() -> None:
        nonlocal transfer, k
        peaks = {
            "isc": transfer["peak"],
            "no_clear": sum(map(chunk_bytes, transfer["no_clear"])),
            "classic": sum(map(chunk_bytes, transfer["classic"])),
        }
        for name, peak in peaks.items():
            variant = getattr(out, name)
            variant.high_water = max(variant.high_water, peak)
            variant.overruns += peak > capacity
        following = transfer["k"] + 1
        while following * interval < transfer["end"]:
            following += 1
        out.skipped += following - transfer["k"] - 1
        k = following
        transfer = None

    def advance(t: float) -> None:
        while True:
            if transfer is not None and transfer["end"] <= t:
                end()
            elif transfer is None and k * interval <= t:
                start()
            else:
                return

    def save(name: str, c: int) -> None:
        transfer[name].add(c)
        variant = getattr(out, name)
        variant.chunks += 1
        variant.bytes += chunk_bytes(c)

    for t, offset, length, is_write in ios:
        if not is_write:
            continue
        advance(t)
        chunks = range(offset // g, (offset + length - 1) // g + 1)
        written += length
        if transfer is not None:
            sent, held = transfer["sent"], transfer["held"]
            for c in [c for c in held if sent[c] <= t]:
                del held[c]
            for c in chunks:
                if c in sent and t < sent[c] and c not in transfer["isc"]:
                    save("isc", c)
                    held[c] = chunk_bytes(c)
                if c in sent and c not in transfer["no_clear"]:
                    save("no_clear", c)
                if c not in transfer["classic"]:
                    save("classic", c)
            transfer["peak"] = max(transfer["peak"], sum(held.values()))
        tracking.update(chunks)
    advance(ios[-1].time)
    if transfer is not None:
        end()
    return out


def assert_matches(analysis: Analysis, ios: list[IO], size: int) -> None:
    """Every granularity's figures equal the oracle's."""
    for row in analysis.results:
        want = direct(
            ios, size, row.granularity, analysis.interval, analysis.bandwidth, analysis.save_area
        )
        got = (
            row.updates,
            row.skipped_updates,
            row.covered_bytes_written,
            row.chunks_transferred,
            row.bytes_transferred,
        )
        expected = (want.updates, want.skipped, want.covered, want.chunks_sent, want.bytes_sent)
        assert got == expected, f"granularity {row.granularity}"
        assert row.longest_transfer == pytest.approx(want.longest)
        for name in ("isc", "no_clear", "classic"):
            variant = getattr(want, name)
            assert astuple(getattr(row, name)) == (
                variant.chunks,
                variant.bytes,
                variant.high_water,
                variant.overruns,
            ), f"granularity {row.granularity}, {name}"
        assert row.cost == row.bytes_transferred + analysis.cofw_weight * row.isc.bytes
        assert row.chunks == -(-size // row.granularity)


def batches(ios: list[IO], cuts: list[int] = ()) -> list[IOBatch]:
    """``ios`` as batches cut at the given positions."""
    whole = IOBatch(*map(np.array, zip(*ios, strict=True)))
    edges = [0, *sorted(set(cuts)), len(ios)]
    return [whole[a:b] for a, b in itertools.pairwise(edges) if b > a]


def writes(*records: tuple[float, int, int]) -> list[IO]:
    return [IO(float(t), offset, length, True) for t, offset, length in records]


# -- hand-made workloads ----------------------------------------------------------------


def test_a_worked_example_by_hand():
    # 4 chunks of 2 KiB; a chunk takes 1 s to send. Update at t=10 sends chunks
    # 0, 2, 3 (written before it) during [10, 13): sent at 11, 12, 13.
    ios = [
        *writes(
            (1, 0, 2 * K),  # chunk 0
            (2, 4 * K, 4 * K),  # chunks 2, 3
            (10.5, 0, 512),  # chunk 0 unsent: isc, no-clear and classic save it
            (11.0, 2 * K, 4 * K),  # chunk 0 sent at 11; chunk 2 unsent (isc); 1 not in transfer
            (12.5, 4 * K, 2 * K),  # chunk 2 sent at 12: no isc COFW; no-clear already saved it
            (12.7, 6 * K, 2 * K),  # chunk 3 unsent: all three save it
        ),
        IO(20.0, 0, 512, False),  # a read: the update at 20 sends chunks 0 .. 3
    ]
    analysis = analyze(
        batches(ios), [2 * K], interval=10, bandwidth=2 * K, save_area=4 * K, volume_size=8 * K
    )
    row = analysis.result(2 * K)
    assert row.updates == 2 and row.skipped_updates == 0
    assert row.chunks_transferred == 3 + 4
    assert row.bytes_transferred == 7 * 2 * K
    assert row.covered_bytes_written == 2 * K + 4 * K + 512 + 4 * K + 2 * K + 2 * K
    # isc: 0 (t=10.5), 2 (t=11), 3 (t=12.7). no-clear: the same three. classic: 0, 1, 2, 3.
    assert (row.isc.chunks, row.no_clear.chunks, row.classic.chunks) == (3, 3, 4)
    # isc holds chunk 0 over [10.5, 11), chunk 2 over [11, 12) and chunk 3 over
    # [12.7, 13): never two at once.
    assert row.isc.save_area_high_water == 2 * K
    assert row.no_clear.save_area_high_water == 3 * 2 * K
    assert row.classic.save_area_high_water == 4 * 2 * K
    assert (row.isc.overruns, row.no_clear.overruns, row.classic.overruns) == (0, 1, 1)
    assert row.longest_transfer == 4.0
    assert_matches(analysis, ios, 8 * K)


def test_a_short_last_chunk_counts_its_real_size():
    size = 5 * K  # chunks of 2K: 0, 1 and a 1 KiB chunk 2
    ios = writes((0.5, 4 * K, K), (1.0, 4 * K, K), (3, 0, K))
    analysis = analyze(batches(ios), [2 * K], interval=1, bandwidth=K, volume_size=size)
    row = analysis.result(2 * K)
    assert row.chunks == 3
    # Updates at 1 (chunk 2, sent at 2), 2 (chunk 2 again, rewritten at 1) and 3 (nothing).
    assert (row.updates, row.chunks_transferred, row.bytes_transferred) == (3, 2, 2 * K)
    assert (row.isc.chunks, row.isc.bytes) == (1, K)  # the write at 1.0 came before the send
    assert_matches(analysis, ios, size)


def test_an_update_due_during_a_transfer_is_refused_and_the_next_one_runs_after_it():
    # Everything written before t=1: 16 chunks of 2 KiB at 2 KiB/s take 16 s.
    ios = writes((0.1, 0, 32 * K), (5, 0, 2 * K), (40, 0, 2 * K))
    analysis = analyze(batches(ios), [2 * K], interval=1, bandwidth=2 * K, volume_size=32 * K)
    row = analysis.result(2 * K)
    # Updates at 1 (ends at 17), 17 (chunk 0, written at 5: ends at 18), then the
    # updates at 18 .. 40 find nothing tracked.
    assert row.skipped_updates == 15
    assert row.updates == 40 - 15
    assert row.longest_transfer == 16
    assert_matches(analysis, ios, 32 * K)


def test_writes_at_a_mark_or_at_a_sent_time_land_after_it():
    # The update at 10 sends chunks 0 and 1, at 11 and 12.
    ios = writes(
        (0, 0, 4 * K),
        (10.0, 4 * K, 2 * K),  # after the mark: chunk 2 was not in it (classic only)
        (11.0, 0, 4 * K),  # chunk 0 is sent at 11.0: no isc COFW; chunk 1 is not yet
        (20.0, 6 * K, 2 * K),  # after the mark at 20: chunk 3 is not in it (classic only)
    )
    analysis = analyze(batches(ios), [2 * K], interval=10, bandwidth=2 * K, volume_size=8 * K)
    row = analysis.result(2 * K)
    assert (row.isc.chunks, row.no_clear.chunks, row.classic.chunks) == (1, 2, 4)
    assert (row.updates, row.chunks_transferred) == (2, 2 + 3)
    assert_matches(analysis, ios, 8 * K)


@pytest.mark.parametrize("cuts", [[], [1], [2, 3], [1, 2, 3, 4, 5]])
def test_every_granularity_matches_the_oracle_however_the_batches_are_cut(cuts):
    rng = np.random.default_rng(7)
    size = 256 * K + 3 * K  # a short last chunk at every granularity above 1 KiB
    n = 400
    offsets = rng.integers(0, size - 1, n)
    lengths = np.minimum(rng.choice([512, 4 * K, 16 * K, 70 * K], n), size - offsets)
    times = np.sort(rng.uniform(0, 30, n)).round(2)
    ios = [IO(*record) for record in zip(times, offsets, lengths, rng.random(n) < 0.9, strict=True)]
    cuts = [c * n // 6 for c in cuts]
    analysis = analyze(batches(ios, cuts), interval=3, bandwidth=32 * K, volume_size=size)
    assert [row.granularity for row in analysis.results] == list(DEFAULT_GRANULARITIES)
    assert_matches(analysis, ios, size)


@st.composite
def workloads(draw):
    size = draw(st.integers(1, 40)) * 512 + draw(st.sampled_from([0, 1, 2047]))
    n = draw(st.integers(1, 40))
    records = []
    for _ in range(n):
        # Times on a quarter-second grid, so writes meet marks and sent times exactly.
        t = draw(st.integers(0, 60)) / 4
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(size - offset, 8 * K)))
        records.append((t, offset, length, draw(st.booleans()) or n == 1))
    records.sort(key=lambda r: r[0])
    ios = [IO(*r) for r in records]
    cuts = draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=3))
    return size, ios, cuts


@given(
    workloads(),
    st.sampled_from([0.25, 0.5, 1.0, 2.5]),
    st.sampled_from([2 * K, 8 * K, 64 * K]),
    st.integers(0, 16 * K),
)
@settings(max_examples=300)
def test_random_small_workloads_match_the_oracle(workload, interval, bandwidth, capacity):
    size, ios, cuts = workload
    if not any(io.write for io in ios) or ios[-1].time < interval:
        with pytest.raises(ParameterError):
            analyze(batches(ios, cuts), interval=interval, volume_size=size)
        return
    analysis = analyze(
        batches(ios, cuts),
        interval=interval,
        bandwidth=bandwidth,
        save_area=capacity,
        volume_size=size,
    )
    assert_matches(analysis, ios, size)


def test_a_generated_workload_matches_the_oracle_and_isc_saves_least():
    workload = hotspot(1 << 20, 3000, rate=100, io_size={4 * K: 3, 32 * K: 1}, seed=3)
    workload.batch_size = 700
    ios = list(IOBatch.concat(workload))
    analysis = analyze(workload, interval=5, bandwidth=256 * K, save_area=64 * K)
    assert_matches(analysis, ios, 1 << 20)
    for row in analysis.results:
        # The claim, measured: clearing as sent saves no more than either alternative.
        assert row.isc.bytes <= row.no_clear.bytes <= row.classic.bytes
        assert row.isc.save_area_high_water <= row.no_clear.save_area_high_water
        assert row.isc.bytes < row.classic.bytes
        assert row.bitmap_bytes == bitmap_memory(1 << 20, row.granularity)


# -- the figures around the simulation --------------------------------------------------


def test_bitmap_memory_counts_three_bitmaps_and_their_summaries():
    # 1 GiB at 2 KiB: 2**19 chunks = 8192 words; 128 blocks -> 2 summary words.
    assert bitmap_memory(1 << 30, 2 * K) == 3 * (8192 + 2) * 8
    assert bitmap_memory(1, 64 * K) == 3 * (1 + 1) * 8
    with pytest.raises(ParameterError):
        bitmap_memory(1 << 30, 3000)


def test_the_recommendation_minimises_the_stated_cost_and_ties_go_to_the_larger_chunk():
    workload = uniform(4 << 20, 2000, rate=100, seed=5)
    grans = [2 * K, 4 * K, 8 * K]
    analysis = analyze(workload, grans, interval=2, bandwidth=1 << 20, cofw_weight=3)
    assert "cost = bytes transferred + 3 x isc COFW bytes" in analysis.cost_formula
    for row in analysis.results:
        assert row.cost == row.bytes_transferred + 3 * row.isc.bytes
    assert analysis.recommended == min(analysis.results, key=lambda r: r.cost).granularity
    # 4 KiB-aligned 4 KiB writes: 2K and 4K move the same bytes, so 4K wins the tie.
    transfer_only = analyze(workload, grans, interval=2, bandwidth=1 << 20, cofw_weight=0)
    rows = {row.granularity: row for row in transfer_only.results}
    assert rows[2 * K].cost == rows[4 * K].cost < rows[8 * K].cost
    assert transfer_only.recommended == 4 * K


def test_a_save_area_that_runs_out_is_reported_with_advice_and_avoided():
    workload = uniform(8 << 20, 4000, rate=200, seed=2)
    ample = analyze(workload, [2 * K, 64 * K], interval=5, bandwidth=4 << 20, save_area=1 << 30)
    assert ample.advice() == []
    assert all(row.save_area_fits for row in ample.results)
    peak = ample.result(64 * K).isc.save_area_high_water
    assert peak > ample.result(2 * K).isc.save_area_high_water > 0
    tight = analyze(workload, [2 * K, 64 * K], interval=5, bandwidth=4 << 20, save_area=peak - 1)
    row = tight.result(64 * K)
    assert not row.save_area_fits and row.isc.overruns >= 1
    assert tight.result(2 * K).save_area_fits
    (advice,) = tight.advice()
    assert "would have run out at 64K" in advice
    assert "unmarked full copies" in advice and "at least" in advice
    assert "advice:" in tight.table()
    assert tight.recommended == 2 * K  # the only one that fits


def test_tracking_cost_is_measured_per_granularity():
    analysis = analyze(uniform(1 << 20, 500, seed=1), interval=0.1)
    assert all(0 < row.tracking_ns_per_write < 1e6 for row in analysis.results)


def test_json_and_csv_parse_back_to_the_same_figures():
    analysis = analyze(uniform(2 << 20, 1500, rate=300, seed=4), [4 * K, 16 * K], interval=1)
    data = json.loads(analysis.to_json())
    assert data["recommended"] == analysis.recommended
    assert data["cost_formula"] == analysis.cost_formula
    assert [r["granularity"] for r in data["results"]] == [4 * K, 16 * K]
    for parsed, row in zip(data["results"], analysis.results, strict=True):
        assert parsed["isc"]["bytes"] == row.isc.bytes
        assert parsed["bytes_per_update"] == pytest.approx(row.bytes_per_update)
        assert parsed["save_area_fits"] is True
    rows = list(csv.DictReader(io.StringIO(analysis.to_csv())))
    assert len(rows) == 2
    for parsed, row in zip(rows, analysis.results, strict=True):
        assert int(parsed["granularity"]) == row.granularity
        assert int(parsed["classic_bytes"]) == row.classic.bytes
        assert int(parsed["isc_save_area_high_water"]) == row.isc.save_area_high_water
        assert float(parsed["amplification"]) == pytest.approx(row.amplification)


def test_the_table_names_every_granularity_and_the_recommendation():
    analysis = analyze(sequential(4 << 20, 800, rate=100), interval=2)
    text = analysis.table()
    for label in ("2K", "4K", "8K", "16K", "32K", "64K"):
        assert f"\n{label} " in text
    assert f"recommended granularity: {analysis.recommended // K}K" in text
    assert analysis.cost_formula in text


def test_the_plot_is_a_valid_png(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    analysis = analyze(uniform(1 << 20, 600, rate=100, seed=9), interval=1)
    path = tmp_path / "granularity.png"
    analysis.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    analysis = analyze(uniform(1 << 20, 600, rate=100, seed=9), [64 * K], interval=1)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(PlotUnavailable, match=r"pip install 'isc\[plot\]'"):
        analysis.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_trace_without_a_volume_size_is_sized_by_its_extent(tmp_path):
    path = tmp_path / "trace.log"
    lines = ["fio version 2 iolog", "disk add", "disk write 0 4096", "disk wait 2000000 0"]
    lines += ["disk write 40960 8192", "disk read 0 512", "disk wait 2000000 0"]
    lines += ["disk write 0 4096"]
    path.write_text("\n".join(lines) + "\n")
    trace = read_fio(path)
    assert workload_extent(trace) == 40960 + 8192
    analysis = analyze(trace, [4 * K], interval=1)
    assert analysis.volume_size == 49152
    assert (analysis.writes, analysis.reads) == (3, 1)
    assert_matches(analysis, list(IOBatch.concat(trace)), 49152)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"granularities": [3000]}, "power of two"),
        ({"granularities": [128 * K]}, "power of two"),
        ({"granularities": []}, "at least one granularity"),
        ({"interval": 0}, "interval must be a finite number > 0"),
        ({"interval": math.inf}, "interval"),
        ({"bandwidth": -1}, "bandwidth"),
        ({"save_area": -1}, "save_area must be >= 0"),
        ({"save_area": 1.5}, "save_area must be an integer"),
        ({"cofw_weight": -0.5}, "cofw_weight"),
        ({"interval": 1000}, "less than the update interval"),
        ({"interval": 1e-9}, f"more than {MAX_UPDATES} updates"),
    ],
)
def test_bad_parameters_raise_parameter_error(kwargs, message):
    workload = uniform(1 << 20, 100, rate=100)
    with pytest.raises(ParameterError, match=message):
        analyze(workload, **kwargs)


def test_a_workload_without_writes_or_out_of_the_volume_is_refused():
    with pytest.raises(ParameterError, match="no writes"):
        analyze(uniform(1 << 20, 100, write_fraction=0.0), interval=0.01)
    with pytest.raises(ParameterError, match="no I/O"):
        analyze([], volume_size=None)
    with pytest.raises(RangeError):
        analyze(batches(writes((0, 0, 4 * K), (2, 8 * K, 4 * K))), interval=1, volume_size=8 * K)


# -- what the report says ----------------------------------------------------------------


def untimed_fio(path, writes: int):
    """A fio version 2 iolog of ``writes`` 4 KiB writes and no wait lines: no timestamps."""
    lines = ["fio version 2 iolog", "disk add"]
    lines += [f"disk write {(i * 12288) % (1 << 20)} 4096" for i in range(writes)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_trace_without_timestamps_is_refused_with_a_fix_that_helps(tmp_path):
    path = untimed_fio(tmp_path / "v2.log", 20)
    for interval in (60, 1e-6):  # no interval can help
        with pytest.raises(ParameterError) as caught:
            analyze(read_fio(path), [4 * K], interval=interval)
        message = str(caught.value)
        assert "all 20 I/Os" in message and "at time 0" in message
        assert "rate" in message and "interval" not in message.split(":")[-1]
    # At 10 I/Os per second the 20 writes span 1.9 s: updates at 0.5, 1.0 and 1.5 s.
    paced = analyze(read_fio(path, rate=10), [4 * K], interval=0.5)
    assert paced.result(4 * K).updates == 3
    assert paced.duration == pytest.approx(1.9)
    single = writes((0, 0, 4 * K))
    with pytest.raises(ParameterError, match="a single I/O") as caught:
        analyze(batches(single), interval=1, volume_size=64 * K)
    assert "rate" not in str(caught.value)


def test_a_workload_shorter_than_the_interval_is_told_an_interval_that_fits():
    workload = uniform(1 << 20, 100, rate=100, seed=3)
    last = float(IOBatch.concat(workload).time[-1])
    with pytest.raises(ParameterError, match="use an interval of at most") as caught:
        analyze(workload, [4 * K], interval=1000)
    suggested = float(str(caught.value).split("at most ")[1].split(" s")[0])
    assert 0.9 * last <= suggested <= last
    assert analyze(workload, [4 * K], interval=suggested).result(4 * K).updates == 1


def table_columns(text: str) -> tuple[list[str], list[str]]:
    """The table's column headers and the lines after the table."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("gran "))
    end = next(i for i in range(at, len(lines)) if not lines[i].strip())
    return re.split(r"\s{2,}", lines[at].strip()), lines[end:]


def test_every_column_of_the_table_has_a_legend_line():
    analysis = analyze(uniform(2 << 20, 1500, rate=300, seed=4), [4 * K, 16 * K], interval=1)
    headers, after = table_columns(analysis.table())
    assert len(headers) >= 15
    legend = [line.strip() for line in after]
    for header in headers:
        (line,) = [text for text in legend if re.match(re.escape(header) + r"\s{2,}\S", text)]
        assert len(line) > len(header) + 10, line


def test_the_recommendation_states_its_rule_and_tie_break_in_the_table_and_json():
    workload = uniform(4 << 20, 2000, rate=100, seed=5)
    tied = analyze(workload, [2 * K, 4 * K, 8 * K], interval=2, bandwidth=1 << 20, cofw_weight=0)
    assert tied.recommended == 4 * K
    assert "least cost" in tied.rule and "save area" in tied.rule
    assert "tie goes to the larger granularity" in tied.rule
    text = tied.table()
    assert "recommended granularity: 4K" in text
    assert f"rule: {tied.rule}" in text
    assert "2K costs the same" in text
    data = json.loads(tied.to_json())
    assert data["rule"] == tied.rule and data["recommended"] == 4 * K
    assert data["ties"] == [2 * K]
    # Aligned 16 KiB writes cost the same at every granularity up to 16K.
    aligned = sequential(1 << 20, 100, io_size=16 * K, rate=20)
    many = analyze(aligned, [2 * K, 4 * K, 8 * K, 16 * K], interval=1, cofw_weight=0)
    assert many.recommended == 16 * K and many.ties == (2 * K, 4 * K, 8 * K)
    assert "tie: 2K, 4K and 8K cost the same; the larger granularity wins" in many.table()
    untied = analyze(workload, [2 * K, 8 * K], interval=2, bandwidth=1 << 20, cofw_weight=0)
    assert "costs the same" not in untied.table()
    assert f"rule: {untied.rule}" in untied.table()


def test_a_recommendation_on_fewer_than_three_updates_carries_a_warning():
    workload = uniform(2 << 20, 1000, rate=100, seed=6)  # about 10 s
    thin = analyze(workload, [4 * K, 64 * K], interval=4)
    assert {row.updates for row in thin.results} == {2}
    (warning,) = thin.warnings()
    assert warning.startswith("the recommendation rests on 2 updates")
    assert "an interval of at most 3" in warning  # 3 updates fit in the 10 s
    assert f"warning: {warning}" in thin.table()
    assert json.loads(thin.to_json())["warnings"] == [warning]
    firm = analyze(workload, [4 * K, 64 * K], interval=3)
    assert min(row.updates for row in firm.results) == 3
    assert firm.warnings() == [] and "warning:" not in firm.table()


def test_the_report_names_the_workload_in_words_not_as_an_object():
    workload = hotspot(2 << 20, 800, rate=100, seed=2)
    analysis = analyze(workload, [4 * K], interval=2)
    assert (
        analysis.workload
        == str(workload)
        == ("hotspot workload: 800 I/Os on 2.00 MiB at 100 I/Os/s, seed 2")
    )
    assert analysis.table().startswith(f"workload: {workload}\n")
    assert json.loads(analysis.to_json())["workload"] == str(workload)
    plain = analyze(list(workload), [4 * K], interval=2, volume_size=2 << 20)
    assert plain.workload == "I/O batches"


def test_the_plot_draws_the_trade_off_and_marks_the_recommendation():
    pytest.importorskip("matplotlib")
    workload = uniform(4 << 20, 3000, rate=1000, seed=3)
    analysis = analyze(workload, interval=1, save_area=256 << 10)
    fig = analysis.figure()
    title = fig.get_suptitle()
    assert str(workload) in title and "every 1 s" in title and "100 MiB/s" in title
    assert "<" not in title
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert list(panels) == [
        "bytes to transfer per update",
        "COFW bytes during the transfers, all updates",
        "host-side cost of tracking",
        analysis.cost_formula.split(" (")[0],
    ]
    grans = [row.granularity for row in analysis.results]

    def curve(label: str) -> np.ndarray:
        (line,) = [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == label]
        assert list(line.get_xdata()) == grans
        return np.asarray(line.get_ydata(), dtype=float)

    def proportional(got: np.ndarray, want: list[float]) -> None:
        want = np.asarray(want, dtype=float)
        np.testing.assert_allclose(got * want.max() / got.max(), want, rtol=1e-9)

    proportional(curve("bytes per update"), [r.bytes_per_update for r in analysis.results])
    for name in ("isc", "no-clear", "classic"):
        key = name.replace("-", "_")
        proportional(curve(name), [getattr(r, key).bytes for r in analysis.results])
    proportional(curve("ns per write"), [r.tracking_ns_per_write for r in analysis.results])
    proportional(curve("bitmap memory"), [r.bitmap_bytes for r in analysis.results])
    proportional(curve("cost"), [r.cost for r in analysis.results])
    # The recommended granularity: a marker on the cost curve and a line across every panel.
    (mark,) = [
        line
        for line in panels[analysis.cost_formula.split(" (")[0]].get_lines()
        if line.get_label().startswith("recommended")
    ]
    assert mark.get_label() == f"recommended: {analysis.recommended // K}K"
    assert list(mark.get_xdata()) == [analysis.recommended]
    for ax in panels.values():
        marks = [line for line in ax.get_lines() if line.get_gid() == "recommended"]
        assert len(marks) == 1 and set(marks[0].get_xdata()) == {analysis.recommended}
    # Granularities whose save area runs out are marked on the cost curve.
    short = [r.granularity for r in analysis.results if not r.save_area_fits]
    assert short, "the small save area runs out at some granularity"
    (over,) = [
        line
        for ax in fig.axes
        for line in ax.get_lines()
        if line.get_label() == "save area runs out"
    ]
    assert list(over.get_xdata()) == short
