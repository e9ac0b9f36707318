"""The COFW host write of this checkout beside an earlier revision's, in one process.

A copy-on-first-write host write (``Session.write`` under a full mark, every
write the first to its chunk) costs the session's COFW path: reading the
chunk's old data and storing it in the save area. This script loads
``isc/session.py`` and ``isc/savearea.py`` as they were at REV (``git show``)
beside this checkout's, runs both on one ``FileLUN`` in ``/dev/shm`` (or
``--dir``), interleaved round by round, with a plain ``FileLUN.write`` as the
yardstick, and prints medians as a Markdown table. The core (``isc._core``)
is this checkout's for both. A third column is the floor a COFW cannot go
below: ``os.preadv`` of the chunk into a slot of an already faulted-in map
(as the save area's are after the first mark), then the plain write, with no
session. Nothing is asserted on time.

    .venv/bin/python benchmarks/cofw_before_after.py 0a98425
"""

from __future__ import annotations

import argparse
import importlib.util
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from isc import FileLUN, SaveArea, Session

ROOT = Path(__file__).resolve().parent.parent
SIZE = 1 << 30
WRITES = 2048  # per round, each in a 64 KiB slot of its own
WRITE = 4096


def load(revision: str, module: str, scratch: Path):
    """``isc/<module>.py`` as it was at ``revision``, imported as ``<module>_<revision>``."""
    name = f"{module}_{revision}"
    path = scratch / f"{name}.py"
    path.write_bytes(
        subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:isc/{module}.py"],
            check=True,
            capture_output=True,
        ).stdout
    )
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="the git revision to compare with (e.g. 0a98425)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch_dir:
        scratch = Path(scratch_dir)
        old_area = load(args.revision, "savearea", scratch)
        old_session = load(args.revision, "session", scratch)
        lun = FileLUN.create(scratch / "volume.img", SIZE)
        data = os.urandom(WRITE)
        slots = np.random.default_rng(1).permutation(SIZE // 65536)[:WRITES]
        offsets = (slots * 65536).tolist()
        sessions: dict[tuple[str, int], Session] = {}
        arena = mmap.mmap(-1, WRITES * 65536)
        arena.write(bytes(len(arena)))  # faulted in, as a save area after its first mark
        slots = memoryview(arena)
        reader = os.open(lun.path, os.O_RDONLY)

        def plain() -> float:
            write = lun.write
            began = time.perf_counter()
            for offset in offsets:
                write(offset, data)
            return (time.perf_counter() - began) / WRITES * 1e6

        def floor(granularity: int) -> float:
            write, preadv = lun.write, os.preadv
            began = time.perf_counter()
            for i, offset in enumerate(offsets):
                preadv(reader, [slots[i * granularity : (i + 1) * granularity]], offset)
                write(offset, data)
            return (time.perf_counter() - began) / WRITES * 1e6

        def cofw(which: str, granularity: int) -> float:
            session = sessions.get((which, granularity))
            if session is None:
                if which == "before":
                    area = old_area.SaveArea(WRITES * 65536)
                    session = old_session.Session(lun, granularity, area)
                else:
                    session = Session(lun, granularity, SaveArea(WRITES * 65536))
                sessions[which, granularity] = session
            session.mark(full=True)
            write = session.write
            began = time.perf_counter()
            for offset in offsets:
                write(offset, data)
            took = (time.perf_counter() - began) / WRITES * 1e6
            if session.stats.aborts:
                raise SystemExit(f"{which}: the save area overflowed: {session.stats.last_abort}")
            session.unmark()
            return took

        times: dict[object, list[float]] = {}
        for _ in range(args.rounds):
            times.setdefault("plain", []).append(plain())
            for granularity in (4096, 65536):
                times.setdefault(("floor", granularity), []).append(floor(granularity))
                for which in ("before", "after"):
                    times.setdefault((which, granularity), []).append(cofw(which, granularity))
        for session in sessions.values():
            session.close()
        os.close(reader)
        slots.release()
        arena.close()
        lun.close()
    base = statistics.median(times["plain"])
    print(f"plain FileLUN.write of {WRITE // 1024} KiB: {base:.2f} us (median of {args.rounds})")
    print(
        f"| chunk | {args.revision} us (x plain) | this checkout us (x plain) "
        "| floor: pread + write us (x plain) |"
    )
    print("|---|---|---|---|")
    for granularity in (4096, 65536):
        cells = []
        for which in ("before", "after", "floor"):
            took = statistics.median(times[which, granularity])
            cells.append(f"{took:.2f} ({took / base:.1f}x)")
        print(f"| {granularity // 1024} KiB | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
