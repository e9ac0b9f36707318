"""Workloads: I/O batches, the seeded generators, the trace readers and replay.

Each trace test writes a small file in the exact format and computes the
expected I/Os from the records it wrote; the replay tests compare a LUN with a
bytearray model and the tracking bitmap with a direct computation of the
chunks written.
"""

from __future__ import annotations

import gzip
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isc import DeltaBitmap, MemoryLUN, ParameterError, RangeError, Session
from isc.errors import IscError
from isc.workload import (
    IO,
    GeneratedWorkload,
    IOBatch,
    TraceError,
    detect_format,
    hotspot,
    mixed,
    read_blkparse,
    read_fio,
    read_msr,
    read_trace,
    replay,
    sequential,
    uniform,
)

MiB = 1 << 20


def collect(workload) -> list[IO]:
    """Every I/O of a workload, in order."""
    return list(IOBatch.concat(workload))


def assert_same_ios(actual: list[IO], expected: list[IO]) -> None:
    """Offsets, lengths and kinds exactly; times to a nanosecond."""
    assert [io[1:] for io in actual] == [io[1:] for io in expected]
    np.testing.assert_allclose([io.time for io in actual], [io.time for io in expected], atol=1e-9)


def write_lines(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


# -- I/O batches ---------------------------------------------------------------------


def test_batch_indexing_iteration_and_concat_agree():
    batch = IOBatch([0.0, 0.5, 1.5], [0, 4096, 8192], [512, 4096, 65536], [True, False, True])
    assert len(batch) == 3
    assert batch.offset.dtype == np.int64 and batch.time.dtype == np.float64
    assert list(batch) == [
        IO(0.0, 0, 512, True),
        IO(0.5, 4096, 4096, False),
        IO(1.5, 8192, 65536, True),
    ]
    assert batch[1] == IO(0.5, 4096, 4096, False)
    assert list(batch[batch.write]) == [batch[0], batch[2]]
    assert list(IOBatch.concat([batch[:1], batch[1:]])) == list(batch)
    assert len(IOBatch.concat([])) == 0


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (([0.0], [[0]], [1], [True]), "offset must be 1-D"),
        (([0.0], [0.5], [1], [True]), "offset must hold integers, got float64"),
        (([0.0], [0], [1], [1]), "write must hold booleans, got int64"),
        (([0.0, 1.0], [0], [1], [True]), "same length"),
    ],
)
def test_batch_refuses_bad_columns(columns, message):
    with pytest.raises(ParameterError, match=message):
        IOBatch(*columns)


# -- MSR Cambridge traces --------------------------------------------------------------

# Timestamp (100 ns ticks since 1601), host, disk, type, offset, size, response time.
MSR_RECORDS = [
    (128166372003061629, "web", 0, "Read", 3219456, 4096, 1331),
    (128166372016382155, "web", 0, "Write", 3219456, 8192, 21508),
    (128166372016382155, "web", 1, "Write", 65536, 512, 1048),
    (128166372026382245, "proj", 0, "Write", 1 << 33, 65536, 9000),
    (128166372026382246, "web", 0, "write", 0, 0, 10),  # size 0: no I/O
    (128166372036382296, "web", 0, "READ", 12288, 16384, 77),
]


def msr_lines(records) -> list[str]:
    return [",".join(map(str, record)) for record in records]


def msr_expected(records, host=None, disk=None) -> list[IO]:
    kept = [
        r
        for r in records
        if r[5] > 0 and (host is None or r[1] == host) and (disk is None or r[2] == disk)
    ]
    origin = kept[0][0]
    return [IO((r[0] - origin) / 1e7, r[4], r[5], r[3].lower() == "write") for r in kept]


@pytest.mark.parametrize(("host", "disk"), [(None, None), ("web", None), ("web", 0), (None, 1)])
def test_msr_trace_parses_to_the_records_written(tmp_path, host, disk):
    path = tmp_path / "web_0.csv"
    write_lines(path, msr_lines(MSR_RECORDS))
    reader = read_msr(path, hostname=host, disk=disk)
    expected = msr_expected(MSR_RECORDS, host, disk)
    assert_same_ios(collect(reader), expected)
    assert reader.stats.lines == len(MSR_RECORDS)
    assert reader.stats.ios == len(expected)
    assert reader.stats.ignored == len(MSR_RECORDS) - len(expected)
    assert reader.stats.extent == max(io.offset + io.length for io in expected)
    assert reader.stats.skipped_bad == reader.stats.reordered == 0


def test_msr_trace_is_read_through_gzip_and_again_on_each_iteration(tmp_path):
    path = tmp_path / "web_0.csv.gz"
    with gzip.open(path, "wt") as out:
        out.write("".join(line + "\n" for line in msr_lines(MSR_RECORDS)))
    reader = read_trace(path, "msr", hostname="web", batch_size=2)
    first = collect(reader)
    assert_same_ios(first, msr_expected(MSR_RECORDS, "web"))
    assert [len(batch) for batch in reader] == [2, 2]
    assert collect(reader) == first


def test_trace_times_never_go_back(tmp_path):
    # Traces merged from several CPUs or hosts can step back a little.
    records = [
        (1000, "h", 0, "Write", 0, 512, 1),
        (3000, "h", 0, "Write", 512, 512, 1),
        (2000, "h", 0, "Write", 1024, 512, 1),
        (4000, "h", 0, "Write", 1536, 512, 1),
    ]
    path = tmp_path / "late.csv"
    write_lines(path, msr_lines(records))
    reader = read_msr(path)
    times = [io.time for io in collect(reader)]
    assert times == pytest.approx([0.0, 2000e-7, 2000e-7, 3000e-7])
    assert reader.stats.reordered == 1


# -- blkparse output -------------------------------------------------------------------

# (device, cpu, seq, seconds, nanoseconds, pid, action, rwbs, sector, sectors, process)
BLK_EVENTS = [
    ("8,0", 3, 1, 0, 120, 697, "Q", "WS", 223490, 8, "kjournald"),
    ("8,0", 3, 2, 0, 1829, 697, "G", "WS", 223490, 8, "kjournald"),
    ("8,0", 3, 3, 0, 3365, 697, "P", "N", None, None, "kjournald"),
    ("8,0", 3, 4, 0, 6069, 697, "I", "WS", 223490, 8, "kjournald"),
    ("8,0", 3, 5, 0, 11556, 697, "D", "WS", 223490, 8, "kjournald"),
    ("8,0", 1, 1, 0, 336278, 0, "C", "WS", 223490, 8, "0"),
    ("8,0", 0, 1, 0, 401000, 2112, "Q", "R", 1024, 64, "Web Content"),
    ("8,0", 0, 2, 0, 401900, 2112, "Q", "FWS", 0, 0, "jbd2/sda1-8"),  # flush, no data
    ("8,0", 0, 3, 0, 402100, 2112, "Q", "DS", 4096, 2048, "fstrim"),  # discard
    ("8,16", 2, 1, 1, 5, 300, "Q", "W", 0, 16, "dd"),
    ("8,0", 0, 4, 1, 20000, 2112, "M", "W", 1088, 8, "kworker/0:1"),
    ("8,0", 0, 5, 1, 500000, 2112, "C", "R", 1024, 64, "0"),
    ("8,0", 2, 2, 2, 750000000, 4242, "Q", "WFS", 9999, 1, "postgres"),
    ("8,16", 2, 2, 2, 800000000, 300, "C", "W", 0, 16, "0"),
]

BLK_SUMMARY = """\
CPU0 (8,0):
 Reads Queued:           1,       32KiB\t Writes Queued:           2,        4KiB
 Read Dispatches:        0,        0KiB\t Write Dispatches:        1,        4KiB
 Reads Requeued:         0\t\t Writes Requeued:         0
 Reads Completed:        1,       32KiB\t Writes Completed:        1,        4KiB
 Read Merges:            0,        0KiB\t Write Merges:            1,        4KiB
 Read depth:             1        \t Write depth:             1
 IO unplugs:             1        \t Timer unplugs:           0

Total (8,0):
 Reads Queued:           1,       32KiB\t Writes Queued:           3,        8KiB
 Read Dispatches:        0,        0KiB\t Write Dispatches:        1,        4KiB

Throughput (R/W): 12KiB/s / 3KiB/s
Events (8,0): 14 entries
Skips: 0 forward (0 -   0.0%)
"""


def blk_line(event) -> str:
    device, cpu, seq, sec, nsec, pid, action, rwbs, sector, count, process = event
    major, minor = device.split(",")
    stamp = f"{sec:5d}.{nsec:09d}"
    head = f"{major:>3},{minor:<3} {cpu:2d} {seq:8d} {stamp} {pid:5d}  {action:<2}{rwbs:>3} "
    if sector is None:
        return head + f"[{process}]" + (" 1" if action == "U" else "")
    return head + f"{sector} + {count} [{process}]"


def blk_expected(events, action, device=None) -> list[IO]:
    kept = [
        e
        for e in events
        if e[6] == action
        and ("W" in e[7] or "R" in e[7])
        and e[9]
        and (device is None or e[0] == device)
    ]
    origin = kept[0][3] + kept[0][4] * 1e-9
    return [IO(e[3] + e[4] * 1e-9 - origin, e[8] * 512, e[9] * 512, "W" in e[7]) for e in kept]


@pytest.mark.parametrize(("action", "device"), [("Q", None), ("C", None), ("Q", "8,16")])
def test_blkparse_output_parses_to_the_events_written(tmp_path, action, device):
    path = tmp_path / "sda.txt"
    path.write_text("\n".join(map(blk_line, BLK_EVENTS)) + "\n" + BLK_SUMMARY)
    reader = read_trace(path, "blkparse", action=action, device=device)
    expected = blk_expected(BLK_EVENTS, action, device)
    assert expected  # the sample holds I/Os of each kind asked for
    assert_same_ios(collect(reader), expected)
    total_lines = len(BLK_EVENTS) + BLK_SUMMARY.count("\n")
    assert reader.stats.lines == total_lines
    assert reader.stats.ios + reader.stats.ignored == total_lines
    assert reader.stats.skipped_bad == 0


def test_blkparse_skips_packet_commands_without_a_sector(tmp_path):
    path = tmp_path / "sg.txt"
    lines = [
        "  8,0    1        1     0.000000000  1234  Q   R (12 00 00 00 24 00 ..) [sg_inq]",
        blk_line(("8,0", 1, 2, 0, 5000, 1234, "Q", "W", 80, 8, "dd")),
    ]
    write_lines(path, lines)
    assert collect(read_blkparse(path)) == [IO(0.0, 80 * 512, 8 * 512, True)]


# -- fio iologs ----------------------------------------------------------------------------

FIO_OPS = [  # (microseconds, file, action, offset, length); None: a file action
    (0, "/dev/sdb", "add", None, None),
    (12, "/dev/sdb", "open", None, None),
    (15, "/dev/sdb", "write", 0, 4096),
    (40, "/dev/sdb", "read", 1 << 30, 131072),
    (41, "/dev/sdc", "add", None, None),
    (55, "/dev/sdc", "write", 8192, 512),
    (70, "/dev/sdb", "sync", 0, 0),
    (71, "/dev/sdb", "datasync", 0, 0),
    (90, "/dev/sdb", "trim", 65536, 65536),
    (1500, "/dev/sdb", "write", 65536, 8192),
    (1501, "/dev/sdb", "write", 73728, 0),  # empty: no I/O
    (2600, "/dev/sdb", "close", None, None),
]


def fio_expected(ops, filename=None, unit=1e-6) -> list[IO]:
    kept = [
        op
        for op in ops
        if op[2] in ("read", "write") and op[4] and (filename is None or op[1] == filename)
    ]
    return [IO((op[0] - kept[0][0]) * unit, op[3], op[4], op[2] == "write") for op in kept]


def fio_v3_lines(ops) -> list[str]:
    lines = ["fio version 3 iolog"]
    for stamp, name, action, offset, length in ops:
        tail = "" if offset is None else f" {offset} {length}"
        lines.append(f"{stamp} {name} {action}{tail}")
    return lines


def fio_v2_lines(ops) -> list[str]:
    """Version 2 has no timestamps: the gaps become wait lines (in microseconds)."""
    lines = ["fio version 2 iolog"]
    clock = 0
    for stamp, name, action, offset, length in ops:
        if stamp > clock:
            lines.append(f"{name} wait {stamp - clock} 0")
            clock = stamp
        lines.append(f"{name} {action}" + ("" if offset is None else f" {offset} {length}"))
    return lines


@pytest.mark.parametrize("filename", [None, "/dev/sdb"])
@pytest.mark.parametrize("version", [2, 3])
def test_fio_iolog_parses_to_the_operations_written(tmp_path, version, filename):
    lines = (fio_v2_lines if version == 2 else fio_v3_lines)(FIO_OPS)
    path = tmp_path / f"job.v{version}.log"
    write_lines(path, lines)
    reader = read_trace(path, "fio", filename=filename)
    expected = fio_expected(FIO_OPS, filename)
    assert_same_ios(collect(reader), expected)
    assert reader.stats.lines == len(lines)
    assert reader.stats.ios == len(expected)
    assert reader.stats.ignored == len(lines) - len(expected)


def test_fio_v3_time_unit_scales_the_timestamps(tmp_path):
    path = tmp_path / "ms.log"
    write_lines(path, fio_v3_lines(FIO_OPS))
    reader = read_fio(path, time_unit=1e-3)
    assert_same_ios(collect(reader), fio_expected(FIO_OPS, unit=1e-3))


def test_fio_v3_ignores_wait_as_fio_does(tmp_path):
    path = tmp_path / "wait.log"
    write_lines(path, ["fio version 3 iolog", "5 f wait 100 0", "9 f write 0 4096"])
    reader = read_fio(path)
    assert collect(reader) == [IO(0.0, 0, 4096, True)]
    assert reader.stats.ignored == 2


@pytest.mark.parametrize("skip_bad", [False, True])
@pytest.mark.parametrize("first", ["fio version 4 iolog", "/dev/sdb write 0 4096", "x"])
def test_fio_without_a_header_raises_even_with_skip_bad(tmp_path, first, skip_bad):
    path = tmp_path / "nohead.log"
    write_lines(path, [first, "fio version 2 iolog", "/dev/sdb write 0 4096"])
    reader = read_fio(path, skip_bad=skip_bad)
    with pytest.raises(TraceError, match="not a fio iolog") as caught:
        collect(reader)
    assert caught.value.lineno == 1
    assert reader.stats.skipped_bad == 0


# -- malformed lines -----------------------------------------------------------------------

GOOD = {
    "msr": (
        [],
        ["100,h,0,Write,0,4096,5", "200,h,0,Read,4096,512,5", "300,h,0,Write,8192,1024,5"],
    ),
    "blkparse": (
        [],
        [
            "  8,0    0        1     0.000000100   10  Q   W 0 + 8 [a]",
            "  8,0    0        2     0.000000200   10  Q   R 8 + 1 [a]",
            "  8,0    0        3     0.000000300   10  Q   W 16 + 2 [a]",
        ],
    ),
    "fio2": (
        ["fio version 2 iolog", "f add", "f open"],
        ["f write 0 4096", "f read 4096 512", "f write 8192 1024"],
    ),
    "fio3": (
        ["fio version 3 iolog", "0 f add"],
        ["1 f write 0 4096", "2 f read 4096 512", "3 f write 8192 1024"],
    ),
}

BAD_LINES = [
    ("msr", "100,h,0,Write,0,4096", "expected 7 comma-separated fields, found 6"),
    ("msr", "1e5,h,0,Write,0,4096,5", "timestamp '1e5' is not an integer"),
    ("msr", "100,h,disk0,Write,0,4096,5", "disk number 'disk0' is not an integer"),
    ("msr", "100,h,0,Erase,0,4096,5", "type 'Erase' is neither Read nor Write"),
    ("msr", "100,h,0,Write,-4096,4096,5", "offset -4096 is negative"),
    ("msr", "100,h,0,Write,0,4k,5", "size '4k' is not an integer"),
    ("msr", f"100,h,0,Write,{1 << 63},4096,5", "ends past 2**63 bytes"),
    ("blkparse", "  8,0    0        9     0.000000100", "truncated event"),
    ("blkparse", "  8,0    x        9     0.000000100   10  Q   W 0 + 8 [a]", "CPU 'x'"),
    ("blkparse", "  8,0    0        9     0.0000001s    10  Q   W 0 + 8 [a]", "time '0.0000001s'"),
    ("blkparse", "  8,0    0        9     nan           10  Q   W 0 + 8 [a]", "time 'nan'"),
    ("blkparse", "  8,0    0        9     0.1     -10  Q   W 0 + 8 [a]", "PID -10 is negative"),
    ("blkparse", "  8,0    0        9     0.000000100   10  Q   W 0 8 [a]", "'SECTOR + COUNT'"),
    ("blkparse", "  8,0    0        9     0.000000100   10  Q   W 0 +", "'SECTOR + COUNT'"),
    ("blkparse", "  8,0    0        9     0.000000100   10  Q   W 0 + eight [a]", "sector count"),
    ("fio2", "f write 0", "expected 'FILENAME ACTION' or 'FILENAME ACTION OFFSET LENGTH'"),
    ("fio2", "f erase 0 4096", "unknown I/O action 'erase'"),
    ("fio2", "f unlink", "unknown file action 'unlink'"),
    ("fio2", "f write 0x10 4096", "offset '0x10' is not an integer"),
    ("fio2", "f read 0 -1", "length -1 is negative"),
    ("fio3", "4 f write 0 4096 9", "found 6 fields"),
    ("fio3", "f write 0 4096", "found 4 fields"),
    ("fio3", "4.5 f write 0 4096", "timestamp '4.5' is not an integer"),
    ("fio3", "4 f scribble 0 4096", "unknown I/O action 'scribble'"),
]


def trace_file(tmp_path, kind: str, bad: str | None, at: int):
    """A trace of ``kind`` with the good lines and ``bad`` inserted before good line ``at``;
    returns the path, the 1-based line number of the bad line and the reader function."""
    head, good = GOOD[kind]
    body = [*good[:at], *([bad] if bad is not None else []), *good[at:]]
    path = tmp_path / f"{kind}.trace"
    write_lines(path, head + body)
    read = {"msr": read_msr, "blkparse": read_blkparse}.get(kind, read_fio)
    return path, len(head) + at + 1, read


@pytest.mark.parametrize("at", [0, 2])
@pytest.mark.parametrize(("kind", "bad", "reason"), BAD_LINES)
def test_a_malformed_line_raises_trace_error_with_its_line_number(tmp_path, kind, bad, reason, at):
    path, lineno, read = trace_file(tmp_path, kind, bad, at)
    with pytest.raises(TraceError) as caught:
        collect(read(path))
    error = caught.value
    assert isinstance(error, IscError) and isinstance(error, ValueError)
    assert error.lineno == lineno
    assert error.path == str(path)
    assert reason in error.reason
    assert str(error).startswith(f"{path}:{lineno}: ")


@pytest.mark.parametrize(("kind", "bad"), [case[:2] for case in BAD_LINES])
def test_skip_bad_skips_and_counts_malformed_lines(tmp_path, kind, bad):
    (tmp_path / "clean").mkdir()
    clean_path, _, read = trace_file(tmp_path / "clean", kind, None, 0)
    path, _, _ = trace_file(tmp_path, kind, bad, 1)
    reader = read(path, skip_bad=True)
    assert collect(reader) == collect(read(clean_path))
    assert reader.stats.skipped_bad == 1
    assert reader.stats.ios == 3


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_volume_size_refuses_or_skips_io_past_the_end(tmp_path, kind):
    path, _, read = trace_file(tmp_path, kind, None, 0)
    head, good = GOOD[kind]
    # The last good I/O is [8192, 9216): a volume of 9215 bytes is one byte short.
    with pytest.raises(TraceError, match="ends past the volume size 9215 bytes") as caught:
        collect(read(path, volume_size=9215))
    assert caught.value.lineno == len(head) + len(good)
    reader = read(path, volume_size=9215, skip_bad=True)
    assert [io.offset for io in collect(reader)] == [0, 4096]
    assert reader.stats.skipped_bad == 1
    assert len(collect(read(path, volume_size=9216))) == 3


def test_read_trace_refuses_unknown_formats_and_options(tmp_path):
    path = tmp_path / "t"
    path.write_text("")
    with pytest.raises(ParameterError, match="unknown trace format 'spc'"):
        read_trace(path, "spc")
    with pytest.raises(TypeError):
        read_trace(path, "msr", action="Q")
    with pytest.raises(ParameterError, match="'Q' \\(queued\\) or 'C'"):
        read_trace(path, "blkparse", action="D")
    with pytest.raises(ParameterError, match="device must look like"):
        read_blkparse(path, device="sda")
    with pytest.raises(ParameterError, match="time_unit"):
        read_fio(path, time_unit=0)
    with pytest.raises(ParameterError, match="batch_size"):
        read_msr(path, batch_size=0)
    with pytest.raises(ParameterError, match="volume_size"):
        read_msr(path, volume_size=-1)
    assert collect(read_msr(path)) == []


# -- format detection and wrong formats ------------------------------------------------------

LOOKS = {
    "msr": "an MSR Cambridge trace (7 comma-separated fields)",
    "blkparse": "blkparse output",
    "fio": "a fio iolog",
}


def sample_trace(tmp_path, kind: str, name: str | None = None):
    """A small trace of ``kind`` (``GOOD``'s keys) and the format that reads it."""
    head, good = GOOD[kind]
    path = tmp_path / (name or f"{kind}.trace")
    write_lines(path, head + good)
    return path, kind.rstrip("23")


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_the_format_is_detected_from_the_content(tmp_path, kind):
    path, fmt = sample_trace(tmp_path, kind)
    assert detect_format(path) == fmt
    assert collect(read_trace(path)) == collect(read_trace(path, fmt))
    # The name says nothing; a gzipped copy and leading blank lines change nothing.
    packed = tmp_path / "noname.gz"
    with gzip.open(packed, "wt") as out:
        out.write("\n \n" + path.read_text())
    assert detect_format(packed) == fmt
    assert collect(read_trace(packed)) == collect(read_trace(path, fmt))


def test_a_file_of_no_known_format_or_an_empty_one_is_named_with_its_first_line(tmp_path):
    path = tmp_path / "notes.txt"
    write_lines(path, ["", "hello, world"])
    with pytest.raises(TraceError) as caught:
        read_trace(path)
    assert caught.value.lineno == 2
    assert "cannot tell the trace format" in caught.value.reason
    assert "'hello, world'" in caught.value.reason
    for what in LOOKS.values():
        assert what.split(" (")[0] in caught.value.reason
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n")
    with pytest.raises(TraceError, match="is empty") as caught:
        detect_format(empty)
    assert str(caught.value).startswith(f"{empty}: ")


@pytest.mark.parametrize("skip_bad", [False, True])
@pytest.mark.parametrize(
    ("kind", "given"),
    [
        ("msr", "blkparse"),
        ("msr", "fio"),
        ("blkparse", "msr"),
        ("blkparse", "fio"),
        ("fio2", "msr"),
        ("fio3", "blkparse"),
    ],
)
def test_a_wrong_format_says_what_the_file_looks_like(tmp_path, kind, given, skip_bad):
    path, actual = sample_trace(tmp_path, kind)
    reader = read_trace(path, given, skip_bad=skip_bad)
    with pytest.raises(TraceError) as caught:
        collect(reader)
    error = caught.value
    assert error.lineno == 1
    assert LOOKS[actual] in error.reason
    assert f"format {actual!r}" in error.reason
    assert "no I/O" not in str(error)


def test_a_trace_whose_io_is_all_filtered_out_is_empty_not_misread(tmp_path):
    path, _ = sample_trace(tmp_path, "blkparse")
    reader = read_blkparse(path, device="8,16")
    assert collect(reader) == []
    assert reader.stats.ignored == 3
    msr, _ = sample_trace(tmp_path, "msr")
    assert collect(read_msr(msr, hostname="nobody")) == []


def test_rate_spaces_the_io_of_a_trace_without_timestamps(tmp_path):
    path = tmp_path / "v2.log"
    write_lines(
        path, ["fio version 2 iolog", "f add"] + [f"f write {i * 4096} 4096" for i in range(5)]
    )
    untimed = read_fio(path)
    assert [io.time for io in collect(untimed)] == [0.0] * 5
    assert untimed.stats.duration == 0.0
    paced = read_trace(path, rate=250)
    ios = collect(paced)
    assert [io.time for io in ios] == pytest.approx([i / 250 for i in range(5)])
    assert [io.offset for io in ios] == [i * 4096 for i in range(5)]
    assert paced.stats.duration == pytest.approx(4 / 250)
    with pytest.raises(ParameterError, match="rate must be > 0"):
        read_fio(path, rate=0)


def test_workloads_describe_themselves_in_words(tmp_path):
    generated = uniform(4 * MiB, 3000, rate=500, seed=3)
    assert str(generated) == "uniform workload: 3000 I/Os on 4.00 MiB at 500 I/Os/s, seed 3"
    path, _ = sample_trace(tmp_path, "msr", "web_0.csv")
    assert str(read_trace(path)) == f"MSR Cambridge trace {path}"
    assert str(read_fio(path, rate=100)) == f"fio iolog {path} at 100 I/Os/s"
    assert str(read_blkparse(path)) == f"blkparse trace {path}"
    for workload in (generated, read_msr(path)):
        assert "<" not in str(workload) and "Reader" not in str(workload)


# -- streaming -------------------------------------------------------------------------------


def test_a_long_trace_streams_in_bounded_batches(tmp_path):
    n = 300_000
    rng = np.random.default_rng(5)
    stamps = np.cumsum(rng.integers(0, 50, n))
    offsets = rng.integers(0, 1 << 26, n) * 512
    lengths = rng.integers(1, 129, n) * 512
    writes = rng.random(n) < 0.7
    action = np.where(writes, "write", "read")
    path = tmp_path / "long.log"
    with open(path, "w") as out:
        out.write("fio version 3 iolog\n0 /dev/vdb add\n")
        out.writelines(
            f"{t} /dev/vdb {a} {o} {n}\n"
            for t, a, o, n in zip(
                stamps.tolist(), action.tolist(), offsets.tolist(), lengths.tolist(), strict=True
            )
        )
    batch_size = 4096
    reader = read_fio(path, batch_size=batch_size)
    seen = 0
    sizes = []
    for batch in reader:
        # The reader has read up to this batch's last line and no further:
        # it holds one batch at a time, however long the file.
        assert reader.stats.lines == 2 + seen + len(batch)
        part = slice(seen, seen + len(batch))
        assert np.array_equal(batch.offset, offsets[part])
        assert np.array_equal(batch.length, lengths[part])
        assert np.array_equal(batch.write, writes[part])
        np.testing.assert_allclose(batch.time, (stamps[part] - stamps[0]) * 1e-6, atol=1e-9)
        seen += len(batch)
        sizes.append(len(batch))
    assert sizes == [batch_size] * (n // batch_size) + [n % batch_size]
    assert reader.stats.ios == n
    assert reader.stats.lines == n + 2


# -- generators ------------------------------------------------------------------------------

SIZE_CHOICES = [512, 4096, 8192, 65536]


@st.composite
def generated(draw, batch_size=None):
    """A generated workload of any kind with parameters small enough to check fully."""
    alignment = draw(st.sampled_from([512, 4096]))
    volume = draw(st.integers(1, 4096)) * alignment + draw(st.integers(0, alignment - 1))
    sizes = [s for s in SIZE_CHOICES if s <= volume] or [volume]
    if draw(st.booleans()):
        io_size = draw(st.sampled_from(sizes))
    else:
        picked = draw(st.lists(st.sampled_from(sizes), min_size=1, max_size=3, unique=True))
        io_size = {s: draw(st.floats(0.1, 5)) for s in picked}
    common = {
        "io_size": io_size,
        "alignment": alignment,
        "write_fraction": draw(st.sampled_from([0.0, 0.3, 1.0])),
        "seed": draw(st.integers(0, 2**32)),
        "batch_size": batch_size or draw(st.integers(1, 700)),
    }
    count = draw(st.integers(0, 2000))
    kind = draw(st.sampled_from(["uniform", "hotspot", "sequential", "mixed"]))
    if kind == "uniform":
        return uniform(volume, count, **common), sizes_of(io_size), alignment
    if kind == "hotspot":
        skew = draw(st.floats(0, 3))
        regions = draw(st.integers(1, 500))
        return (
            hotspot(volume, count, skew=skew, regions=regions, **common),
            sizes_of(io_size),
            alignment,
        )
    if kind == "sequential":
        start = draw(st.integers(0, (volume - 1) // alignment)) * alignment
        return sequential(volume, count, start=start, **common), sizes_of(io_size), alignment
    parts = [
        (uniform(volume, 0, io_size=io_size, alignment=alignment), 1.0),
        (sequential(volume, 0, io_size=io_size, alignment=alignment, write_fraction=0.5), 2.0),
    ]
    seed, batch = common["seed"], common["batch_size"]
    return mixed(parts, count, seed=seed, batch_size=batch), sizes_of(io_size), alignment


def sizes_of(io_size) -> set[int]:
    return set(io_size) if isinstance(io_size, dict) else {io_size}


@settings(max_examples=60)
@given(generated())
def test_generated_io_lies_in_the_volume_and_follows_the_parameters(case):
    workload, sizes, alignment = case
    batches = list(workload)
    assert [len(b) for b in batches[:-1]] == [workload.batch_size] * (len(batches) - 1)
    assert all(0 < len(b) <= workload.batch_size for b in batches)
    ios = IOBatch.concat(batches)
    assert len(ios) == workload.count
    assert np.all(ios.offset >= 0)
    assert np.all(ios.offset + ios.length <= workload.volume_size)
    assert np.all(ios.offset % alignment == 0)
    assert set(ios.length.tolist()) <= sizes
    if len(ios):
        assert ios.time[0] == 0.0
        assert np.all(np.diff(ios.time) >= 0)
    # Deterministic, and the batch size only cuts the same sequence differently.
    assert list(IOBatch.concat(workload)) == list(ios)
    workload.batch_size = 977
    assert list(IOBatch.concat(workload)) == list(ios)


def test_different_seeds_give_different_workloads():
    a = collect(uniform(64 * MiB, 1000, seed=1))
    b = collect(uniform(64 * MiB, 1000, seed=2))
    assert a != b
    assert a == collect(uniform(64 * MiB, 1000, seed=1))


def region_shares(workload: GeneratedWorkload, regions: int) -> np.ndarray:
    """Share of the I/O each region receives, hottest first."""
    offsets = IOBatch.concat(workload).offset
    hits = np.bincount(offsets * regions // workload.volume_size, minlength=regions)
    return np.sort(hits)[::-1] / hits.sum()


def test_hotspot_concentrates_io_as_zipf_says():
    regions, count = 100, 40_000
    volume = regions * 64 * 4096  # each region holds 64 aligned 4 KiB slots
    skewed = region_shares(hotspot(volume, count, skew=1.2, regions=regions, seed=3), regions)
    flat = region_shares(uniform(volume, count, seed=3), regions)
    zipf = np.arange(1, regions + 1) ** -1.2
    expected_top10 = zipf[:10].sum() / zipf.sum()  # ~0.68
    assert skewed[:10].sum() == pytest.approx(expected_top10, abs=0.02)
    assert flat[:10].sum() < 0.13
    assert skewed[0] == pytest.approx(zipf[0] / zipf.sum(), abs=0.02)
    # skew 0 is uniform
    even = region_shares(hotspot(volume, count, skew=0, regions=regions, seed=3), regions)
    assert even[:10].sum() < 0.13


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.7, 1.0])
def test_write_fraction_holds_within_tolerance(fraction):
    ios = IOBatch.concat(uniform(MiB, 20_000, write_fraction=fraction, seed=11))
    assert np.mean(ios.write) == pytest.approx(fraction, abs=0.015)


def test_sizes_follow_their_weights_and_arrivals_their_rate():
    weights = {4096: 6, 16384: 3, 131072: 1}
    ios = IOBatch.concat(uniform(64 * MiB, 30_000, io_size=weights, rate=5000.0, seed=4))
    for size, weight in weights.items():
        assert np.mean(ios.length == size) == pytest.approx(weight / 10, abs=0.015)
    assert np.mean(np.diff(ios.time)) == pytest.approx(1 / 5000.0, rel=0.03)


def test_sequential_io_is_back_to_back_and_wraps():
    volume = 1 * MiB + 512
    ios = collect(sequential(volume, 500, start=512 * 1024, io_size={8192: 1, 12288: 1}))
    assert ios[0].offset == 512 * 1024
    wraps = 0
    for before, after in itertools.pairwise(ios):
        if after.offset == 0:
            wraps += 1
            assert before.offset + before.length + after.length > volume
        else:
            assert after.offset == before.offset + before.length
    assert wraps == pytest.approx(500 * 10240 / volume, abs=1)


def test_mixed_draws_from_components_by_weight_and_keeps_a_sequential_position():
    volume = 256 * MiB
    parts = [(sequential(volume, 0, io_size=65536), 1), (uniform(volume, 0, io_size=4096), 3)]
    ios = IOBatch.concat(mixed(parts, 20_000, seed=8))
    big = ios.length == 65536
    assert np.mean(big) == pytest.approx(0.25, abs=0.015)
    # The sequential component's I/Os, taken alone, run back to back (and wrap once).
    runs = np.arange(np.count_nonzero(big)) % (volume // 65536)
    assert runs[-1] < runs.size - 1
    assert np.array_equal(ios.offset[big], runs * 65536)


BAD_PARAMETERS = [
    (lambda: uniform(0, 10), "volume_size must be >= 1"),
    (lambda: uniform(2.5 * MiB, 10), "volume_size must be an integer"),
    (lambda: uniform(MiB, -1), "count must be >= 0"),
    (lambda: uniform(MiB, True), "count must be an integer"),
    (lambda: uniform(MiB, 10, io_size=0), "io_size must be >= 1"),
    (lambda: uniform(MiB, 10, io_size=2 * MiB), "does not fit in the volume"),
    (lambda: uniform(MiB, 10, io_size={}), "at least one size"),
    (lambda: uniform(MiB, 10, io_size={4096: 0}), "must not all be zero"),
    (lambda: uniform(MiB, 10, io_size={4096: -1}), "io_size weight must be a finite number"),
    (lambda: uniform(MiB, 10, alignment=0), "alignment must be >= 1"),
    (lambda: uniform(MiB, 10, write_fraction=1.5), "write_fraction must be a finite number"),
    (lambda: uniform(MiB, 10, write_fraction=math.nan), "write_fraction"),
    (lambda: uniform(MiB, 10, rate=0), "rate must be > 0"),
    (lambda: uniform(MiB, 10, rate=math.inf), "rate must be a finite number"),
    (lambda: uniform(MiB, 10, seed=-1), "seed must be >= 0"),
    (lambda: uniform(MiB, 10, batch_size=0), "batch_size must be >= 1"),
    (lambda: hotspot(MiB, 10, skew=-1), "skew must be a finite number >= 0"),
    (lambda: hotspot(MiB, 10, regions=0), "regions must be >= 1"),
    (lambda: sequential(MiB, 10, start=100), "must be a multiple of the alignment"),
    (lambda: sequential(MiB, 10, start=MiB), "below the volume size"),
    (lambda: mixed([], 10), "at least one"),
    (lambda: mixed([uniform(MiB, 0)], 10), "must be a \\(workload, weight\\) pair"),
    (lambda: mixed([("uniform", 1.0)], 10), "must be generated workloads"),
    (lambda: mixed([(uniform(MiB, 0), 0)], 10), "must not all be zero"),
    (lambda: mixed([(uniform(MiB, 0), 1), (uniform(2 * MiB, 0), 1)], 10), "one volume size"),
]


@pytest.mark.parametrize(("make", "message"), BAD_PARAMETERS)
def test_bad_generator_parameters_raise_parameter_error(make, message):
    with pytest.raises(ParameterError, match=message):
        make()


# -- replay ------------------------------------------------------------------------------------

G = 4096  # the tracking granularity of the replay tests


def model_of(ios: list[IO], size: int, pattern: bytes) -> tuple[bytearray, set[int]]:
    """The volume after the writes of ``ios`` and the chunks they touch, computed directly."""
    image = bytearray(size)
    chunks: set[int] = set()
    for io in ios:
        if io.write:
            image[io.offset : io.offset + io.length] = (pattern * (io.length // len(pattern) + 1))[
                : io.length
            ]
            chunks.update(range(io.offset // G, (io.offset + io.length - 1) // G + 1))
    return image, chunks


def tracked_chunks(session: Session) -> set[int]:
    bitmap = session.bitmap
    return {c for c in range(bitmap.chunks) if bitmap.tracking(c)}


@settings(max_examples=25)
@given(generated(batch_size=256), st.binary(min_size=1, max_size=5000))
def test_replay_onto_a_session_matches_a_model_and_tracks_exactly_the_chunks_written(case, pattern):
    workload, _, _ = case
    size = workload.volume_size
    lun = MemoryLUN(size)
    session = Session(lun, G)
    result = replay(session, workload, data=pattern)
    ios = collect(workload)
    image, chunks = model_of(ios, size, pattern)
    assert lun.read(0, size) == image
    assert tracked_chunks(session) == chunks
    writes = [io for io in ios if io.write]
    assert result.writes == len(writes) == session.stats.host_writes
    assert result.bytes_written == sum(io.length for io in writes)
    assert result.reads == result.bytes_read == 0
    assert result.seconds >= 0


def test_replay_onto_a_lun_and_a_session_writes_the_same_bytes():
    workload = mixed(
        [(hotspot(8 * MiB, 0, io_size={4096: 3, 65536: 1}), 3), (sequential(8 * MiB, 0), 1)],
        3000,
        seed=21,
    )
    plain, tracked = MemoryLUN(8 * MiB), MemoryLUN(8 * MiB)
    session = Session(tracked, G)
    a = replay(plain, workload)
    b = replay(session, workload)
    assert (a.writes, a.bytes_written) == (b.writes, b.bytes_written)
    assert plain.read(0, 8 * MiB) == tracked.read(0, 8 * MiB)
    assert plain.read(0, 8 * MiB).count(0) < 8 * MiB  # the default data is not zeros
    _, chunks = model_of(collect(workload), 8 * MiB, b"x")
    assert tracked_chunks(session) == chunks


def test_batches_feed_the_core_bitmap_directly():
    workload = hotspot(32 * MiB, 5000, io_size={512: 1, 4096: 2, 262144: 1}, seed=9)
    bitmap = DeltaBitmap(32 * MiB, G)
    for batch in workload:
        bitmap.record_writes(batch.offset[batch.write], batch.length[batch.write])
    session = Session(MemoryLUN(32 * MiB), G)
    replay(session, workload)
    assert {c for c in range(bitmap.chunks) if bitmap.tracking(c)} == tracked_chunks(session)


class Recorder:
    """A replay target that records the I/O it receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def write(self, offset, data):
        self.calls.append(("write", offset, len(data)))

    def read(self, offset, length):
        self.calls.append(("read", offset, length))
        return bytes(length)


@pytest.mark.parametrize("reads", [False, True])
def test_replay_issues_reads_only_when_asked(reads):
    workload = uniform(MiB, 400, write_fraction=0.5, io_size={512: 1, 8192: 1}, seed=2)
    target = Recorder()
    result = replay(target, workload, reads=reads)
    kept = [io for io in collect(workload) if io.write or reads]
    assert target.calls == [("write" if io.write else "read", io.offset, io.length) for io in kept]
    assert result.reads == sum(not io.write for io in kept)
    assert result.bytes_read == sum(io.length for io in kept if not io.write)


@pytest.mark.parametrize("speed", [1.0, 4.0])
def test_timed_replay_keeps_the_recorded_pace(tmp_path, speed):
    path = tmp_path / "paced.log"
    ops = [(i * 10_000, "f", "write", i * 4096, 4096) for i in range(5)]  # every 10 ms
    write_lines(path, fio_v3_lines(ops))
    target = Recorder()
    result = replay(target, read_fio(path), timed=True, speed=speed)
    assert result.writes == 5
    assert [call[1] for call in target.calls] == [i * 4096 for i in range(5)]
    assert result.seconds >= 0.04 / speed


def test_replay_accepts_a_single_batch():
    batch = IOBatch([0.0, 0.0], [0, 8192], [4096, 512], [True, True])
    lun = MemoryLUN(3 * G)
    result = replay(lun, batch, data=b"ab")
    assert (result.writes, result.bytes_written) == (2, 4608)
    assert lun.read(0, 4096) == b"ab" * 2048
    assert lun.read(8192, 512) == b"ab" * 256


def test_replay_out_of_the_lun_raises_range_error_after_the_writes_before(tmp_path):
    path = tmp_path / "big.log"
    write_lines(path, fio_v3_lines([(0, "f", "write", 0, 4096), (1, "f", "write", G, 4096)]))
    lun = MemoryLUN(G)
    with pytest.raises(RangeError):
        replay(lun, read_fio(path), data=b"z")
    assert lun.read(0, G) == b"z" * G


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data": b""}, "non-empty"),
        ({"speed": 0}, "speed must be > 0"),
        ({"speed": -2.0}, "speed must be a finite number"),
        ({"reads": True}, "needs a target with read"),
    ],
)
def test_replay_refuses_bad_parameters(kwargs, message):
    class WriteOnly:
        def write(self, offset, data):
            raise AssertionError("nothing may be written")

    with pytest.raises(ParameterError, match=message):
        replay(WriteOnly(), uniform(MiB, 10), **kwargs)
