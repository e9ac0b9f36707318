"""isc beside QEMU's incremental backup: the same volume, workload and machine, one run.

QEMU: ``qemu-storage-daemon`` holds the source as a raw blockdev with a
dirty bitmap and a writable NBD export; ``blockdev-backup`` (a
copy-before-write filter plus a block-copy job) makes full and incremental
copies to a raw destination file, driven over QMP (:mod:`qemu`). isc:
``isc serve`` holds the source through a persistent session and exports it
over NBD; its control port runs marked full, unmarked full and incremental
copies to a destination file. Host writes reach both through their NBD
export from the same pipelined writer (:mod:`host_writer`, libnbd).

Figures, per system: the full copy of the idle volume; the incremental copy
after 64 KiB writes changed ``--change`` of the volume (median of
``--rounds``); the host's 4 KiB random write rate at each queue depth while
idle and during a full copy (isc: marked and unmarked), with the worst
stall; QEMU also with each ``--perf`` setting of ``x-perf`` beside its
defaults; and ``cp`` and ``nbdcopy`` of the same volume as context.

Every copy is checked byte for byte against the image it must hold: the
source when idle, a snapshot taken at the copy's point in time during host
writes, and after an unmarked full copy (which leaves the destination
inconsistent by design) the source at the next incremental copy. Any
mismatch makes the run exit 1. Prints a Markdown table; ``--json`` writes
every measurement.

    .venv/bin/python benchmarks/compare_qemu.py [--size 1G] [--json results.json]
        [--serve-option=--switch-interval=5 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datapath import SHM, first_difference, shm_free, write_pattern, write_random
from host_writer import HostWriter, make_changes, writer_python
from qemu import StorageDaemon

import isc
from isc._units import format_bytes, parse_size
from isc.auth import Credentials, connect

HOST = "127.0.0.1"
ISC = [sys.executable, "-m", "isc.cli"]
WAIT = 60.0
"""Seconds any daemon gets to start or stop, and any request that is not a copy."""
COPY_WAIT = 900.0
"""Seconds any one copy may take."""
STALL_TARGET_MS = 3.0
"""The worst host write stall isc may show during a full copy (QEMU's export shows 1-2 ms)."""
DEFAULT_PERF = ("8:0", "16:0:copy-range", "64:0:copy-range")
"""``x-perf`` settings tried for QEMU's tuned full copy: max-workers:max-chunk
(0: no limit), then ``:copy-range`` to copy with ``copy_file_range``."""


UnderWrites = Callable[[HostWriter, int], tuple[float, dict]]
"""One copy under host writes at a queue depth: its seconds and the writer's stats."""


# -- checking ----------------------------------------------------------------------------------
@dataclass
class Checks:
    """Every verification of the run, in order."""

    done: list[dict] = field(default_factory=list)

    def verify(self, what: str, expected: Path, actual: Path) -> None:
        at = first_difference(actual, expected, expected.stat().st_size)
        self.done.append({"copy": what, "ok": at is None, "first_difference": at})
        if at is not None:
            print(f"MISMATCH: {what}: {actual.name} differs from {expected.name} at byte {at}")

    @property
    def failed(self) -> list[dict]:
        return [check for check in self.done if not check["ok"]]


def scrub(path: Path, size: int) -> None:
    """Make ``path`` ``size`` zero bytes, overwriting in place.

    A destination's pages stay allocated from one copy to the next, so no
    copy pays for allocating them (on tmpfs here a new file was written at
    less than half the speed of an existing one, and the first use of guest
    memory on this virtual machine is slower still); the zeros make sure
    each check sees what the copy wrote, not what an earlier one left.
    """
    with open(path, "ab") as f:
        f.truncate(size)
    write_pattern(path, size, 0)


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def combine(runs: list[tuple[float, dict]]) -> dict:
    """One set of writer stats for several copies' windows: ``(seconds, stats)`` each.

    The rate is all writes over all the windows' time; ``max_gap_us``, ``max``
    and ``p99`` are the worst window's (so ``p99`` is an upper bound);
    ``copy_seconds`` is the median copy.
    """
    windows = [stats for _, stats in runs]
    writes = sum(w["writes"] for w in windows)
    seconds = sum(w["seconds"] for w in windows)
    return {
        "writes": writes,
        "seconds": seconds,
        "rate": writes / seconds if seconds else 0.0,
        "p99": max((w["p99"] for w in windows if w["p99"] is not None), default=None),
        "max": max((w["max"] for w in windows if w["max"] is not None), default=None),
        "max_gap_us": max(w["max_gap_us"] for w in windows),
        "copy_seconds": statistics.median(seconds for seconds, _ in runs),
        "copies": [{"copy_seconds": seconds, **stats} for seconds, stats in runs],
    }


# -- isc serve ---------------------------------------------------------------------------------
class IscServer:
    """``isc serve`` on a session directory (or a LUN), with its export URI and a control
    connection; ``options`` go to isc serve, ``credentials`` authenticate the connection."""

    def __init__(
        self, state: Path, log: Path, *options: str, credentials: Credentials | None = None
    ) -> None:
        self.log = open(log, "wb")  # noqa: SIM115 - closed in close()
        listen = ["--listen", f"{HOST}:0", "--control", f"{HOST}:0"]
        self.proc = subprocess.Popen(
            [*ISC, "serve", str(state), *listen, *options],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.uri = ""
        port = 0
        try:
            for line in self._lines():
                kind, _, rest = line.partition(" ")
                if kind == "export":
                    self.uri = rest.split()[1]
                elif kind == "control":
                    port = int(rest.rpartition(":")[2])
            self.sock = connect((HOST, port), WAIT, credentials)
        except BaseException:
            self.close()
            raise
        self._ids = iter(range(1, 1 << 62))
        self._buffer = b""

    def _lines(self) -> Iterator[str]:
        """What the server prints before ``ready`` (bounded by WAIT)."""
        out = self.proc.stdout
        assert out is not None
        deadline = time.monotonic() + WAIT
        data = b""
        while True:
            if not select.select([out], [], [], max(deadline - time.monotonic(), 0))[0]:
                raise TimeoutError(f"isc serve printed no 'ready' within {WAIT} s")
            chunk = os.read(out.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"isc serve exited: {Path(self.log.name).read_text()}")
            data += chunk
            *lines, data = data.split(b"\n")
            for line in lines:
                if line == b"ready":
                    return
                yield line.decode()

    def send(self, op: str, **fields: object) -> int:
        rid = next(self._ids)
        self.sock.sendall(json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n")
        return rid

    def receive(self, rid: int, timeout: float = WAIT) -> dict:
        """The reply to request ``rid``; raises ``RuntimeError`` if it is not ok."""
        self.sock.settimeout(timeout)
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("isc serve closed the control connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply = json.loads(line)
        if reply["id"] != rid or not reply["ok"]:
            raise RuntimeError(f"isc serve: request {rid} failed: {reply}")
        return reply["info"]

    def request(self, op: str, timeout: float = WAIT, **fields: object) -> dict:
        return self.receive(self.send(op, **fields), timeout)

    def close(self) -> None:
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.log.close()


# -- the run -----------------------------------------------------------------------------------
@dataclass
class Run:
    """One comparison: the volume, its files, and everything measured."""

    args: argparse.Namespace
    work: Path
    checks: Checks = field(default_factory=Checks)
    results: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.args.size

    @property
    def source(self) -> Path:
        return self.work / "source.img"

    def path(self, name: str) -> Path:
        return self.work / name

    def snapshot(self) -> Path:
        """The source as it is now (no host write in flight): a point-in-time image."""
        image = self.path("point-in-time.img")
        shutil.copyfile(self.source, image)
        return image

    def load_windows(self, uri: str, copies: dict[str, UnderWrites]) -> dict[str, dict]:
        """At each queue depth: the idle write rate, then each copy under host writes.

        ``copies[name](writer, qd)`` runs one copy with ``writer`` paused at
        its start: it resumes the writer once the copy's point in time is
        fixed, pauses it when the copy ends, and returns the copy's seconds
        and the writer's stats for that window. Each copy runs
        ``--load-repeat`` times; :func:`combine` merges the windows.
        """
        out: dict[str, dict] = {}
        for qd in self.args.qd:
            with HostWriter(uri, qd=qd, block=4096, seed=self.args.seed + qd) as writer:
                writer.run()
                time.sleep(self.args.idle_seconds)  # the measurement window itself
                windows = {"idle": writer.pause()}
                for name, copy in copies.items():
                    runs = [copy(writer, qd) for _ in range(self.args.load_repeat)]
                    windows[name] = combine(runs)
                out[str(qd)] = windows
        return out

    def best_of(self, what: str, dest: Path, copy: Callable[[int], float]) -> float:
        """The fastest of ``--repeat`` idle full copies ``copy(repeat)`` to a new ``dest``.

        Each copy is checked; every time is kept in the results.
        """
        seconds = []
        for repeat in range(self.args.repeat):
            scrub(dest, self.size)
            seconds.append(copy(repeat))
            self.checks.verify(what, self.source, dest)
        self.results.setdefault("repeats", {})[what] = seconds
        return min(seconds)

    # -- context ---------------------------------------------------------------------
    def context(self, name: str, command: list[object]) -> None:
        """Time ``command`` copying the idle source to a new file; check the copy."""
        out = self.path("context.img")
        out.unlink(missing_ok=True)
        self.results.setdefault("context", {})[name] = timed(lambda: run_tool(*command, out))
        self.checks.verify(name, self.source, out)
        out.unlink()

    # -- QEMU ------------------------------------------------------------------------
    def qemu(self, daemon: StorageDaemon) -> None:
        self.context("nbdcopy from QEMU's export", ["nbdcopy", daemon.uri])
        g = self.args.granularity
        dest = self.path("qemu-dest.img")
        scrub(dest, self.size)
        daemon.add_target("dest", dest)
        figures: dict = {}

        def backup(sync: str, **options: object) -> float:
            started = time.perf_counter()
            job = daemon.start_backup("dest", sync=sync, **options)
            daemon.wait_job(job, timeout=COPY_WAIT)
            return time.perf_counter() - started

        # The bitmap starts with the first full copy, in the same transaction.
        bitmap = {"bitmap": "isc-compare", "granularity": g}
        figures["full_default"] = self.best_of(
            "QEMU full copy, defaults",
            dest,
            lambda repeat: backup("full", **(bitmap if repeat == 0 else {})),
        )
        figures["full_perf"] = {
            setting: self.best_of(
                f"QEMU full copy, x-perf {setting}",
                dest,
                lambda _, setting=setting: backup("full", perf=x_perf(setting)),
            )
            for setting in self.args.perf
        }
        figures["incremental"] = self._incremental(
            daemon.uri, dest, "QEMU", lambda: backup("incremental", bitmap="isc-compare")
        )

        def under_writes(writer: HostWriter, qd: int) -> tuple[float, dict]:
            image = self.snapshot()
            scrub(dest, self.size)
            started = time.perf_counter()
            job = daemon.start_backup("dest", sync="full")
            writer.run()
            daemon.wait_job(job, timeout=COPY_WAIT)
            seconds = time.perf_counter() - started
            stats = writer.pause()
            self.checks.verify(f"QEMU full copy under writes, qd {qd}", image, dest)
            return seconds, stats

        figures["load"] = self.load_windows(daemon.uri, {"full": under_writes})
        daemon.remove_target("dest")
        self.results["qemu"] = figures

    # -- isc -------------------------------------------------------------------------
    def isc(self, server: IscServer, dest: Path) -> None:
        self.context("nbdcopy from isc's export", ["nbdcopy", server.uri])
        figures: dict = {}

        def copy(mode: str) -> float:
            return timed(lambda: server.request("copy", timeout=COPY_WAIT, mode=mode))

        def incremental() -> float:
            return timed(lambda: (server.request("mark"), copy("incremental")))

        figures["full_unmarked"] = self.best_of(
            "isc unmarked full copy", dest, lambda _: copy("full-unmarked")
        )
        figures["full_marked"] = self.best_of("isc marked full copy", dest, lambda _: copy("full"))
        figures["incremental"] = self._incremental(server.uri, dest, "isc", incremental)

        def marked(writer: HostWriter, qd: int) -> tuple[float, dict]:
            image = self.snapshot()
            scrub(dest, self.size)
            started = time.perf_counter()
            server.request("mark", full=True)
            writer.run()
            copy("incremental")
            seconds = time.perf_counter() - started
            stats = writer.pause()
            self.checks.verify(f"isc marked full copy under writes, qd {qd}", image, dest)
            return seconds, stats

        def unmarked(writer: HostWriter, qd: int) -> tuple[float, dict]:
            scrub(dest, self.size)
            started = time.perf_counter()
            rid = server.send("copy", mode="full-unmarked")
            writer.run()
            server.receive(rid, COPY_WAIT)
            seconds = time.perf_counter() - started
            stats = writer.pause()
            # Inconsistent by design until the next incremental copy, which fixes it.
            incremental()
            what = f"isc unmarked full copy under writes, then an incremental copy, qd {qd}"
            self.checks.verify(what, self.source, dest)
            return seconds, stats

        figures["load"] = self.load_windows(server.uri, {"marked": marked, "unmarked": unmarked})
        self.results["isc"] = figures

    def _incremental(self, uri: str, dest: Path, who: str, copy: Callable[[], float]) -> list:
        """``--rounds`` of: change ``--change`` of the volume over NBD, then ``copy()``."""
        seconds = []
        for round_ in range(self.args.rounds):
            make_changes(
                uri, self.args.change, block=65536, qd=8, seed=self.args.seed + 100 + round_
            )
            seconds.append(copy())
            self.checks.verify(f"{who} incremental copy {round_ + 1}", self.source, dest)
        return seconds


def x_perf(setting: str) -> dict:
    """QEMU's ``x-perf`` for ``WORKERS:CHUNK[:copy-range]``."""
    workers, chunk, *rest = setting.split(":")
    if rest not in ([], ["copy-range"]):
        raise ValueError(f"an x-perf setting is WORKERS:CHUNK[:copy-range], got {setting!r}")
    perf = {"max-workers": int(workers), "max-chunk": parse_size(chunk)}
    return {**perf, "use-copy-range": bool(rest)}


def run_tool(*args: object) -> None:
    subprocess.run([os.fspath(a) for a in args], check=True, timeout=COPY_WAIT)


@contextmanager
def isc_session(run: Run) -> Iterator[tuple[IscServer, Path]]:
    """A persistent session on the source with one destination, served with a control port.

    Its save area holds the whole volume: during a marked full copy under
    random writes nearly every unsent chunk may need its old data saved
    (QEMU writes that data straight to the target instead).
    """
    state, dest = run.path("isc-state"), run.path("isc-dest.img")
    scrub(dest, run.size)
    save_area = f"{run.size},{run.path('isc-save-area')}"
    options = ["--granularity", str(run.args.granularity), "--save-area", save_area]
    for command in (["create", state, "--source", run.source, *options], ["add-dest", state, dest]):
        subprocess.run([*ISC, *command], check=True, timeout=WAIT, capture_output=True)
    server = IscServer(state, run.path("isc-serve.log"), *run.args.serve_option)
    try:
        yield server, dest
    finally:
        server.close()


# -- report ------------------------------------------------------------------------------------
def rate(seconds: float, size: int) -> str:
    return f"{seconds:.3f} s ({format_bytes(size / seconds)}/s)"


def stall(stats: dict) -> str:
    return f"{stats['max_gap_us'] / 1000:.1f} ms"


def report(run: Run) -> tuple[list[str], list[dict]]:
    """The Markdown table and the targets (each with ``met``)."""
    size, results = run.size, run.results
    q, i = results["qemu"], results["isc"]
    best_setting, best = min(q["full_perf"].items(), key=lambda kv: kv[1], default=("", np.inf))
    tuned_seconds = min(best, q["full_default"])
    tuned = "defaults" if tuned_seconds == q["full_default"] else f"x-perf {best_setting}"
    q_inc, i_inc = statistics.median(q["incremental"]), statistics.median(i["incremental"])
    changed = format_bytes(round(size * run.args.change / 65536) * 65536)
    lines = [
        f"| {format_bytes(size)} volume, {format_bytes(run.args.granularity)} granularity "
        "| QEMU | isc | isc ÷ QEMU |",
        "|---|---|---|---|",
        f"| incremental copy after {changed} of 64 KiB writes (median of {run.args.rounds}) "
        f"| {q_inc * 1e3:.1f} ms | {i_inc * 1e3:.1f} ms | {i_inc / q_inc:.2f} |",
        f"| full copy, idle: QEMU defaults / isc marked | {rate(q['full_default'], size)} "
        f"| {rate(i['full_marked'], size)} | {i['full_marked'] / q['full_default']:.2f} |",
        f"| full copy, idle: QEMU tuned ({tuned}) / isc marked | {rate(tuned_seconds, size)} "
        f"| {rate(i['full_marked'], size)} | {i['full_marked'] / tuned_seconds:.2f} |",
        f"| full copy, idle: isc unmarked | | {rate(i['full_unmarked'], size)} "
        f"| {i['full_unmarked'] / tuned_seconds:.2f} |",
    ]
    for setting, seconds in q["full_perf"].items():
        lines.append(f"| full copy, idle: QEMU x-perf {setting} | {rate(seconds, size)} | | |")
    for name, seconds in results["context"].items():
        lines.append(f"| context: {name} | {rate(seconds, size)} | | |")
    for qd in map(str, run.args.qd):
        qw, iw = q["load"][qd], i["load"][qd]
        lines.append(
            f"| host 4 KiB writes, qd {qd}, idle | {qw['idle']['rate']:,.0f}/s, "
            f"stall {stall(qw['idle'])} | {iw['idle']['rate']:,.0f}/s, stall {stall(iw['idle'])} "
            f"| {iw['idle']['rate'] / qw['idle']['rate']:.2f} |"
        )
        for label, q_name, i_name in (
            ("a marked", "full", "marked"),
            ("an unmarked", None, "unmarked"),
        ):
            iw_ = iw[i_name]
            qcell = ""
            if q_name is not None:
                qw_ = qw[q_name]
                qcell = (
                    f"{qw_['rate'] / qw['idle']['rate']:.0%} of idle, stall {stall(qw_)}, "
                    f"copy {qw_['copy_seconds']:.2f} s"
                )
            icell = (
                f"{iw_['rate'] / iw['idle']['rate']:.0%} of idle, stall {stall(iw_)}, "
                f"copy {iw_['copy_seconds']:.2f} s"
            )
            lines.append(
                f"| host writes, qd {qd}, during {label} full copy | {qcell} | {icell} | |"
            )
    targets = [
        {
            "target": "isc incremental no slower than QEMU's",
            "isc": i_inc,
            "qemu": q_inc,
            "met": i_inc <= q_inc,
        },
        {
            "target": "isc marked full copy at least as fast as QEMU tuned",
            "isc": i["full_marked"],
            "qemu": tuned_seconds,
            "met": i["full_marked"] <= tuned_seconds,
        },
    ]
    for qd in map(str, run.args.qd):
        iw = i["load"][qd]
        for name, floor in (("marked", 0.5), ("unmarked", 0.8)):
            share = iw[name]["rate"] / iw["idle"]["rate"]
            targets.append(
                {
                    "target": f"isc host writes during a {name} full copy >= {floor:.0%} "
                    f"of idle, qd {qd}",
                    "isc": share,
                    "met": share >= floor,
                }
            )
        for label, name in (("a marked", "marked"), ("an unmarked", "unmarked")):
            worst = iw[name]["max_gap_us"] / 1000
            targets.append(
                {
                    "target": f"isc worst host write stall during {label} full copy "
                    f"<= {STALL_TARGET_MS:g} ms, qd {qd}",
                    "isc": worst,
                    "met": worst <= STALL_TARGET_MS,
                }
            )
    return lines, targets


# -- main --------------------------------------------------------------------------------------
def work_directory(requested: str | None, size: int) -> str:
    """``requested``, else /dev/shm when it has room for the run's files, else the temp dir."""
    if requested:
        return requested
    needed = 6 * size + (256 << 20)  # source, 2 destinations, save area, snapshot, a copy
    return str(SHM) if shm_free() >= needed else tempfile.gettempdir()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="volume size (1G)")
    parser.add_argument(
        "--granularity", type=parse_size, default=65536, help="tracking granularity (64K)"
    )
    parser.add_argument(
        "--change", type=float, default=0.01, help="fraction changed before each incremental"
    )
    parser.add_argument("--rounds", type=int, default=5, help="incremental copies per system")
    parser.add_argument(
        "--repeat", type=int, default=5, help="idle full copies per figure (the best counts)"
    )
    parser.add_argument(
        "--qd",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[1, 8],
        help="host writer queue depths (1,8)",
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=2.0, help="length of each idle write window"
    )
    parser.add_argument(
        "--load-repeat", type=int, default=5, help="full copies under host writes per figure"
    )
    parser.add_argument(
        "--perf",
        nargs="*",
        default=list(DEFAULT_PERF),
        metavar="WORKERS:CHUNK[:copy-range]",
        help="x-perf settings for QEMU's tuned full copy",
    )
    parser.add_argument(
        "--serve-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="an option for isc serve, repeatable (e.g. --serve-option=--switch-interval=5)",
    )
    parser.add_argument("--dir", help="where the volume's files go (default: /dev/shm if room)")
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument("--json", metavar="PATH", help="write every measurement here (- = stdout)")
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % args.granularity:
        parser.error("--size must be a positive multiple of --granularity")
    if min(args.rounds, args.repeat, args.load_repeat) < 1:
        parser.error("--rounds, --repeat and --load-repeat must be at least 1")
    if not 0 < args.change <= 1:
        parser.error("--change must be in (0, 1]")
    for setting in args.perf:
        try:
            x_perf(setting)
        except ValueError as exc:
            parser.error(f"--perf: {exc}")
    return args


def tools() -> dict[str, str]:
    """The versions of the peers, or exit naming what to install."""
    missing = [
        (tool, package)
        for tool, package in (
            ("qemu-storage-daemon", "qemu-system-common"),
            ("qemu-img", "qemu-utils"),
            ("nbdcopy", "libnbd-bin"),
        )
        if shutil.which(tool) is None
    ]
    if missing:
        names = " ".join(package for _, package in missing)
        sys.exit(f"missing {', '.join(t for t, _ in missing)}: apt-get install {names}")
    writer_python()  # raises naming python3-libnbd when there is none

    def version(*command: str) -> str:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.split(
            "\n"
        )[0]

    return {
        "qemu": version("qemu-storage-daemon", "--version"),
        "nbdcopy": version("nbdcopy", "--version"),
        "isc": isc.__version__,
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    versions = tools()
    with ExitStack() as stack:
        work = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(
                    prefix="isc-compare-", dir=work_directory(args.dir, args.size)
                )
            )
        )
        run = Run(args, work)
        run.results["config"] = {
            **{k: v for k, v in vars(args).items() if k != "json"},
            "dir": str(work.parent),
            "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        write_random(run.source, args.size, args.seed)
        run.context("cp", ["cp", "--sparse=never", run.source])
        with StorageDaemon(run.source, work / "qemu") as daemon:
            run.qemu(daemon)
        with isc_session(run) as (server, dest):
            run.isc(server, dest)
        lines, targets = report(run)
    run.results["targets"] = targets
    run.results["checks"] = run.checks.done
    print("\n".join(lines))
    print()
    for target in targets:
        print(f"- {'met' if target['met'] else 'NOT MET'}: {target['target']}")
    checked, failed = len(run.checks.done), len(run.checks.failed)
    print(f"- {checked} copies checked byte for byte, {failed} mismatched")
    if args.json:
        text = json.dumps(run.results, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 1 if run.checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
