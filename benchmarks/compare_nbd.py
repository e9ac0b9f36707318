"""isc's NBD server beside qemu-nbd: nbdcopy both ways, a 1 TiB bitmap's block status, pulls.

Three sections, one run on this machine, each printed as a Markdown table
(``--json`` keeps every measurement); every server listens on a Unix socket
in the work directory (``/dev/shm`` when it has room):

``copy``
    ``nbdcopy`` reading a ``--size`` volume of seeded random bytes out of each
    server into an existing file and into a new one, and writing it in
    (``--flush``), ``--rounds`` rounds interleaved; medians of the wall time
    and of the server process's CPU time. The servers: ``qemu-nbd`` of a raw
    file; ``isc serve`` of the same bytes (a session on its write path); an
    ``NBDServer`` of the same in this process; and that one again while this
    process also runs an unmarked full copy of the session to a file in a
    loop (the copy sharing the process). Every copy is checked byte for byte.
``status``
    ``nbdinfo --map=qemu:dirty-bitmap:NAME`` of a ``--status-size`` (1 TiB)
    export with ``--dirty`` (1%) of its 64 KiB chunks dirty, chosen at random
    and dirtied through each export by one ``qemu-io`` run of 64 KiB zero
    writes that may punch (``write -z -u``: no data is written): ``isc
    serve`` of a sparse raw file, and ``qemu-nbd -B`` of a qcow2 image with
    a persistent bitmap. Median of 3;
    both maps must list the same dirty extents.
``pull``
    ``isc serve`` of the volume with a control port. Each pull starts with
    nothing tracked (a mark and an unmark with ``"sent": true``), changes
    ``--change`` (1%) of the volume in 64 KiB blocks through the export, marks,
    runs the README's libnbd pull script (it copies the dirty extents of
    ``NAME@frozen`` to a backup, TRIMming each) and unmarks. First
    ``--rounds`` pulls alone (median). Then a host writer (4 KiB random writes,
    queue depth 8) on the export, in windows: idle ones of
    ``--window-seconds`` (the writer alone), and between them ``--windows``
    pull windows of each kind, in turn: pulls one after the other until the
    writer has run ``--window-seconds`` during them (it runs only while a pull
    runs), of the written volume, or of a copy served by a second ``isc
    serve`` (the host writes lose there only what a pull costs the machine,
    its client's CPU above all, and nothing of what it costs their server).
    Each pull window's write rate is set against the idle windows either side
    of it; medians over the windows. The CPU time of the host's server and of
    the pull client is counted per window. The first pull of every window,
    and every pull alone, starts from a backup that holds the volume and is
    checked against the image at its mark. QEMU's pull mode beside it is
    ``compare_pull.py``'s.

With ``--baseline REV`` the copy and pull sections also run ``isc serve`` with the
NBD package (``isc/nbd/``) of git revision REV on this checkout's core (:func:`baseline_package`):
the copy rows interleaved with the others, the pull figures after this checkout's.

Nothing here asserts on time; targets are read from the tables.

    .venv/bin/python benchmarks/compare_nbd.py [--only copy,status,pull] [--baseline REV]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from datapath import SHM, first_difference, shm_free, sparse_file, write_random
from host_writer import HostWriter, make_changes, writer_python

from isc import CopyJob, Destination, FileLUN, Session
from isc._units import format_bytes, parse_size
from isc.nbd import NBDServer, SessionLUN

ISC = [sys.executable, "-m", "isc.cli"]
WAIT = 60.0  # seconds a server gets to start listening, a tool to finish (but a copy)
COPY_WAIT = 900.0
G = 64 << 10
ROOT = Path(__file__).resolve().parent.parent


# -- processes -----------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def server_process(
    command: list[object], sock: Path, log: Path, package: Path | None = None
) -> Iterator[subprocess.Popen]:
    """Run a server listening on ``sock``; stop it at the end. With ``package``, Python
    imports isc from that directory (:func:`baseline_package`)."""
    where = (
        {} if package is None else {"cwd": package, "env": {**os.environ, "PYTHONPATH": package}}
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen([os.fspath(a) for a in command], stdout=out, stderr=out, **where)
        try:
            deadline = time.monotonic() + WAIT
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} did not listen on {sock}: {log.read_text()}")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)  # paces the polling; returns early if it dies
            yield proc
        finally:
            proc.terminate()
            proc.wait(timeout=WAIT)


def baseline_package(rev: str, work: Path) -> Path:
    """A directory holding this checkout's isc package (its built core included) with the
    NBD package (``isc/nbd/``) as it was at ``rev``: the NBD code before and after, in
    one run, on the same core."""
    root = work / "baseline"
    shutil.copytree(ROOT / "isc", root / "isc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(root / "isc" / "nbd")
    (root / "isc" / "nbd").mkdir()
    listed = tool("git", "-C", ROOT, "ls-tree", "--name-only", f"{rev}:isc/nbd")
    for name in listed.split():
        text = tool("git", "-C", ROOT, "show", f"{rev}:isc/nbd/{name}")
        (root / "isc" / "nbd" / name).write_text(text)
    return root


def tool(*args: object, stdin: str | None = None, timeout: float = COPY_WAIT) -> str:
    done = subprocess.run(
        [os.fspath(a) for a in args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"{args[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def timed(work: Callable[[], object], pid: int | None = None) -> tuple[float, float | None]:
    """Wall seconds of ``work()`` and CPU seconds process ``pid`` spent meanwhile."""
    cpu = cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    work()
    wall = time.perf_counter() - started
    return wall, (cpu_seconds(pid) - cpu if pid else None)


def ask(control: Path, op: str, **fields: object) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(control))
        sock.sendall(json.dumps({"id": 1, "op": op, **fields}).encode() + b"\n")
        reply = json.loads(sock.makefile("rb").readline())
    if not reply["ok"]:
        raise RuntimeError(f"{op}: {reply['reason']}")
    return reply["info"]


def verify(what: str, expected: Path, actual: Path, checks: list[dict]) -> None:
    at = first_difference(actual, expected, expected.stat().st_size)
    checks.append({"copy": what, "ok": at is None, "first_difference": at})
    if at is not None:
        print(f"MISMATCH: {what}: {actual.name} differs from {expected.name} at byte {at}")


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


# -- copy ----------------------------------------------------------------------------------------
@contextmanager
def in_process(image: Path, sock: Path, sharing: Path | None) -> Iterator[None]:
    """An NBDServer of a session on ``image`` in this process; with ``sharing``, an unmarked
    full copy of the session to that file runs over and over meanwhile."""
    lun = FileLUN(image)
    session = Session(lun, G, name="vol")
    stop = threading.Event()
    copier = None
    try:
        with NBDServer(SessionLUN(session), name="vol") as server:
            server.start_unix(sock)
            if sharing is not None:
                dest = FileLUN(sharing)

                def copy_forever() -> None:
                    while not stop.is_set():
                        CopyJob(session, [Destination(dest, "d")]).full(marked=False)

                copier = threading.Thread(target=copy_forever, daemon=True)
                copier.start()
            yield
    finally:
        stop.set()
        if copier is not None:
            copier.join(COPY_WAIT)
            dest.close()
        lun.close()


def section_copy(args: argparse.Namespace, work: Path, checks: list[dict]) -> dict:
    size, nbdcopy = args.size, shutil.which("nbdcopy")
    src = work / "src.img"
    write_random(src, size, args.seed)
    for name in ("qemu.img", "isc.img", "base.img", "dst.img", "sharing.img"):
        shutil.copyfile(src, work / name)  # every page allocated, as a volume's
    qemu_sock, isc_sock, own_sock = work / "q.sock", work / "i.sock", work / "o.sock"
    base_sock = work / "b.sock"
    own = f"nbd+unix:///vol?socket={own_sock}"
    before = f"isc serve at {args.baseline}"
    servers = {  # name: (URI, the file behind the export)
        "qemu-nbd": (f"nbd+unix:///?socket={qemu_sock}", work / "qemu.img"),
        "isc serve": (f"nbd+unix:///isc.img?socket={isc_sock}", work / "isc.img"),
        **(
            {before: (f"nbd+unix:///base.img?socket={base_sock}", work / "base.img")}
            if args.baseline
            else {}
        ),
        "isc in-process": (own, work / "isc.img"),
        "isc in-process, copy running": (own, work / "isc.img"),
    }
    figures: dict[str, dict[str, list]] = {name: {} for name in servers}
    qemu = [
        "qemu-nbd",
        "-f",
        "raw",
        "-k",
        qemu_sock,
        "--persistent",
        "--shared=8",
        work / "qemu.img",
    ]
    serve = [*ISC, "serve", work / "isc.img", "--listen", f"unix:{isc_sock}"]
    with contextlib.ExitStack() as stack:
        pids = {
            "qemu-nbd": stack.enter_context(server_process(qemu, qemu_sock, work / "qemu.log")).pid,
            "isc serve": stack.enter_context(
                server_process(serve, isc_sock, work / "serve.log")
            ).pid,
        }
        if args.baseline:
            serve_before = [*ISC, "serve", work / "base.img", "--listen", f"unix:{base_sock}"]
            package = baseline_package(args.baseline, work)
            log = work / "serve-before.log"
            pids[before] = stack.enter_context(
                server_process(serve_before, base_sock, log, package)
            ).pid
        for _ in range(args.rounds):
            for name, (uri, image) in servers.items():
                sharing = work / "sharing.img" if "copy running" in name else None
                own_server = "in-process" in name
                with in_process(image, own_sock, sharing) if own_server else _nothing():
                    runs = {
                        "read, existing file": lambda uri=uri: tool(nbdcopy, uri, work / "dst.img"),
                        "read, new file": lambda uri=uri: (
                            (work / "new.img").unlink(missing_ok=True),
                            tool(nbdcopy, uri, work / "new.img"),
                        ),
                        "write": lambda uri=uri: tool(nbdcopy, "--flush", src, uri),
                    }
                    for kind, run in runs.items():
                        wall, cpu = timed(run, pids.get(name))
                        figures[name].setdefault(kind, []).append((wall, cpu))
                        target = {"write": image, "read, new file": work / "new.img"}.get(
                            kind, work / "dst.img"
                        )
                        verify(f"{name} {kind}", src, target, checks)
                (work / "new.img").unlink(missing_ok=True)
    return {
        name: {
            kind: {
                "wall": median([w for w, _ in runs]),
                "cpu": median([c for _, c in runs]),
                "runs": runs,
            }
            for kind, runs in kinds.items()
        }
        for name, kinds in figures.items()
    }


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def table_copy(figures: dict, size: int) -> list[str]:
    lines = [
        f"### nbdcopy of {format_bytes(size)} (median wall s, ÷ qemu-nbd; server CPU s)",
        "",
        "| server | read, existing file | read, new file | write |",
        "|---|---|---|---|",
    ]
    qemu = figures["qemu-nbd"]
    for name, kinds in figures.items():
        cells = []
        for kind in ("read, existing file", "read, new file", "write"):
            wall, cpu = kinds[kind]["wall"], kinds[kind]["cpu"]
            cell = f"{wall:.3f} ({wall / qemu[kind]['wall']:.2f}x)"
            cells.append(cell + (f"; CPU {cpu:.2f}" if cpu is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


# -- block status --------------------------------------------------------------------------------
def section_status(args: argparse.Namespace, work: Path, checks: list[dict]) -> dict:
    size = args.status_size
    chunks = size // G
    rng = random.Random(args.seed)
    dirty = sorted(rng.sample(range(chunks), round(chunks * args.dirty)))
    script = "".join(f"write -z -u {c * G} {G}\n" for c in dirty)  # -u: punch, no data
    raw, qcow2 = work / "status.img", work / "status.qcow2"
    sparse_file(raw, size)
    tool("qemu-img", "create", "-q", "-f", "qcow2", qcow2, str(size))
    tool("qemu-img", "bitmap", "--add", "-g", str(G), qcow2, "vol")
    isc_sock, qemu_sock = work / "si.sock", work / "sq.sock"
    serve = [*ISC, "serve", raw, "--listen", f"unix:{isc_sock}"]
    qemu = [
        "qemu-nbd",
        "-f",
        "qcow2",
        "-k",
        qemu_sock,
        "--persistent",
        "-x",
        "vol",
        "-B",
        "vol",
        qcow2,
    ]
    exports = {
        "isc serve": (serve, isc_sock, f"nbd+unix:///status.img?socket={isc_sock}", "status.img"),
        "qemu-nbd -B": (qemu, qemu_sock, f"nbd+unix:///vol?socket={qemu_sock}", "vol"),
    }
    figures: dict[str, dict] = {}
    maps = {}
    for name, (command, sock, uri, bitmap) in exports.items():
        with server_process(command, sock, work / f"{sock.stem}.log") as proc:
            dirtying, _ = timed(lambda uri=uri: tool("qemu-io", "-f", "raw", uri, stdin=script))
            context = f"--map=qemu:dirty-bitmap:{bitmap}"
            shown: list[str] = []
            runs = [
                timed(
                    lambda uri=uri, context=context, shown=shown: shown.append(
                        tool("nbdinfo", context, uri)
                    ),
                    proc.pid,
                )
                for _ in range(3)
            ]
        extents = [line.split()[:2] for line in shown[-1].splitlines() if line.endswith(" dirty")]
        figures[name] = {
            "wall": median([w for w, _ in runs]),
            "cpu": median([c for _, c in runs]),
            "runs": runs,
            "dirty_extents": len(extents),
            "dirtying_seconds": dirtying,
        }
        maps[name] = extents
    same = maps["isc serve"] == maps["qemu-nbd -B"]
    checks.append({"copy": "block status maps", "ok": same, "first_difference": None})
    if not same:
        print("MISMATCH: isc's and qemu-nbd's dirty maps differ")
    figures["dirty_chunks"] = len(dirty)
    return figures


def table_status(figures: dict, args: argparse.Namespace) -> list[str]:
    qemu = figures["qemu-nbd -B"]["wall"]
    lines = [
        f"### nbdinfo --map of a {format_bytes(args.status_size)} dirty bitmap, "
        f"{args.dirty:.0%} of its 64 KiB chunks dirty ({figures['dirty_chunks']} chunks)",
        "",
        "| server | wall s (median of 3) | ÷ qemu-nbd | server CPU s | dirty extents |",
        "|---|---|---|---|---|",
    ]
    for name in ("isc serve", "qemu-nbd -B"):
        f = figures[name]
        lines.append(
            f"| {name} | {f['wall']:.3f} | {f['wall'] / qemu:.2f}x | {f['cpu']:.2f} | "
            f"{f['dirty_extents']} |"
        )
    return lines


# -- pull ----------------------------------------------------------------------------------------
def pull_script() -> str:
    """The README's libnbd pull script (its section "Pull backups over NBD")."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Pull backups over NBD\n") :]
    section = section[: section.index("\n## ", 1)]
    (script,) = re.findall(r"^```python\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    return script


def section_pull(args: argparse.Namespace, work: Path, checks: list[dict]) -> dict:
    """The pull figures of ``isc serve``, and of it at ``--baseline`` after them."""
    figures = {"isc serve": _pull(args, work, checks, None)}
    if args.baseline:
        package = work / "baseline"
        if not package.exists():
            package = baseline_package(args.baseline, work)
        figures[f"isc serve at {args.baseline}"] = _pull(args, work, checks, package)
    return figures


def _pull(args: argparse.Namespace, work: Path, checks: list[dict], package: Path | None) -> dict:
    python = writer_python()
    (work / "pull.py").write_text(pull_script())
    at_mark = work / "at-mark.img"
    write_random(work / "vol.img", args.size, args.seed)
    shutil.copyfile(work / "vol.img", work / "other.img")
    seeds = itertools.count(args.seed)
    figures: dict = {"quiet": [], "idle": [], "loaded": [], "elsewhere": []}
    with contextlib.ExitStack() as stack:
        host, other = (
            stack.enter_context(_served(work, name, package)) for name in ("vol", "other")
        )

        def pull_once(served: dict, writer: HostWriter | None, checked: bool) -> dict:
            """One pull of a fresh change of ``served``; with ``checked``, from a backup that
            holds the volume, the backup checked against the image at the mark."""
            source, backup, control = served["source"], served["backup"], served["control"]
            if checked:
                shutil.copyfile(source, backup)
            # Nothing tracked (the host writer's writes of the last pull are dropped as
            # sent), then the change, then the mark.
            generation = ask(control, "mark")["generation"]
            ask(control, "unmark", sent=True, generation=generation)
            seed = next(seeds)
            make_changes(served["live"], args.change, block=G, qd=8, seed=seed)
            ask(control, "mark")
            if checked:
                shutil.copyfile(source, at_mark)  # no host write runs yet: the image at the mark
            client = children_cpu()
            if writer is not None:
                writer.run()
            pid = host["proc"].pid
            wall, server = timed(lambda: tool(python, work / "pull.py", *served["pull"]), pid)
            stats = writer.pause() if writer is not None else {}
            figure = {"wall": wall, "server_cpu": server, "client_cpu": children_cpu() - client}
            ask(control, "unmark")
            if checked:
                verify(f"pull {seed}", at_mark, backup, checks)
            return {**figure, **stats}

        def pull_window(served: dict, writer: HostWriter) -> list[dict]:
            """Pulls of ``served`` until the host writer ran ``--window-seconds`` during them."""
            pulls = [pull_once(served, writer, True)]
            while sum(p["seconds"] for p in pulls) < args.window_seconds:
                pulls.append(pull_once(served, writer, False))
            return pulls

        def idle_window(writer: HostWriter) -> dict:
            cpu = cpu_seconds(host["proc"].pid)
            writer.run()
            time.sleep(args.window_seconds)  # the measurement window itself
            return {**writer.pause(), "server_cpu": cpu_seconds(host["proc"].pid) - cpu}

        figures["quiet"] = [pull_once(host, None, True) for _ in range(args.rounds)]
        with HostWriter(host["live"], qd=8, block=4096, seed=args.seed) as writer:
            # Idle windows and pull windows in turn, an idle one first and last, so that
            # each pull window is set against the idle ones either side of it. The pull
            # windows alternate between pulls of the written volume and of a copy served
            # by another process: the host writes lose there only what the pull costs the
            # machine (its client's CPU above all), not what it costs the host's server.
            figures["idle"].append(idle_window(writer))
            for _ in range(args.windows):
                for key, served in (("loaded", host), ("elsewhere", other)):
                    figures[key].append(pull_window(served, writer))
                    figures["idle"].append(idle_window(writer))
    figures["summary"] = summarize_pull(figures)
    return figures


@contextmanager
def _served(work: Path, name: str, package: Path | None) -> Iterator[dict]:
    """``isc serve`` of ``work/NAME.img`` with a control socket, and what a pull of it needs."""
    source, nbd_sock, control = work / f"{name}.img", work / f"{name}.sock", work / f"{name}.ctl"
    serve = [*ISC, "serve", source, "--listen", f"unix:{nbd_sock}", "--control", f"unix:{control}"]
    backup = work / f"{name}-backup.img"
    frozen = f"nbd+unix:///{name}.img@frozen?socket={nbd_sock}"
    with server_process(serve, nbd_sock, work / f"{name}-serve.log", package) as proc:
        yield {
            "proc": proc,
            "source": source,
            "backup": backup,
            "control": control,
            "live": f"nbd+unix:///{name}.img?socket={nbd_sock}",
            "pull": [frozen, f"qemu:dirty-bitmap:{name}.img", backup],
        }


def children_cpu() -> float:
    """User and system CPU seconds of this process's children waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarize_pull(figures: dict) -> dict:
    idle = figures["idle"]
    summary = {
        "pull_quiet": median([p["wall"] for p in figures["quiet"]]),
        "client_cpu_quiet": median([p["client_cpu"] for p in figures["quiet"]]),
        "writes_idle": median([w["rate"] for w in idle]),
        "max_gap_idle_ms": max(w["max_gap_us"] for w in idle) / 1000,
        "server_cpu_idle": sum(w["server_cpu"] for w in idle) / sum(w["seconds"] for w in idle),
    }
    # The idle windows either side of each pull window, in the order they ran.
    windows = [
        w for pair in zip(figures["loaded"], figures["elsewhere"], strict=True) for w in pair
    ]
    around = {id(w): (idle[k]["rate"] + idle[k + 1]["rate"]) / 2 for k, w in enumerate(windows)}
    for key in ("loaded", "elsewhere"):
        rates = [sum(p["writes"] for p in w) / sum(p["seconds"] for p in w) for w in figures[key]]
        pulls = [p for w in figures[key] for p in w]
        wall = sum(p["wall"] for p in pulls)
        summary[key] = {
            "pull": median([p["wall"] for p in pulls]),
            "pulls": len(pulls),
            "writes": median(rates),
            "ratios": [r / around[id(w)] for r, w in zip(rates, figures[key], strict=True)],
            "max_gap_ms": max(p["max_gap_us"] for p in pulls) / 1000,
            "server_cpu": sum(p["server_cpu"] for p in pulls) / wall,
            "client_cpu": sum(p["client_cpu"] for p in pulls) / wall,
        }
    return summary


def table_pull(figures: dict, args: argparse.Namespace) -> list[str]:
    changed = format_bytes(args.size * args.change)
    names = list(figures)
    lines = [
        f"### Pull backup of {changed} changed ({args.change:.0%} of {format_bytes(args.size)}, "
        "64 KiB blocks) through NAME@frozen with libnbd",
        "",
        "| figure | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    windows = f"{args.windows} windows of {args.window_seconds:g} s, median"

    def loaded(key: str, row: str, cell: Callable[[dict], str]) -> tuple[str, Callable]:
        return f"{row} ({'its own volume' if key == 'loaded' else 'another'})", lambda s: cell(
            s[key]
        )

    rows: dict[str, Callable[[dict], str]] = {
        f"pull, no host writes (median of {args.rounds})": lambda s: (
            f"{s['pull_quiet'] * 1000:.1f} ms; client CPU {s['client_cpu_quiet'] * 1000:.0f} ms"
        ),
        f"host 4 KiB writes, qd 8, idle ({args.windows * 2 + 1} windows, median)": lambda s: (
            f"{s['writes_idle']:.0f}/s; server {s['server_cpu_idle']:.2f} CPUs; "
            f"longest stall {s['max_gap_idle_ms']:.1f} ms"
        ),
    }
    for key in ("loaded", "elsewhere"):
        rows.update(
            [
                loaded(
                    key,
                    "pull, host writes running (median)",
                    lambda f: f"{f['pull'] * 1000:.1f} ms (of {f['pulls']})",
                ),
                loaded(
                    key,
                    f"host writes during the pulls ({windows})",
                    lambda f: f"{f['writes']:.0f}/s; longest stall {f['max_gap_ms']:.1f} ms",
                ),
                loaded(
                    key,
                    "... of the idle windows either side, per window",
                    lambda f: (
                        " ".join(f"{r:.0%}" for r in f["ratios"])
                        + f" (median {statistics.median(f['ratios']):.0%})"
                    ),
                ),
                loaded(
                    key,
                    "CPUs used during the pulls: host's server / pull client",
                    lambda f: f"{f['server_cpu']:.2f} / {f['client_cpu']:.2f}",
                ),
            ]
        )
    for row, cell in rows.items():
        lines.append(f"| {row} | " + " | ".join(cell(figures[n]["summary"]) for n in names) + " |")
    return lines


# -- the run -------------------------------------------------------------------------------------
SECTIONS = {
    "copy": (section_copy, lambda f, a: table_copy(f, a.size)),
    "status": (section_status, table_status),
    "pull": (section_pull, table_pull),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="volume size (1G)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per figure (5)")
    parser.add_argument(
        "--status-size", type=parse_size, default=1 << 40, help="block status export (1T)"
    )
    parser.add_argument("--dirty", type=float, default=0.01, help="fraction dirty (0.01)")
    parser.add_argument("--change", type=float, default=0.01, help="fraction pulled (0.01)")
    parser.add_argument("--windows", type=int, default=3, help="pull windows with host writes (3)")
    parser.add_argument(
        "--window-seconds",
        type=float,
        default=2.0,
        help="length of each idle window, and of the host writes during each pull window (2)",
    )
    parser.add_argument(
        "--only", type=lambda text: text.split(","), default=list(SECTIONS), help="sections"
    )
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run isc serve with the NBD package (isc/nbd/) of git revision REV",
    )
    parser.add_argument("--json", metavar="PATH", help="write every measurement here")
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"--only takes {','.join(SECTIONS)}, got {sorted(unknown)}")
    if args.size % G or args.status_size % G:
        parser.error("--size and --status-size must be multiples of 64 KiB")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("qemu-nbd", "qemu-img", "qemu-io", "nbdcopy", "nbdinfo"):
        if shutil.which(name) is None:
            sys.exit(f"{name} is missing: apt-get install qemu-utils libnbd-bin")
    where = str(SHM) if shm_free() >= 7 * args.size + (1 << 30) else tempfile.gettempdir()
    checks: list[dict] = []
    results: dict = {"config": {**vars(args), "dir": where, "date": time.ctime()}}
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="isc-nbd-", dir=where) as directory:
        work = Path(directory)
        os.chmod(work, 0o700)  # Unix sockets live here: it must be this user's alone
        for name in args.only:
            measure, table = SECTIONS[name]
            (work / name).mkdir()
            results[name] = measure(args, work / name, checks)
            shutil.rmtree(work / name)  # the next section's files need the room
            lines += [*table(results[name], args), ""]
    print("\n".join(lines))
    failed = [c for c in checks if not c["ok"]]
    print(f"- {len(checks)} results checked, {len(failed)} mismatched")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "checks": checks}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
