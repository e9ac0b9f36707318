"""The ``analyze``, ``replay`` and ``bench`` commands of the ``isc`` command line.

``isc.cli`` registers them with :func:`add_commands` and runs them with
:func:`run`. Bad arguments end in argparse's one-line error and exit status
2; an :class:`~isc.errors.IscError` or ``OSError`` while running prints one
line to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from isc import _plot, analysis, bench, workload
from isc._layout import DEFAULT_GRANULARITY, MAX_GRANULARITY, MIN_GRANULARITY
from isc._units import format_bytes, parse_size, size_label
from isc.errors import IscError, ParameterError
from isc.lun import FileLUN
from isc.session import DEFAULT_SAVE_AREA, Session

GENERATORS = ("uniform", "hotspot", "sequential")
DEFAULT_VOLUME = 1 << 30
DEFAULT_COUNT = 100_000

# -- argument types ----------------------------------------------------------------------


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 bytes")
    return value


def _write_size(text: str) -> int:
    value = _size(text)
    if value > bench.MAX_WRITE:
        raise argparse.ArgumentTypeError(
            f"write size {text!r} must be at most {size_label(bench.MAX_WRITE)}"
        )
    return value


def _granularity(text: str) -> int:
    value = _size(text)
    if not (MIN_GRANULARITY <= value <= MAX_GRANULARITY and value & (value - 1) == 0):
        raise argparse.ArgumentTypeError(
            f"granularity {text!r} must be a power of two from 2K to 64K"
        )
    return value


def _list(item):
    def parse(text: str) -> list[int]:
        values = [item(part) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} names nothing; give a comma-separated list")
        return values

    return parse


LEAST, MOST = 1e-6, 1e9
"""The range of :func:`_positive`: seconds, rates and speeds whose waits fit a timer
(``threading.TIMEOUT_MAX``, about 9.2e9 s) whether used as given or inverted."""


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    if not LEAST <= value <= MOST:
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range: give a number from {LEAST:g} to {MOST:g}"
        )
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _lun_kinds(text: str) -> list[str]:
    kinds = [part.strip() for part in text.split(",") if part.strip()]
    wrong = [kind for kind in kinds if kind not in bench.LUN_KINDS]
    if wrong or not kinds:
        raise argparse.ArgumentTypeError(f"{text!r}: give memory, file or memory,file")
    return kinds


# -- registration ------------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add the ``analyze``, ``replay`` and ``bench`` subcommands to ``commands``."""
    analyze = commands.add_parser(
        "analyze",
        help="simulate periodic updates at each granularity and recommend one",
        description="Simulate periodic incremental updates of a trace or generated workload "
        "at each granularity: bytes to transfer, COFW traffic (isc, without clear-as-sent, "
        "classic snapshot), save-area high water, bitmap memory, tracking cost.",
    )
    _workload_arguments(analyze)
    model = analyze.add_argument_group("the updates")
    model.add_argument(
        "--granularity",
        type=_list(_granularity),
        default=list(analysis.DEFAULT_GRANULARITIES),
        metavar="LIST",
        help="comma-separated chunk sizes (default 2K,4K,8K,16K,32K,64K)",
    )
    model.add_argument(
        "--interval",
        type=_positive,
        default=analysis.DEFAULT_INTERVAL,
        metavar="SECONDS",
        help=f"seconds between updates (default {analysis.DEFAULT_INTERVAL:g})",
    )
    model.add_argument(
        "--bandwidth",
        type=_size,
        default=int(analysis.DEFAULT_BANDWIDTH),
        metavar="SIZE",
        help="copy bandwidth in bytes per second (default 100M)",
    )
    model.add_argument(
        "--save-area",
        type=_size,
        default=DEFAULT_SAVE_AREA,
        metavar="SIZE",
        help="save area capacity (default 256M)",
    )
    model.add_argument(
        "--cofw-weight",
        type=float,
        default=1.0,
        metavar="W",
        help="cost = bytes transferred + W x COFW bytes (default 1)",
    )
    _output_arguments(analyze, csv=True)
    analyze.set_defaults(tool_parser=analyze, tool=_analyze)

    replay = commands.add_parser(
        "replay",
        help="replay a workload onto a file LUN through a session",
        description="Write a trace or generated workload to a file LUN through an unmarked "
        "session (or straight to the LUN with --no-session) and report the rate. A missing "
        "LUN file is created with the workload's volume size. The writes go as fast as the "
        "LUN takes them, or at the workload's pace with --timed or --rate.",
    )
    _workload_arguments(replay)
    target = replay.add_argument_group("the replay")
    target.add_argument("--lun", required=True, metavar="FILE", help="the file LUN to write")
    target.add_argument(
        "--granularity",
        type=_granularity,
        default=DEFAULT_GRANULARITY,
        metavar="SIZE",
        help="the session's chunk size (default 64K)",
    )
    target.add_argument(
        "--no-session", action="store_true", help="write straight to the LUN, untracked"
    )
    target.add_argument(
        "--timed",
        action="store_true",
        help="keep the workload's pace: its timestamps, or --rate (which implies --timed)",
    )
    target.add_argument(
        "--speed",
        type=_positive,
        default=1.0,
        metavar="X",
        help="with --timed or --rate, replay X times faster (default 1)",
    )
    target.add_argument("--reads", action="store_true", help="issue the reads too")
    target.add_argument("--json", action="store_true", help="print the result as JSON")
    replay.set_defaults(tool_parser=replay, tool=_replay)

    bench_parser = commands.add_parser("bench", help="microbenchmarks")
    benches = bench_parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    write_path = benches.add_parser(
        "write-path",
        help="host writes per second with and without a session",
        description="Time host writes on a MemoryLUN and a FileLUN: the LUN's own write, "
        "then through a session at each granularity, unmarked, marked without COFW and "
        "marked with COFW. Figures vary between runs; compare rows of one run.",
    )
    write_path.add_argument(
        "--granularity",
        type=_list(_granularity),
        default=list(bench.DEFAULT_GRANULARITIES),
        metavar="LIST",
        help="comma-separated chunk sizes (default 2K,4K,8K,16K,32K,64K)",
    )
    write_path.add_argument(
        "--sizes",
        type=_list(_write_size),
        default=list(bench.DEFAULT_SIZES),
        metavar="LIST",
        help="comma-separated write sizes (default 4K,64K)",
    )
    write_path.add_argument(
        "--count", type=_count, default=1024, metavar="N", help="writes per round (default 1024)"
    )
    write_path.add_argument(
        "--repeats", type=_count, default=5, metavar="N", help="timed rounds (default 5)"
    )
    write_path.add_argument(
        "--lun",
        type=_lun_kinds,
        default=list(bench.LUN_KINDS),
        metavar="LIST",
        help="memory, file or memory,file (default both)",
    )
    write_path.add_argument(
        "--dir", metavar="DIR", help="directory of the FileLUN (default /dev/shm or temp)"
    )
    _output_arguments(write_path, csv=False)
    write_path.set_defaults(tool_parser=write_path, tool=_bench_write_path)


def _workload_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the workload: --trace FILE, or --generate KIND")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", metavar="FILE", help="a block trace (.gz is read through gzip)")
    source.add_argument("--generate", choices=GENERATORS, help="a seeded generated workload")
    group.add_argument(
        "--format",
        choices=("msr", "blkparse", "fio"),
        help="the trace's format (default: told by its first line: MSR Cambridge CSV, "
        "blkparse output or a fio iolog)",
    )
    group.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed trace lines (and I/O past --volume-size) instead of stopping",
    )
    group.add_argument(
        "--volume-size",
        type=_size,
        metavar="SIZE",
        help="volume size; default: 1G generated, a trace's extent",
    )
    group.add_argument("--count", type=_count, metavar="N", help="generated I/Os (default 100000)")
    group.add_argument("--io-size", type=_size, metavar="SIZE", help="generated I/O size")
    group.add_argument(
        "--rate",
        type=_positive,
        metavar="IOPS",
        help="I/Os per second: generated arrivals (default 1000), or a trace's I/Os evenly "
        "spaced in place of its own times (for traces without timestamps, such as fio "
        "version 2 iologs)",
    )
    group.add_argument(
        "--write-fraction", type=_fraction, metavar="F", help="generated writes share (0-1)"
    )
    group.add_argument("--skew", type=float, metavar="S", help="hotspot Zipf exponent")
    group.add_argument("--seed", type=int, metavar="N", help="generator seed (default 0)")


def _output_arguments(parser: argparse.ArgumentParser, *, csv: bool) -> None:
    output = parser.add_argument_group("output (default: a table on stdout)")
    output.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write JSON to FILE, or to stdout instead of the table",
    )
    if csv:
        output.add_argument(
            "--csv",
            nargs="?",
            const="-",
            metavar="FILE",
            help="write CSV to FILE, or to stdout instead of the table",
        )
    output.add_argument("--plot", metavar="FILE.png", help="draw a PNG (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    """Run the command ``args`` names; return the exit status.

    Argument combinations argparse cannot check end in the subcommand's usage
    error (``SystemExit(2)``).
    """
    parser = args.tool_parser
    if getattr(args, "json", None) == "-" and getattr(args, "csv", None) == "-":
        parser.error("--json and --csv cannot both go to stdout; give one of them a FILE")
    if hasattr(args, "generate"):
        _check_workload_arguments(args, parser)
    name = "bench write-path" if args.command == "bench" else args.command
    try:
        if getattr(args, "plot", None):
            _plot.require()
        return args.tool(args)
    except (IscError, OSError) as exc:
        print(f"isc {name}: error: {exc}", file=sys.stderr)
        return 1


# -- workloads ---------------------------------------------------------------------------

_GENERATOR_OPTIONS = ("count", "io_size", "write_fraction", "skew", "seed")


def _check_workload_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.trace is not None:
        given = [
            f"--{option.replace('_', '-')}"
            for option in _GENERATOR_OPTIONS
            if getattr(args, option) is not None
        ]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            parser.error(f"{', '.join(given)} {verb} to --generate only")
    else:
        if args.format is not None or args.skip_bad:
            parser.error("--format and --skip-bad apply to --trace only")
        if args.skew is not None and args.generate != "hotspot":
            parser.error("--skew applies to --generate hotspot only")


def _workload(args: argparse.Namespace, volume_size: int | None) -> workload.Workload:
    """The workload the arguments describe; ``volume_size`` bounds a trace's I/O."""
    if args.trace is not None:
        return workload.read_trace(
            args.trace,
            args.format,
            skip_bad=args.skip_bad,
            volume_size=volume_size,
            rate=args.rate,
        )
    options = {
        "io_size": args.io_size,
        "rate": args.rate,
        "write_fraction": args.write_fraction,
        "seed": args.seed,
    }
    if args.generate == "hotspot":
        options["skew"] = args.skew
    options = {key: value for key, value in options.items() if value is not None}
    make = getattr(workload, args.generate)
    return make(volume_size or DEFAULT_VOLUME, args.count or DEFAULT_COUNT, **options)


def _trace_note(name: str, source: workload.Workload) -> None:
    """Tell stderr what a trace reader skipped, so stdout stays a clean report."""
    if isinstance(source, workload.TraceReader) and source.stats.skipped_bad:
        print(
            f"isc {name}: skipped {source.stats.skipped_bad} malformed or out-of-volume lines of "
            f"{source.path} (--skip-bad)",
            file=sys.stderr,
        )


def _emit(text: str, where: str | None) -> bool:
    """Write ``text`` to file ``where`` or stdout (``"-"``); True if it went to stdout."""
    if where is None:
        return False
    if where == "-":
        sys.stdout.write(text)
        return True
    Path(where).write_text(text)
    return False


# -- the commands ------------------------------------------------------------------------


def _analyze(args: argparse.Namespace) -> int:
    source = _workload(args, args.volume_size)
    result = analysis.analyze(
        source,
        args.granularity,
        interval=args.interval,
        bandwidth=args.bandwidth,
        save_area=args.save_area,
        cofw_weight=args.cofw_weight,
        volume_size=args.volume_size,
    )
    _trace_note("analyze", source)
    printed = _emit(result.to_json(), args.json) | _emit(result.to_csv(), args.csv)
    if args.plot:
        result.plot(args.plot)
    if not printed:
        sys.stdout.write(result.table())
    return 0


def _replay(args: argparse.Namespace) -> int:
    path = Path(args.lun)
    if path.exists():
        lun = FileLUN(path)
        if args.volume_size is not None and args.volume_size > lun.size:
            lun.close()
            raise ParameterError(
                f"--volume-size {args.volume_size} is larger than the LUN {path} ({lun.size} bytes)"
            )
        source = _workload(args, args.volume_size or lun.size)
    else:
        size = args.volume_size
        source = _workload(args, size)
        if size is None:
            size = source.volume_size or analysis.workload_extent(source)
        lun = FileLUN.create(path, size)
    timed = args.timed or args.rate is not None
    with lun:
        session = None if args.no_session else Session(lun, args.granularity, name=str(path))
        done = workload.replay(
            session or lun, source, timed=timed, speed=args.speed, reads=args.reads
        )
        lun.flush()
    _trace_note("replay", source)
    if (
        timed
        and isinstance(source, workload.TraceReader)
        and source.rate is None
        and source.stats.ios > 1
        and not source.stats.duration
    ):
        print(
            f"isc replay: {source.path} has no timestamps (all its I/Os are at time 0), so "
            "--timed kept no pace; give it one with --rate IOPS",
            file=sys.stderr,
        )
    tracked = None if session is None else session.bitmap.tracking_count
    report = {
        "lun": os.fspath(path),
        "lun_size": lun.size,
        "workload": str(source),
        "session": not args.no_session,
        "granularity": None if args.no_session else args.granularity,
        "timed": timed,
        "rate": args.rate,
        "speed": args.speed if timed else None,
        "writes": done.writes,
        "bytes_written": done.bytes_written,
        "reads": done.reads,
        "bytes_read": done.bytes_read,
        "seconds": done.seconds,
        "writes_per_second": done.writes / done.seconds if done.seconds else None,
        "chunks_tracked": tracked,
    }
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    how = (
        "straight to the LUN (no session)"
        if args.no_session
        else f"through a session at {size_label(args.granularity)} granularity"
    )
    pace = f", timed at {args.speed:g}x" if timed else ""
    rate = done.writes / done.seconds if done.seconds else float("inf")
    lines = [
        f"replayed {source} onto {path} ({format_bytes(lun.size, long=True)}) {how}{pace}",
        f"{done.writes} writes ({format_bytes(done.bytes_written, long=True)}), "
        f"{done.reads} reads in {done.seconds:.3f} s: {rate:,.0f} writes/s, "
        f"{format_bytes(done.bytes_written / done.seconds if done.seconds else 0, long=True)}/s",
    ]
    if session is not None:
        lines.append(
            f"tracking bitmap: {tracked} of {session.bitmap.chunks} chunks set, "
            f"to copy at the next update"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _bench_write_path(args: argparse.Namespace) -> int:
    result = bench.write_path(
        args.granularity,
        args.sizes,
        count=args.count,
        repeats=args.repeats,
        luns=args.lun,
        directory=args.dir,
    )
    printed = _emit(result.to_json(), args.json)
    if args.plot:
        result.plot(args.plot)
    if not printed:
        sys.stdout.write(result.table())
    return 0
