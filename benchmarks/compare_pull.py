"""A pull backup through isc's ``NAME@frozen`` beside QEMU's pull mode: same change, same client.

Both systems serve a ``--size`` (1 GiB) raw volume of seeded random bytes,
each its own copy, over NBD on a Unix socket in the work directory
(``/dev/shm`` when it has room), and track its writes at 64 KiB:

QEMU (``qemu-storage-daemon`` 7.2, steered over QMP by :mod:`qemu`)
    The source node with a writable export for the host and a dirty bitmap
    ``track`` (not persistent) made before any change. A pull begins as
    libvirt's pull mode does: one transaction adds a disabled bitmap
    ``backup``, merges ``track`` into it and clears ``track`` (which goes on
    recording the writes for the next backup); then the fleecing graph of
    QEMU's own iotest ``image-fleecing``: a sparse raw fleecing image, a
    ``copy-before-write`` filter between the source node and its ``file``
    node (``blockdev-reopen`` puts it there) with ``backup`` as its bitmap,
    so it copies only the clusters the pull will read, and a
    ``snapshot-access`` node on the filter, exported writable (so TRIM
    frees what the filter kept, as isc frees saved chunks) with ``backup``
    as its ``qemu:dirty-bitmap:backup`` context. It ends, once the pull has
    read everything, by taking that down in reverse order and removing
    ``backup`` (libvirt's success path; a failed pull ends the run here).
    The point in time is the ``blockdev-reopen``: QEMU 7.2 cannot make the
    filter part of the bitmaps' transaction (``blockdev-add`` and
    ``blockdev-reopen`` are no transaction actions), so a host write between
    the two would escape the pull; here the host writer is paused then.
isc (``isc serve SOURCE --control``)
    A pull begins with ``mark`` and reads ``NAME@frozen`` with its
    ``qemu:dirty-bitmap:NAME`` context; it ends with ``unmark``.

Each round, on each system in turn (QEMU first): the backup file is made the
source as it is, and what is tracked is dropped (QEMU: ``track`` cleared;
isc: a mark and an unmark with ``"sent": true``); ``--change`` (1%) of the
volume is written in 64 KiB blocks through the live export (the same seeded
blocks on both); the pull begins; the source is copied as the image at the
mark; the pulling client (:func:`pull`: the README's libnbd script, run
alike on both) copies the dirty extents into the backup, TRIMming each; the
pull ends; the backup must equal the image at the mark byte for byte
(``cmp``, then :func:`compare_nbd.verify` to name the first differing byte).

The client runs as a backup daemon does (:class:`PullClient`): one process,
libnbd imported once, which runs the script for each pull on a connection of
its own; a pull's time runs from asking it to its answer. With
``--fresh-client`` it is a new Python process per pull instead, as the
README's command line runs it, and each pull's time includes starting
Python and importing libnbd (some 20 ms of CPU, during which the host
writer runs too): the definition of the runs before 2026-12-06 07:00 UTC.

Figures per system: the client's wall time (median of ``--rounds``, the
rounds interleaved), the bytes it read, the time to begin and to end a pull;
then with a host writer (4 KiB random writes, queue depth 8, libnbd:
:mod:`host_writer`) on each live export, rounds alternating between the
systems with the writer running during each pull, each followed by an idle
window as long as the pull's (the writer alone, once the pull has ended),
until each system's pulls add up to ``--load-seconds``: the write rate
during the pulls and in the idle windows, the worst stall of each, the
pull's median. Pairing the windows in time keeps a shared machine's drift
out of the ratio. Nothing here asserts on time; any mismatch exits 1.

    .venv/bin/python benchmarks/compare_pull.py [--size 1G] [--rounds 5] [--load-seconds 3]
        [--fresh-client] [--dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from compare_nbd import ISC, ask, median, pull_script, server_process, tool, verify
from datapath import SHM, shm_free, write_random
from host_writer import HostWriter, make_changes, writer_python
from qemu import StorageDaemon

from isc._units import format_bytes, parse_size

G = 64 << 10
"""Tracking granularity of both systems, and the size of each changed block."""
QEMU, ISC_SIDE = "QEMU pull mode", "isc NAME@frozen"
TRACK, BACKUP = "track", "backup"  # QEMU's bitmaps: the running one, the pull's frozen copy
FLEECE, CBW, ACCESS, EXPORT = "fleece", "fl-cbw", "fl-access", "pull"  # QEMU's pull graph


# -- the two systems ---------------------------------------------------------------------------
class QemuPull:
    """QEMU's pull mode on a :class:`~qemu.StorageDaemon` (module docstring)."""

    name = QEMU

    def __init__(self, daemon: StorageDaemon, fleece: Path) -> None:
        self.daemon, self.qmp, self.fleece = daemon, daemon.qmp, fleece
        self.source, self.live = daemon.source, daemon.uri
        self.qmp.execute(
            "block-dirty-bitmap-add", {"node": daemon.node, "name": TRACK, "granularity": G}
        )

    def forget(self) -> None:
        self.qmp.execute("block-dirty-bitmap-clear", {"node": self.daemon.node, "name": TRACK})

    def begin(self) -> tuple[str, str]:
        """Fix the point in time; return the URI and the context to pull from."""
        node = self.daemon.node
        frozen = {"node": node, "name": BACKUP}
        actions = [
            ("block-dirty-bitmap-add", {**frozen, "granularity": G, "disabled": True}),
            ("block-dirty-bitmap-merge", {"node": node, "target": BACKUP, "bitmaps": [TRACK]}),
            ("block-dirty-bitmap-clear", {"node": node, "name": TRACK}),
        ]
        self.qmp.execute("transaction", {"actions": [{"type": t, "data": d} for t, d in actions]})
        with open(self.fleece, "wb") as f:
            f.truncate(self.source.stat().st_size)
        self.daemon.add_target(FLEECE, self.fleece)
        cbw = {"file": self.daemon.file_node, "target": FLEECE, "bitmap": frozen}
        self.qmp.execute("blockdev-add", {"driver": "copy-before-write", "node-name": CBW, **cbw})
        self._reopen_on(CBW)
        self.qmp.execute(
            "blockdev-add", {"driver": "snapshot-access", "node-name": ACCESS, "file": CBW}
        )
        export = {"type": "nbd", "id": EXPORT, "node-name": ACCESS, "name": EXPORT}
        self.qmp.execute("block-export-add", {**export, "writable": True, "bitmaps": [frozen]})
        return f"nbd+unix:///{EXPORT}?socket={self.daemon.listen}", f"qemu:dirty-bitmap:{BACKUP}"

    def end(self) -> None:
        self.qmp.execute("block-export-del", {"id": EXPORT})
        self.qmp.wait_event("BLOCK_EXPORT_DELETED", data={"id": EXPORT})
        self.qmp.execute("blockdev-del", {"node-name": ACCESS})
        self._reopen_on(self.daemon.file_node)
        self.qmp.execute("blockdev-del", {"node-name": CBW})
        self.daemon.remove_target(FLEECE)
        self.daemon.remove_bitmap(BACKUP)
        self.fleece.unlink()

    def _reopen_on(self, child: str) -> None:
        """Make ``child`` the source node's ``file``: the host's writes go through it."""
        source = {"driver": "raw", "node-name": self.daemon.node, "file": child}
        self.qmp.execute("blockdev-reopen", {"options": [source]})


class IscPull:
    """``isc serve`` of the source with a control socket (module docstring)."""

    name = ISC_SIDE

    def __init__(self, source: Path, sock: Path, control: Path) -> None:
        self.source, self.sock, self.control = source, sock, control
        self.live = f"nbd+unix:///{source.name}?socket={sock}"

    def forget(self) -> None:
        generation = ask(self.control, "mark")["generation"]
        ask(self.control, "unmark", sent=True, generation=generation)

    def begin(self) -> tuple[str, str]:
        frozen = ask(self.control, "mark")["frozen"]
        name = frozen.rpartition("@")[0]
        return f"nbd+unix:///{frozen}?socket={self.sock}", f"qemu:dirty-bitmap:{name}"

    def end(self) -> None:
        ask(self.control, "unmark")


System = QemuPull | IscPull


# -- one pull ----------------------------------------------------------------------------------
DAEMON = """\
import contextlib, io, json, sys, traceback
import nbd  # once, as a backup daemon does
script = sys.argv[1]
code = compile(open(script).read(), script, "exec")
print("ready", flush=True)
for line in sys.stdin:
    sys.argv = [script, *json.loads(line)]
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            exec(code, {"__name__": "__main__"})
    except Exception:
        print(json.dumps({"error": traceback.format_exc()}), flush=True)
    else:
        print(json.dumps({"said": said.getvalue()}), flush=True)
"""
"""The pulling client's process (:class:`PullClient`): runs the script once per line of
arguments it reads, each run a connection of its own, and answers one JSON line."""


class PullClient:
    """The pulling client ``script`` run as a backup daemon runs it: one process, which
    runs it for each pull (:meth:`pull`); with ``fresh``, a new process per pull."""

    def __init__(self, script: Path, fresh: bool) -> None:
        self.script = script
        self._proc: subprocess.Popen | None = None
        if not fresh:
            self._proc = subprocess.Popen(
                [writer_python(), "-c", DAEMON, script],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            self._answer("ready")

    def _answer(self, expected: str | None = None) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line or (expected is not None and line.strip() != expected):
            self.close()
            raise RuntimeError(f"the pulling client said {line!r}")
        return line

    def pull(self, uri: str, context: str, backup: Path) -> str:
        """What the script printed pulling ``uri``'s dirty extents in ``context`` into
        ``backup``; ``RuntimeError`` with its traceback when it failed."""
        if self._proc is None:
            return tool(writer_python(), self.script, uri, context, backup)
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps([uri, context, str(backup)]) + "\n")
        self._proc.stdin.flush()
        answer = json.loads(self._answer())
        if "error" in answer:
            raise RuntimeError(f"the pulling client failed: {answer['error']}")
        return answer["said"]

    def close(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()  # type: ignore[union-attr]
            self._proc.wait(timeout=60)
            self._proc.stdout.close()  # type: ignore[union-attr]
            self._proc = None

    def __enter__(self) -> PullClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def pull(client: PullClient, uri: str, context: str, backup: Path) -> tuple[float, int]:
    """Pull ``uri``'s dirty extents in ``context`` into ``backup`` with ``client``: its
    wall seconds and the bytes it read."""
    started = time.perf_counter()
    said = client.pull(uri, context, backup)
    seconds = time.perf_counter() - started
    copied = re.fullmatch(r"copied (\d+) bytes in \d+ extents\n", said)
    if copied is None:
        raise RuntimeError(f"the pull client said {said!r}")
    return seconds, int(copied[1])


def snapshot(source: Path, image: Path) -> None:
    """Copy ``source`` (no host write in flight) to ``image``: the image at the mark."""
    shutil.copyfile(source, image)


def one_round(
    system: System,
    client: PullClient,
    args: argparse.Namespace,
    work: Path,
    checks: list[dict],
    seed: int,
    writer: HostWriter | None,
) -> dict:
    """Change the volume, pull it (with ``writer`` running during the pull), check the backup."""
    backup, at_mark = work / "backup.img", work / "at-mark.img"
    shutil.copyfile(system.source, backup)  # the previous full copy
    system.forget()
    make_changes(system.live, args.change, block=G, qd=8, seed=seed)
    started = time.perf_counter()
    uri, context = system.begin()
    begin = time.perf_counter() - started
    snapshot(system.source, at_mark)
    if writer is not None:
        writer.run()
    seconds, read = pull(client, uri, context, backup)
    stats = writer.pause() if writer is not None else None
    started = time.perf_counter()
    system.end()
    end = time.perf_counter() - started
    loaded = " under host writes" if writer is not None else ""
    what = f"{system.name} pull{loaded}, seed {seed}"
    if subprocess.run(["cmp", "-s", at_mark, backup], check=False).returncode == 0:
        checks.append({"copy": what, "ok": True, "first_difference": None})
    else:  # where they differ, or that the backup is short
        verify(what, at_mark, backup, checks)
    return {"pull": seconds, "bytes": read, "begin": begin, "end": end, "writer": stats}


# -- the run -----------------------------------------------------------------------------------
@contextmanager
def systems(args: argparse.Namespace, work: Path) -> Iterator[list[System]]:
    """QEMU's daemon and ``isc serve``, each on its own copy of the volume."""
    with ExitStack() as stack:
        qemu_source, isc_source = work / "qemu.img", work / "vol.img"
        write_random(qemu_source, args.size, args.seed)
        shutil.copyfile(qemu_source, isc_source)
        daemon = StorageDaemon(
            qemu_source, work / "qemu", export="vol", listen=work / "qemu.sock", timeout=60.0
        )
        stack.enter_context(daemon)
        sock, control = work / "isc.sock", work / "ctl.sock"
        serve = [*ISC, "serve", isc_source, "--listen", f"unix:{sock}"]
        stack.enter_context(
            server_process([*serve, "--control", f"unix:{control}"], sock, work / "isc.log")
        )
        yield [QemuPull(daemon, work / "fleece.img"), IscPull(isc_source, sock, control)]


def measure(args: argparse.Namespace, work: Path, checks: list[dict]) -> dict:
    (work / "pull.py").write_text(pull_script())
    figures: dict = {QEMU: {"quiet": [], "loaded": []}, ISC_SIDE: {"quiet": [], "loaded": []}}
    with systems(args, work) as both, PullClient(work / "pull.py", args.fresh_client) as client:
        for r in range(args.rounds):
            for system in both:
                figures[system.name]["quiet"].append(
                    one_round(system, client, args, work, checks, args.seed + r, None)
                )
        with ExitStack() as stack:
            writers = {
                s.name: stack.enter_context(HostWriter(s.live, qd=8, block=4096, seed=args.seed))
                for s in both
            }
            r = 0
            while short := [s for s in both if window(figures[s.name]) < args.load_seconds]:
                for system in short:  # in turn, while each still needs pulls
                    seed = args.seed + 1000 + r
                    writer = writers[system.name]
                    run = one_round(system, client, args, work, checks, seed, writer)
                    writer.run()
                    time.sleep(run["writer"]["seconds"])  # the measurement window itself
                    run["idle"] = writer.pause()
                    figures[system.name]["loaded"].append(run)
                r += 1
    for f in figures.values():
        quiet, loaded = f["quiet"], f["loaded"]
        f["summary"] = {
            **{
                key: median([run[key] for run in quiet])
                for key in ("pull", "bytes", "begin", "end")
            },
            "pull_loaded": median([run["pull"] for run in loaded]),
            "loaded_pulls": len(loaded),
            "window": window(f),
            **{
                f"{name}_{stat}": value
                for name in ("writer", "idle")
                for stat, value in writes([run[name] for run in loaded]).items()
            },
        }
    return figures


def window(figures: dict) -> float:
    """Seconds the host writer ran during a system's pulls so far."""
    return sum(run["writer"]["seconds"] for run in figures["loaded"])


def writes(windows: list[dict]) -> dict:
    """The write rate over all of the writer's ``windows`` and their worst stall in ms."""
    seconds = sum(w["seconds"] for w in windows)
    return {
        "rate": sum(w["writes"] for w in windows) / seconds,
        "stall_ms": max(w["max_gap_us"] for w in windows) / 1000,
    }


def table(figures: dict, args: argparse.Namespace) -> list[str]:
    q, i = figures[QEMU]["summary"], figures[ISC_SIDE]["summary"]
    changed = format_bytes(round(args.size * args.change / G) * G)

    def ms(key: str) -> tuple[str, str, str]:
        return f"{q[key] * 1e3:.1f} ms", f"{i[key] * 1e3:.1f} ms", f"{i[key] / q[key]:.2f}"

    def rate(s: dict) -> str:
        return f"{s['writer_rate']:,.0f}/s ({s['writer_rate'] / s['idle_rate']:.0%} of idle)"

    def stall(key: str) -> tuple[str, str, str]:
        return f"{q[key]:.1f} ms", f"{i[key]:.1f} ms", ""

    client = "a new process per pull" if args.fresh_client else "one process, all pulls"
    rows = [
        (f"pull, no host writes (client wall, median of {args.rounds}; {client})", *ms("pull")),
        ("bytes read per pull", format_bytes(q["bytes"]), format_bytes(i["bytes"]), ""),
        ("begin (QEMU: bitmaps, fleecing graph, export; isc: mark)", *ms("begin")),
        ("end (QEMU: export, graph and bitmap down; isc: unmark)", *ms("end")),
        (
            f"pull, host writes running (median of {q['loaded_pulls']} / {i['loaded_pulls']})",
            *ms("pull_loaded"),
        ),
        (
            "host 4 KiB writes, qd 8, idle windows paired with the pulls",
            f"{q['idle_rate']:,.0f}/s",
            f"{i['idle_rate']:,.0f}/s",
            f"{i['idle_rate'] / q['idle_rate']:.2f}",
        ),
        (
            f"host writes during the pulls ({q['window']:.1f} s / {i['window']:.1f} s)",
            rate(q),
            rate(i),
            f"{i['writer_rate'] / q['writer_rate']:.2f}",
        ),
        ("longest host write stall, idle windows", *stall("idle_stall_ms")),
        ("longest host write stall during the pulls", *stall("writer_stall_ms")),
    ]
    return [
        f"### Pull backup of {changed} changed ({args.change:.0%} of {format_bytes(args.size)}, "
        "64 KiB blocks), the same libnbd client on both",
        "",
        f"| figure | {QEMU} | {ISC_SIDE} | isc ÷ QEMU |",
        "|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="volume size (1G)")
    parser.add_argument("--rounds", type=int, default=5, help="pulls per system, no writes (5)")
    parser.add_argument("--change", type=float, default=0.01, help="fraction pulled (0.01)")
    parser.add_argument(
        "--load-seconds", type=float, default=3.0, help="write window over the pulls (3)"
    )
    parser.add_argument(
        "--fresh-client",
        action="store_true",
        help="start the pulling client per pull, its start inside the pull's time",
    )
    parser.add_argument("--dir", help="where the volumes go (default: /dev/shm if room)")
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--json", metavar="PATH", help="write every measurement here")
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % G:
        parser.error("--size must be a positive multiple of 64 KiB")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not 0 < args.change <= 1:
        parser.error("--change must be in (0, 1]")
    return args


def tools() -> str:
    """QEMU's version, or exit naming what to install."""
    if shutil.which("qemu-storage-daemon") is None:
        sys.exit("qemu-storage-daemon is missing: apt-get install qemu-system-common")
    writer_python()  # raises naming python3-libnbd when there is none
    version = subprocess.run(
        ["qemu-storage-daemon", "--version"], capture_output=True, text=True, check=True
    )
    return version.stdout.split("\n")[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    qemu_version = tools()
    checks: list[dict] = []
    where = args.dir or (
        str(SHM) if shm_free() >= 5 * args.size + (1 << 30) else tempfile.gettempdir()
    )
    config = {
        **{k: v for k, v in vars(args).items() if k != "json"},
        "dir": where,
        "qemu": qemu_version,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="isc-pull-", dir=where) as directory:
        work = Path(directory)
        os.chmod(work, 0o700)  # Unix sockets live here: it must be this user's alone
        figures = measure(args, work, checks)
    print("\n".join(table(figures, args)))
    print()
    failed = [c for c in checks if not c["ok"]]
    print(f"- {len(checks)} pulls checked byte for byte, {len(failed)} mismatched")
    print(f"- {config['qemu']}; {config['date']}; load average at start {config['load_average']}")
    if args.json:
        results = {"config": config, **figures, "checks": checks}
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
