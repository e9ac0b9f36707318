"""``isc demo``: replicate a live volume end to end on an embedded default, and check it.

In a temporary directory: a 64 MiB source file and two destination files.
Writer threads keep writing to the source through a session the whole time.
One unmarked full copy seeds the destinations (they end inconsistent), then
several periodic incremental updates follow (mark, protect, copy, unprotect).
At each mark the writers pause for an instant so the demo can read the
expected point-in-time image; after each update every destination must equal
that image byte for byte. Prints a table and returns non-zero if any check
fails.
"""

from __future__ import annotations

import random
import tempfile
import threading
from pathlib import Path

from isc.copy import CopyResult, Destination, DestState
from isc.lun import FileLUN
from isc.remote import Ack, LocalSite
from isc.savearea import SaveArea
from isc.session import Session
from isc.update import PeriodicUpdate, UnmarkedFullCopy

SIZE = 64 << 20
GRANULARITY = 8 << 10
WRITERS = 2
UPDATES = 4


class Writers:
    """Threads writing random 4-64 KiB blocks through a session until stopped.

    ``pause()`` returns once every writer is idle between writes; ``resume()``
    lets them go on.
    """

    def __init__(self, session: Session, count: int, seed: int) -> None:
        self.session = session
        self._gate = threading.Condition()
        self._paused = False
        self._idle = 0
        self._stop = False
        self._threads = [
            threading.Thread(target=self._run, args=(seed + i,), daemon=True) for i in range(count)
        ]

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._gate:
            self._stop = True
            self._paused = False
            self._gate.notify_all()
        for thread in self._threads:
            thread.join()

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        size = self.session.source.size
        while True:
            with self._gate:
                if self._paused:
                    self._idle += 1
                    self._gate.notify_all()
                    while self._paused:
                        self._gate.wait()
                    self._idle -= 1
                if self._stop:
                    return
            length = rng.randrange(4096, 65537, 4096)
            offset = rng.randrange(0, size - length + 1, 512)
            self.session.write(offset, rng.randbytes(length))

    def pause(self) -> None:
        with self._gate:
            self._paused = True
            while self._idle < len(self._threads):
                self._gate.wait()

    def resume(self) -> None:
        with self._gate:
            self._paused = False
            self._gate.notify_all()


class ImageAtMark(LocalSite):
    """A LocalSite that reads the source's image when an update first asks for protection.

    An update protects its destinations right after its mark; the demo pauses
    the writers before each update, so that image is the point in time the
    update must deliver. The writers resume as soon as it is read.
    """

    def __init__(self, source, writers: Writers) -> None:
        super().__init__()
        self.source = source
        self.writers = writers
        self.image: bytes | None = None

    def protect(self, dest: Destination, timeout: float | None = None) -> Ack:
        if self.image is None:
            self.image = self.source.read(0, self.source.size)
            self.writers.resume()
        return super().protect(dest, timeout)


def run(seed: int = 1, out=print) -> int:
    """Run the demo; return 0 if every destination verified, else 1."""
    rows: list[tuple[str, CopyResult, int, bool]] = []
    with tempfile.TemporaryDirectory(prefix="isc-demo-") as tmp:
        root = Path(tmp)
        with FileLUN.create(root / "source.img", SIZE) as source:
            source.write(0, random.Random(seed).randbytes(SIZE))
            dests = [
                Destination(FileLUN.create(root / f"dest{i}.img", SIZE), f"dest{i}") for i in (1, 2)
            ]
            # As large as the source, the save area cannot fill however far the
            # unthrottled writers get ahead of a copy (each chunk is saved at
            # most once per mark); the table shows how much each update used.
            session = Session(source, GRANULARITY, SaveArea(SIZE), name="demo")
            with Writers(session, WRITERS, seed) as writers:
                site = ImageAtMark(source, writers)
                result = UnmarkedFullCopy(session, dests).run()
                rows.append(("unmarked full", result, session.stats.save_area_high_water, True))
                update = PeriodicUpdate(session, dests, site)
                for number in range(1, UPDATES + 1):
                    session.save_area.reset_high_water()
                    writers.pause()
                    site.image = None
                    (result,) = update.run()
                    ok = all(
                        d.state is DestState.CONSISTENT and d.lun.read(0, SIZE) == site.image
                        for d in dests
                    )
                    rows.append(
                        (f"incremental {number}", result, session.stats.save_area_high_water, ok)
                    )
            for dest in dests:
                dest.lun.close()
            writes = session.stats.host_writes
    _print_table(rows, out)
    failures = sum(not ok for *_, ok in rows)
    out(f"{writes} host writes by {WRITERS} threads during the copies")
    out(
        "all destinations verified" if not failures else f"{failures} update(s) failed verification"
    )
    return 1 if failures else 0


def _print_table(rows, out) -> None:
    header = ("copy", "MiB sent", "runs", "COFW chunks", "save area peak KiB", "seconds", "check")
    lines = [header]
    for name, result, peak, ok in rows:
        lines.append(
            (
                name,
                f"{result.bytes_sent / 2**20:.2f}",
                str(result.extents),
                str(result.cofw_chunks),
                str(peak // 1024),
                f"{result.seconds:.3f}",
                ("consistent" if ok else "MISMATCH") if name != "unmarked full" else "inconsistent",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        out(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
        )
