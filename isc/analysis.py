"""Granularity trade-offs: periodic incremental updates simulated over a workload.

For each granularity :func:`analyze` replays a workload's writes into a real
:class:`~isc.DeltaBitmap` on a simulated clock and reports what the updates
would cost: bytes to transfer, copy-on-first-write (COFW) traffic during the
transfers, the save area that traffic needs, and the bitmap's memory.

The model
---------
Time is the workload's own (seconds from its first I/O). At time 0 the
destination holds the volume (a full copy was made) and tracking is empty.
Reads are counted and otherwise ignored.

* **Updates** are due every ``interval`` seconds, at ``k * interval`` for
  k = 1, 2, ... up to the time of the workload's last I/O. An update marks: the
  tracking bitmap becomes the transfer bitmap. A write at the very instant of a
  mark lands after it.
* **Transfer**: the transfer bitmap's chunks go in ascending chunk order (the
  bitmap's extents) at ``bandwidth`` bytes per second, back to back from the
  mark. Chunk ``i`` of the transfer set is *sent* at ``mark + (bytes of chunks
  0..i) / bandwidth``, and its transfer bit is cleared then; a write at or
  after that time finds it sent. The transfer ends when its last chunk is
  sent, then the session unmarks. One update runs at a time: an update due
  while a transfer runs is refused (counted in ``skipped_updates``) and the
  next one is the first due at or after the transfer's end.
* **COFW**, for the writes that arrive during a transfer, three ways:

  ``isc``
      a written chunk is saved only if it is in the transfer set, not sent yet
      and not saved yet in this mark; its saved copy is freed when it is sent.
      This is what the delta bitmap does (clear as sent).
  ``no_clear``
      a written chunk is saved if it is in the transfer set and not saved yet,
      sent or not: the same tracking without clearing transfer bits as chunks
      go. Saved copies stay until the transfer ends.
  ``classic``
      a classic snapshot held for the whole transfer: the first write to any
      chunk during the transfer saves it. Saved copies stay until the end.

  The save area in use is the bytes of saved copies held; its high water is
  the peak over every transfer. ``overruns`` counts the transfers whose peak
  passed the save area's capacity: a real session would have aborted that
  mark (rule 5) and sent the chunks in the next update; the simulation goes
  on as if the area were large enough.

The recommendation
------------------
:attr:`Analysis.recommended` is the granularity of least cost (bytes
transferred plus ``cofw_weight`` times isc's COFW bytes, totals over all
updates) among those whose save area never ran out, or among all when none
fits; a tie goes to the larger granularity (fewer chunks, a smaller bitmap).
:attr:`Analysis.rule` says so in words. A recommendation that rests on fewer
than :data:`FIRM_UPDATES` updates comes with a warning
(:meth:`Analysis.warnings`). The host-side cost is reported beside it, not
weighed in: ``tracking_ns_per_write`` (measured) and ``bitmap_bytes``.

What is measured with the real engine: the tracking and transfer sets (every
write goes through ``record_writes``; a mark is ``mark`` and ``extents``),
and isc's COFW chunks (``record_writes`` during the transfer, with
``clear_transfer`` clearing chunks as they are sent). The comparison
variants and the save-area timeline are computed beside it with numpy, and
isc's COFW chunks from the engine must equal the model's, write batch by
write batch, or :class:`ModelMismatch` is raised.

Everything is vectorised per batch: no Python loop per I/O. Memory per
granularity: the delta bitmap, one more bit per chunk (chunks written during
the current transfer), and the current transfer set as an int64 and a
float64 per chunk in it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from isc import _plot
from isc._core import DeltaBitmap
from isc._layout import MAX_GRANULARITY, MIN_GRANULARITY, check_geometry
from isc._units import format_bytes, size_label
from isc.errors import IscError, ParameterError
from isc.session import DEFAULT_SAVE_AREA
from isc.workload import IOBatch, Workload

__all__ = [
    "DEFAULT_BANDWIDTH",
    "DEFAULT_GRANULARITIES",
    "DEFAULT_INTERVAL",
    "FIRM_UPDATES",
    "MAX_UPDATES",
    "Analysis",
    "Cofw",
    "GranularityResult",
    "ModelMismatch",
    "analyze",
    "bitmap_memory",
    "workload_extent",
]

DEFAULT_GRANULARITIES = tuple(MIN_GRANULARITY << i for i in range(6))
"""2 KiB to 64 KiB, every power of two."""

DEFAULT_INTERVAL = 60.0
"""Seconds between updates."""

DEFAULT_BANDWIDTH = float(100 << 20)
"""Copy bandwidth in bytes per second (100 MiB/s)."""

MAX_UPDATES = 1_000_000
"""Most updates one granularity may simulate: a guard against a tiny interval."""

FIRM_UPDATES = 3
"""Fewer updates than this make the recommendation come with a warning."""

_TIMING_WRITES = 65536  # writes of the first batch timed for the tracking cost
_TIMING_REPEATS = 5


class ModelMismatch(IscError, RuntimeError):
    """The delta bitmap's COFW decisions differ from the analysis model's: a bug in one."""


@dataclass(frozen=True)
class Cofw:
    """COFW figures of one variant, totals over every simulated transfer."""

    chunks: int
    """Chunks saved."""
    bytes: int
    """Bytes saved (a short last chunk counts its real size)."""
    save_area_high_water: int
    """Most bytes held in the save area at any instant of any transfer."""
    overruns: int
    """Transfers whose save-area peak exceeded the capacity."""


@dataclass(frozen=True)
class GranularityResult:
    """What the simulated updates cost at one granularity (byte counts are totals)."""

    granularity: int
    """Chunk size in bytes."""
    chunks: int
    """Chunks in the volume."""
    bitmap_bytes: int
    """Memory of the delta bitmap (see :func:`bitmap_memory`)."""
    updates: int
    """Updates run (marks)."""
    skipped_updates: int
    """Updates refused because the previous transfer was still running."""
    covered_bytes_written: int
    """Bytes of host writes before the last mark: the writes the updates carried."""
    chunks_transferred: int
    """Chunks sent, all updates together."""
    bytes_transferred: int
    """Bytes sent, all updates together."""
    longest_transfer: float
    """Seconds of the longest transfer."""
    isc: Cofw
    no_clear: Cofw
    classic: Cofw
    tracking_ns_per_write: float
    """Nanoseconds per write of ``DeltaBitmap.record_writes`` (unmarked) on the
    workload's first batch, measured in this run; NaN for a workload without writes."""
    cost: float
    """``bytes_transferred + cofw_weight * isc.bytes``."""

    @property
    def chunks_per_update(self) -> float:
        """Mean chunks sent per update (0 without updates)."""
        return self.chunks_transferred / self.updates if self.updates else 0.0

    @property
    def bytes_per_update(self) -> float:
        """Mean bytes sent per update (0 without updates)."""
        return self.bytes_transferred / self.updates if self.updates else 0.0

    @property
    def amplification(self) -> float:
        """Bytes sent over the bytes of host writes they carried (NaN when none were written).

        Above 1 when writes are smaller than chunks; below 1 when writes hit
        the same chunks between updates.
        """
        if not self.covered_bytes_written:
            return math.nan
        return self.bytes_transferred / self.covered_bytes_written

    @property
    def save_area_fits(self) -> bool:
        """True when isc's save area never ran out."""
        return self.isc.overruns == 0


def bitmap_memory(volume_size: int, granularity: int) -> int:
    """Bytes a :class:`~isc.DeltaBitmap` of this geometry allocates.

    Three bitmaps (tracking, transfer, saved flags) of ``ceil(chunks / 64)``
    uint64 words each, plus each one's summary of one bit per 64 words (also
    in uint64 words). Raises ``ParameterError`` for a bad geometry.
    """
    chunks = check_geometry(volume_size, granularity)
    words = _ceil_div(chunks, 64)
    summary = _ceil_div(_ceil_div(words, 64), 64)
    return 3 * (words + summary) * 8


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def workload_extent(workload: Iterable[IOBatch]) -> int:
    """The least volume size in bytes that holds every I/O of ``workload`` (one pass).

    Raises ``ParameterError`` when the workload holds no I/O; errors of the
    workload (``TraceError``, ``OSError``) propagate.
    """
    extent = 0
    for batch in workload:
        extent = max(extent, int((batch.offset + batch.length).max()))
    if not extent:
        raise ParameterError("the workload holds no I/O: there is nothing to analyse")
    return extent


@dataclass(frozen=True)
class Analysis:
    """The result of :func:`analyze`: the parameters, the workload's totals, one row per
    granularity and the recommendation."""

    workload: str
    volume_size: int
    ios: int
    writes: int
    reads: int
    bytes_written: int
    duration: float
    """Seconds from the first I/O to the last."""
    interval: float
    bandwidth: float
    save_area: int
    cofw_weight: float
    results: tuple[GranularityResult, ...]

    recommended: int = field(init=False)
    """The granularity that :attr:`rule` picks."""
    cost_formula: str = field(init=False)
    rule: str = field(init=False)
    """How :attr:`recommended` is chosen, tie-break included, in words."""

    def __post_init__(self) -> None:
        fitting = self._candidates()
        best = min(fitting, key=lambda row: (row.cost, -row.granularity))
        object.__setattr__(self, "recommended", best.granularity)
        object.__setattr__(
            self,
            "cost_formula",
            f"cost = bytes transferred + {self.cofw_weight:g} x isc COFW bytes "
            "(totals over all updates)",
        )
        object.__setattr__(
            self,
            "rule",
            "the least cost among the granularities whose save area never ran out (among "
            "all of them when none fits); a tie goes to the larger granularity, which "
            "tracks fewer chunks in a smaller bitmap",
        )

    def _candidates(self) -> list[GranularityResult]:
        """The rows the rule chooses among: those whose save area fits, else all."""
        return [row for row in self.results if row.save_area_fits] or list(self.results)

    @property
    def ties(self) -> tuple[int, ...]:
        """The other granularities the rule could have chosen: same least cost (may be empty)."""
        cost = self.result(self.recommended).cost
        return tuple(
            row.granularity
            for row in self._candidates()
            if row.cost == cost and row.granularity != self.recommended
        )

    def warnings(self) -> list[str]:
        """Sentences on how far to trust the recommendation (may be empty).

        Warns when some granularity ran fewer than :data:`FIRM_UPDATES` updates,
        suggesting an interval only where one gives that many: when no update was
        refused and every transfer took less than the interval suggested.
        """
        fewest = min(row.updates for row in self.results)
        if fewest >= FIRM_UPDATES:
            return []
        fix = "analyse a longer workload"
        interval = self.duration / FIRM_UPDATES
        if all(not row.skipped_updates and row.longest_transfer < interval for row in self.results):
            fix += f", or use an interval of at most {_at_most(interval)} s"
        return [
            f"the recommendation rests on {fewest} update{'' if fewest == 1 else 's'} "
            f"(fewer than {FIRM_UPDATES}), too few for typical figures: {fix}"
        ]

    def result(self, granularity: int) -> GranularityResult:
        """The row of ``granularity``; ``KeyError`` when it was not analysed."""
        for row in self.results:
            if row.granularity == granularity:
                return row
        raise KeyError(granularity)

    # -- output ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Everything as plain JSON-ready types (derived figures included in each row)."""
        out = {
            key: value
            for key, value in asdict(self).items()
            if key not in ("results", "cost_formula")
        }
        out["cost_formula"] = self.cost_formula
        out["results"] = [
            {
                **asdict(row),
                "chunks_per_update": row.chunks_per_update,
                "bytes_per_update": row.bytes_per_update,
                "amplification": row.amplification,
                "save_area_fits": row.save_area_fits,
            }
            for row in self.results
        ]
        out["ties"] = list(self.ties)
        out["warnings"] = self.warnings()
        out["advice"] = self.advice()
        return out

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON (NaN written as ``null``)."""
        return json.dumps(_nan_to_none(self.to_dict()), indent=2) + "\n"

    def to_csv(self) -> str:
        """One CSV row per granularity, nested COFW figures as ``isc_bytes`` etc."""
        rows = []
        for row in self.to_dict()["results"]:
            flat = {}
            for key, value in row.items():
                if isinstance(value, dict):
                    flat.update({f"{key}_{k}": v for k, v in value.items()})
                else:
                    flat[key] = value
            rows.append(flat)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def advice(self) -> list[str]:
        """Sentences for the granularities whose save area would have run out (may be empty)."""
        short = [row for row in self.results if not row.save_area_fits]
        if not short:
            return []
        need = max(row.isc.save_area_high_water for row in short)
        labels = ", ".join(size_label(row.granularity) for row in short)
        overruns = max(row.isc.overruns for row in short)
        return [
            f"the save area of {format_bytes(self.save_area, long=True)} would have run out "
            f"at {labels} "
            f"(in up to {overruns} of the transfers; each would abort its mark and resend): "
            f"give it at least {format_bytes(need, long=True)}, or make the large updates "
            "unmarked full copies, which need no save area"
        ]

    def table(self) -> str:
        """The report for a terminal: a summary, one line per granularity, a legend line
        per column, the recommendation with its rule, and any warnings and advice."""
        lines = [
            f"workload: {self.workload}",
            f"volume {format_bytes(self.volume_size, long=True)}; {self.ios} I/Os over "
            f"{self.duration:.1f} s: {self.writes} writes "
            f"({format_bytes(self.bytes_written, long=True)}), {self.reads} reads (ignored)",
            f"an update every {self.interval:g} s, copying at "
            f"{format_bytes(self.bandwidth, long=True)}/s; "
            f"save area {format_bytes(self.save_area, long=True)}",
            "",
        ]
        header = tuple(column[0] for column in _TABLE)
        lines += _columns([header] + [[cell(row) for _, _, cell in _TABLE] for row in self.results])
        width = max(map(len, header))
        known = {
            "interval": f"{self.interval:g}",
            "save_area": format_bytes(self.save_area, long=True),
            "cost_formula": self.cost_formula,
        }
        lines += ["", "columns (bytes: B, K = KiB, M = MiB, G = GiB):"]
        lines += [f"  {name:<{width}}  {text.format(**known)}" for name, text, _ in _TABLE]
        best = self.result(self.recommended)
        lines += [
            "",
            f"recommended granularity: {size_label(best.granularity)} "
            f"(cost {format_bytes(best.cost, long=True)}"
            + ("" if best.save_area_fits else "; no granularity fits the save area")
            + ")",
            f"rule: {self.rule}",
        ]
        if self.ties:
            *others, last = map(size_label, self.ties)
            labels = f"{', '.join(others)} and {last}" if others else last
            verb = "cost" if others else "costs"
            lines.append(f"tie: {labels} {verb} the same; the larger granularity wins")
        lines += [f"warning: {sentence}" for sentence in self.warnings()]
        lines += [f"advice: {sentence}" for sentence in self.advice()]
        return "\n".join(lines) + "\n"

    def figure(self) -> Any:
        """The trade-off against granularity as a matplotlib ``Figure`` of four panels.

        Bytes to transfer per update; COFW bytes of the three variants; the
        host-side cost (ns per write of tracking, and the bitmap's memory on
        a second axis); and the cost the recommendation minimises, with the
        recommended granularity starred and those whose save area runs out
        crossed. A dotted line marks the recommended granularity on every
        panel; the title names the workload, the interval and the bandwidth.
        Raises ``PlotUnavailable`` (an IscError) when matplotlib is not installed.
        """
        fig = _plot.figure(11, 8)
        rows = self.results
        grans = [row.granularity for row in rows]
        best = self.result(self.recommended)
        (transfer, cofw), (host, cost) = fig.subplots(2, 2)

        scale, unit = _plot.byte_unit(max(row.bytes_per_update for row in rows))
        values = [row.bytes_per_update / scale for row in rows]
        transfer.plot(grans, values, "o-", label="bytes per update")
        transfer.set_ylabel(f"{unit} per update")
        transfer.set_title("bytes to transfer per update")

        variants = (("isc", "o-"), ("no_clear", "s--"), ("classic", "^:"))
        scale, unit = _plot.byte_unit(
            max(getattr(row, v).bytes for row in rows for v, _ in variants)
        )
        for name, style in variants:
            values = [getattr(row, name).bytes / scale for row in rows]
            cofw.plot(grans, values, style, label=name.replace("_", "-"))
        cofw.set_ylabel(f"{unit} saved")
        cofw.set_title("COFW bytes during the transfers, all updates")
        cofw.legend(title="COFW variant")

        (ns,) = host.plot(
            grans,
            [row.tracking_ns_per_write for row in rows],
            "o-",
            color="C0",
            label="ns per write",
        )
        host.set_ylabel("ns per write (record_writes)", color="C0")
        memory = host.twinx()
        scale, unit = _plot.byte_unit(max(row.bitmap_bytes for row in rows))
        (bitmap,) = memory.plot(
            grans,
            [row.bitmap_bytes / scale for row in rows],
            "s--",
            color="C1",
            label="bitmap memory",
        )
        memory.set_ylabel(f"bitmap memory ({unit})", color="C1")
        memory.margins(y=0.1)
        memory.set_ylim(bottom=0)
        host.set_title("host-side cost of tracking")
        host.legend(handles=[ns, bitmap])

        scale, unit = _plot.byte_unit(max(row.cost for row in rows))
        cost.plot(grans, [row.cost / scale for row in rows], "o-", label="cost")
        short = [row for row in rows if not row.save_area_fits]
        if short:
            cost.plot(
                [row.granularity for row in short],
                [row.cost / scale for row in short],
                "x",
                color="C3",
                markersize=10,
                markeredgewidth=2,
                label="save area runs out",
            )
        cost.plot(
            [best.granularity],
            [best.cost / scale],
            "*",
            color="C2",
            markersize=18,
            label=f"recommended: {size_label(best.granularity)}",
        )
        cost.set_ylabel(f"{unit}, all updates")
        cost.set_title(self.cost_formula.split(" (")[0])
        cost.legend()

        for ax in (transfer, cofw, host, cost):
            _plot.granularity_axis(ax, grans, size_label)
            ax.axvline(best.granularity, color="0.4", linestyle=":", gid="recommended")
            ax.margins(x=0.06, y=0.1)
            ax.set_ylim(bottom=0)
        fig.suptitle(
            f"{self.workload}\nan update every {self.interval:g} s, copying at "
            f"{format_bytes(self.bandwidth, long=True)}/s, save area "
            f"{format_bytes(self.save_area, long=True)}: "
            f"{size_label(best.granularity)} recommended",
            fontsize="medium",
        )
        return fig

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Draw :meth:`figure` to a PNG at ``path``.

        Raises ``PlotUnavailable`` (an IscError) when matplotlib is not
        installed; ``OSError`` when ``path`` cannot be written.
        """
        self.figure().savefig(os.fspath(path), format="png", dpi=100)


def _cofw_ratio(row: GranularityResult) -> str:
    if not row.classic.bytes:
        return "-"
    return f"{row.isc.bytes / row.classic.bytes:.1%}"


# The table's columns: header, legend (str.format fields: interval, save_area,
# cost_formula), and the cell of a row.
_TABLE: tuple[tuple[str, str, Callable[[GranularityResult], str]], ...] = (
    ("gran", "granularity: the chunk size", lambda row: size_label(row.granularity)),
    ("updates", "updates run (marks), one due every {interval} s", lambda row: str(row.updates)),
    (
        "skipped",
        "updates refused because the transfer before was still running",
        lambda row: str(row.skipped_updates),
    ),
    ("chunks/upd", "chunks sent per update, mean", lambda row: f"{row.chunks_per_update:.1f}"),
    ("bytes/upd", "bytes sent per update, mean", lambda row: format_bytes(row.bytes_per_update)),
    (
        "ampl",
        "amplification: bytes sent / bytes of the host writes they carried",
        lambda row: f"{row.amplification:.2f}",
    ),
    (
        "COFW isc",
        "bytes copied on first write during the transfers, all updates; isc saves "
        "transfer chunks not yet sent",
        lambda row: format_bytes(row.isc.bytes),
    ),
    (
        "no-clear",
        "the same without clearing chunks as they are sent: transfer chunks, sent or not",
        lambda row: format_bytes(row.no_clear.bytes),
    ),
    (
        "classic",
        "the same for a classic snapshot: the first write to any chunk during a transfer",
        lambda row: format_bytes(row.classic.bytes),
    ),
    ("isc/classic", "COFW isc as a share of classic", _cofw_ratio),
    (
        "save peak",
        "isc's save-area high water: the most bytes held at once",
        lambda row: format_bytes(row.isc.save_area_high_water),
    ),
    (
        "fits",
        "yes: the save area of {save_area} never ran out; NO: a mark would have aborted",
        lambda row: "yes" if row.save_area_fits else "NO",
    ),
    (
        "bitmap",
        "host memory of the delta bitmap: tracking + transfer + saved flags",
        lambda row: format_bytes(row.bitmap_bytes),
    ),
    (
        "ns/write",
        "host-side tracking cost: ns per write of record_writes, timed on the first batch",
        lambda row: f"{row.tracking_ns_per_write:.1f}",
    ),
    (
        "cost",
        "{cost_formula}: what the rule minimises",
        lambda row: format_bytes(row.cost),
    ),
)


def _at_most(value: float) -> str:
    """``value`` > 0 with three significant digits, rounded down."""
    scale = 10.0 ** (math.floor(math.log10(value)) - 2)
    return f"{math.floor(value / scale) * scale:.3g}"


def _columns(cells: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


# -- the simulation --------------------------------------------------------------------


class _Transfer:
    """One running transfer: its chunks, their sent times and what was saved so far."""

    def __init__(self, k: int, start: float, chunks: np.ndarray, sizes: np.ndarray, rate: float):
        self.k = k
        self.start = start
        self.chunks = chunks
        self.sizes = sizes
        cumulative = np.cumsum(sizes)
        self.sent = start + cumulative / rate
        self.end = float(self.sent[-1]) if chunks.size else start
        self.fronts = np.append(chunks, chunks[-1] + 1 if chunks.size else 0)
        self.nbytes = int(cumulative[-1]) if chunks.size else 0
        self.cleared = 0  # chunks[:cleared] have their transfer bits cleared
        self.touched: list[np.ndarray] = []  # chunks first written during this transfer
        self.isc_events: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.classic_bytes = 0
        self.no_clear_bytes = 0


class _Simulation:
    """The updates of one granularity, fed the workload's writes in time order."""

    def __init__(
        self, size: int, granularity: int, interval: float, bandwidth: float, capacity: int
    ):
        self.bitmap = DeltaBitmap(size, granularity)
        self.size = size
        self.g = granularity
        self.shift = granularity.bit_length() - 1
        self.nchunks = self.bitmap.chunks
        self.interval = interval
        self.bandwidth = bandwidth
        self.capacity = capacity
        self.written = _Bits(self.nchunks)  # chunks written during the current transfer
        self.k = 1  # the next update is due at k * interval
        self.transfer: _Transfer | None = None
        self.updates = self.skipped = 0
        self.bytes_written = self.covered = 0
        self.chunks_sent = self.bytes_sent = 0
        self.longest = 0.0
        # per variant: [chunks, bytes, high water, overruns]
        self.figures = {name: [0, 0, 0, 0] for name in ("isc", "no_clear", "classic")}

    def chunk_bytes(self, chunks: np.ndarray) -> np.ndarray:
        """Bytes of each chunk (the last one of the volume may be short)."""
        return np.minimum(self.g, self.size - chunks * self.g)

    # -- the clock ---------------------------------------------------------------------
    def feed(self, times: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """Apply writes (times never decreasing, after every write fed before)."""
        i, n = 0, times.size
        while i < n:
            transfer = self.transfer
            if not transfer:
                self._empty_updates(float(times[i]))
            due = transfer.end if transfer else self.k * self.interval
            # Writes before the next event; all earlier ones were before earlier events.
            j = int(np.searchsorted(times, due, side="left"))
            if j > i:
                if transfer:
                    self._during(transfer, times[i:j], offsets[i:j], lengths[i:j])
                else:
                    self._unmarked(offsets[i:j], lengths[i:j])
            if j == n:
                return
            if transfer:
                self._end(transfer)
            else:
                self._start()
            i = j

    def finish(self, last: float) -> None:
        """Run the updates due up to ``last`` (the last I/O's time) and end the last transfer."""
        while True:
            if self.transfer:
                self._end(self.transfer)
                continue
            self._empty_updates(last)
            if self.k * self.interval <= last:
                self._start()
            else:
                return

    # -- the events --------------------------------------------------------------------
    def _empty_updates(self, until: float) -> None:
        """Count at once the updates due by ``until`` while nothing is tracked (no-ops)."""
        if self.k * self.interval > until or self.bitmap.tracking_count:
            return
        last = max(self.k, math.floor(until / self.interval))
        while last * self.interval > until:
            last -= 1
        while (last + 1) * self.interval <= until:
            last += 1
        self._count_updates(last - self.k + 1)
        self.k = last + 1

    def _count_updates(self, count: int) -> None:
        if self.updates + count > MAX_UPDATES:
            raise ParameterError(
                f"an update every {self.interval:g} s makes more than {MAX_UPDATES} updates "
                "over this workload; use a longer interval"
            )
        self.updates += count
        self.covered = self.bytes_written

    def _start(self) -> None:
        self._count_updates(1)
        start = self.k * self.interval
        self.bitmap.mark()
        runs = self.bitmap.extents()
        chunks = _expand(runs[:, 0], runs[:, 1]) if runs.size else np.empty(0, np.int64)
        transfer = _Transfer(self.k, start, chunks, self.chunk_bytes(chunks), self.bandwidth)
        self.transfer = transfer
        self.chunks_sent += chunks.size
        self.bytes_sent += transfer.nbytes
        self.longest = max(self.longest, transfer.end - start)

    def _end(self, transfer: _Transfer) -> None:
        self._clear_sent(transfer, transfer.chunks.size)
        if self.bitmap.transfer_count or self.bitmap.saved_count:
            raise ModelMismatch(
                f"granularity {self.g}: {self.bitmap.transfer_count} transfer bits and "
                f"{self.bitmap.saved_count} saved flags left after the last chunk was sent"
            )
        self.bitmap.unmark()
        self._account("isc", self._isc_high_water(transfer))
        self._account("no_clear", transfer.no_clear_bytes)
        self._account("classic", transfer.classic_bytes)
        if transfer.touched:
            self.written.clear(np.concatenate(transfer.touched))
        self.transfer = None
        # The next update is the first one due after this one and not before the end.
        k = max(transfer.k + 1, math.ceil(transfer.end / self.interval))
        while k * self.interval < transfer.end:
            k += 1
        while k - 1 > transfer.k and (k - 1) * self.interval >= transfer.end:
            k -= 1
        self.skipped += k - transfer.k - 1
        self.k = k

    def _account(self, variant: str, peak: int) -> None:
        figures = self.figures[variant]
        figures[2] = max(figures[2], peak)
        figures[3] += peak > self.capacity

    # -- writes --------------------------------------------------------------------------
    def _unmarked(self, offsets: np.ndarray, lengths: np.ndarray) -> None:
        self.bitmap.record_writes(offsets, lengths)
        self.bytes_written += int(lengths.sum())

    def _during(
        self, transfer: _Transfer, times: np.ndarray, offsets: np.ndarray, lengths: np.ndarray
    ) -> None:
        self.bytes_written += int(lengths.sum())
        chunks, sent = transfer.chunks, transfer.sent
        # ranks[w]: transfer chunks sent by write w's time; they lie below byte front[w].
        ranks = np.searchsorted(sent, times, side="right")
        front = transfer.fronts[ranks] * self.g
        ends = offsets + lengths
        # The engine: clear what was sent before the first write; each write's part
        # at or past its front may need COFW. Its part below the front touches only
        # sent or untransferred chunks: recorded once those are cleared, it must
        # not need COFW.
        self._clear_sent(transfer, int(ranks[0]))
        upper = np.minimum(np.maximum(offsets, front), ends)
        engine = self.bitmap.record_writes(upper, ends - upper)
        self._clear_sent(transfer, int(ranks[-1]))
        below = self.bitmap.record_writes(offsets, np.clip(front - offsets, 0, lengths))
        # The model: the first write to each chunk during this transfer.
        first = offsets >> self.shift
        count = ((ends - 1) >> self.shift) - first + 1
        pair_chunks = _expand(first, count)
        pair_times = np.repeat(times, count)
        fresh = ~self.written.test(pair_chunks)
        new, at = np.unique(pair_chunks[fresh], return_index=True)
        saved_at = pair_times[fresh][at]
        self.written.set_sorted(new)
        transfer.touched.append(new)
        sizes = self.chunk_bytes(new)
        self._add("classic", new.size, int(sizes.sum()))
        transfer.classic_bytes += int(sizes.sum())
        # A transfer with writes during it has chunks: an empty one ends as it starts.
        rank = np.minimum(np.searchsorted(chunks, new), chunks.size - 1)
        in_transfer = chunks[rank] == new
        self._add("no_clear", int(in_transfer.sum()), int(sizes[in_transfer].sum()))
        transfer.no_clear_bytes += int(sizes[in_transfer].sum())
        isc = in_transfer & (saved_at < sent[rank])
        if below.size or not np.array_equal(np.sort(engine), new[isc]):
            raise ModelMismatch(
                f"granularity {self.g}, writes from t={times[0]:.6f} s: the delta bitmap saved "
                f"{engine.size + below.size} chunks where the model saves {int(isc.sum())}"
            )
        self._add("isc", int(isc.sum()), int(sizes[isc].sum()))
        if isc.any():
            transfer.isc_events.append((saved_at[isc], sent[rank[isc]], sizes[isc]))

    def _add(self, variant: str, chunks: int, nbytes: int) -> None:
        figures = self.figures[variant]
        figures[0] += chunks
        figures[1] += nbytes

    def _clear_sent(self, transfer: _Transfer, rank: int) -> None:
        """Clear the transfer bits of ``chunks[:rank]`` (sent), as the copy job does."""
        if rank > transfer.cleared:
            first = int(transfer.chunks[transfer.cleared])
            last = int(transfer.chunks[rank - 1])
            self.bitmap.clear_transfer(first, last - first + 1)
            transfer.cleared = rank

    @staticmethod
    def _isc_high_water(transfer: _Transfer) -> int:
        """Peak bytes held: each saved chunk from its save until it is sent."""
        if not transfer.isc_events:
            return 0
        saves, frees, sizes = (
            np.concatenate(part) for part in zip(*transfer.isc_events, strict=True)
        )
        times = np.concatenate([saves, frees])
        deltas = np.concatenate([sizes, -sizes])
        # At equal times frees go first: a write at a chunk's sent time finds it sent.
        order = np.lexsort((deltas, times))
        return int(max(0, np.cumsum(deltas[order]).max()))

    def result(self, cofw_weight: float, ns_per_write: float) -> GranularityResult:
        cofw = {name: Cofw(*values) for name, values in self.figures.items()}
        return GranularityResult(
            granularity=self.g,
            chunks=self.nchunks,
            bitmap_bytes=bitmap_memory(self.size, self.g),
            updates=self.updates,
            skipped_updates=self.skipped,
            covered_bytes_written=self.covered,
            chunks_transferred=self.chunks_sent,
            bytes_transferred=self.bytes_sent,
            longest_transfer=self.longest,
            isc=cofw["isc"],
            no_clear=cofw["no_clear"],
            classic=cofw["classic"],
            tracking_ns_per_write=ns_per_write,
            cost=self.bytes_sent + cofw_weight * cofw["isc"].bytes,
        )


class _Bits:
    """A packed bit per chunk, tested and set a whole array of chunks at a time."""

    def __init__(self, count: int) -> None:
        # Zeroed lazily by the kernel: pages never touched cost no memory.
        self.bytes = np.zeros(-(-count // 8), dtype=np.uint8)

    def test(self, chunks: np.ndarray) -> np.ndarray:
        """The bits of ``chunks``, as bools."""
        return (self.bytes[chunks >> 3] >> (chunks & 7).astype(np.uint8)) & 1 == 1

    def set_sorted(self, chunks: np.ndarray) -> None:
        """Set the bits of ``chunks`` (ascending, no repeats)."""
        if not chunks.size:
            return
        index = chunks >> 3
        masks = np.left_shift(1, chunks & 7).astype(np.uint8)
        starts = np.flatnonzero(np.diff(index, prepend=-1))
        self.bytes[index[starts]] |= np.bitwise_or.reduceat(masks, starts)

    def clear(self, chunks: np.ndarray) -> None:
        """Zero the bytes that hold ``chunks``' bits: every set bit must lie among them."""
        self.bytes[chunks >> 3] = 0


def _expand(first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``concatenate([arange(f, f + c) for f, c in zip(first, count)])``, vectorised."""
    total = int(count.sum())
    starts = np.repeat(first - (np.cumsum(count) - count), count)
    return starts + np.arange(total, dtype=np.int64)


def _tracking_cost(size: int, granularity: int, offsets: np.ndarray, lengths: np.ndarray):
    """Median ns per write of ``record_writes`` on a fresh, unmarked bitmap."""
    if not offsets.size:
        return math.nan
    bitmap = DeltaBitmap(size, granularity)
    samples = []
    for repeat in range(_TIMING_REPEATS + 1):
        bitmap.clear_tracking()
        start = time.perf_counter_ns()
        bitmap.record_writes(offsets, lengths)
        elapsed = time.perf_counter_ns() - start
        if repeat:  # the first run warms the caches and maps the bitmap's pages
            samples.append(elapsed / offsets.size)
    return statistics.median(samples)


# -- the entry point -------------------------------------------------------------------


def _check_real(name: str, value, low: float, *, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ParameterError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or (strict and value == low):
        relation = ">" if strict else ">="
        raise ParameterError(f"{name} must be a finite number {relation} {low:g}, got {value}")
    return value


def _check_granularities(granularities: Iterable[int], size: int) -> list[int]:
    checked = set()
    for g in granularities:
        check_geometry(size, g)
        checked.add(int(g))
    if not checked:
        raise ParameterError("give at least one granularity to analyse")
    return sorted(checked)


def analyze(
    workload: Workload | Iterable[IOBatch],
    granularities: Iterable[int] = DEFAULT_GRANULARITIES,
    *,
    interval: float = DEFAULT_INTERVAL,
    bandwidth: float = DEFAULT_BANDWIDTH,
    save_area: int = DEFAULT_SAVE_AREA,
    cofw_weight: float = 1.0,
    volume_size: int | None = None,
) -> Analysis:
    """Simulate periodic updates of ``workload`` at each granularity (see the module docstring).

    ``granularities`` are chunk sizes in bytes (powers of two, 2 KiB to 64
    KiB); ``interval`` is seconds between updates, ``bandwidth`` the copy rate
    in bytes per second, ``save_area`` the save area's capacity in bytes,
    ``cofw_weight`` the weight of a COFW byte against a transferred byte in
    the cost. ``volume_size`` (bytes) defaults to the workload's
    ``volume_size`` or, when it has none (a trace read without one), to the
    extent of its I/O, found by a first pass over it.

    The simulation reads the workload once, whatever the number of
    granularities. Raises ``TypeError`` for a granularity that is
    not an integer; ``ParameterError`` (a ValueError) for a bad parameter, a
    workload without writes or that ends before the first update is due, or
    more than :data:`MAX_UPDATES` updates; ``RangeError`` for an I/O outside
    ``volume_size``. Errors of the workload (``TraceError``,
    ``OSError``) propagate. Nothing is changed outside the returned object.
    """
    interval = _check_real("interval", interval, 0.0, strict=True)
    bandwidth = _check_real("bandwidth", bandwidth, 0.0, strict=True)
    cofw_weight = _check_real("cofw_weight", cofw_weight, 0.0, strict=False)
    if isinstance(save_area, bool) or not isinstance(save_area, (int, np.integer)):
        raise ParameterError(f"save_area must be an integer number of bytes, got {save_area!r}")
    if save_area < 0:
        raise ParameterError(f"save_area must be >= 0 bytes, got {save_area}")
    grans = list(granularities)
    if volume_size is None:
        volume_size = getattr(workload, "volume_size", None)
    if volume_size is None:
        _check_granularities(grans, MAX_GRANULARITY)
        volume_size = workload_extent(workload)
    grans = _check_granularities(grans, volume_size)
    sims = [_Simulation(volume_size, g, interval, bandwidth, int(save_area)) for g in grans]
    ios = writes = bytes_written = 0
    last = 0.0
    sample: tuple[np.ndarray, np.ndarray] | None = None
    for batch in workload:
        ios += len(batch)
        last = float(batch.time[-1]) if len(batch) else last
        w = batch.write
        times, offsets, lengths = batch.time[w], batch.offset[w], batch.length[w]
        if not times.size:
            continue
        writes += times.size
        bytes_written += int(lengths.sum())
        if sample is None:
            sample = (offsets[:_TIMING_WRITES].copy(), lengths[:_TIMING_WRITES].copy())
        for sim in sims:
            sim.feed(times, offsets, lengths)
    if not writes:
        raise ParameterError("the workload holds no writes: there is nothing to track")
    if last < interval:
        raise ParameterError(_too_short(ios, last, interval))
    results = []
    for sim in sims:
        sim.finish(last)
        ns = _tracking_cost(volume_size, sim.g, *sample) if sample else math.nan
        results.append(sim.result(cofw_weight, ns))
    return Analysis(
        workload=str(workload) if isinstance(workload, Workload) else "I/O batches",
        volume_size=int(volume_size),
        ios=ios,
        writes=writes,
        reads=ios - writes,
        bytes_written=bytes_written,
        duration=last,
        interval=interval,
        bandwidth=bandwidth,
        save_area=int(save_area),
        cofw_weight=cofw_weight,
        results=tuple(results),
    )


def _too_short(ios: int, last: float, interval: float) -> str:
    """Why no update falls inside a workload whose last I/O is at ``last`` seconds,
    with the fix that helps."""
    if ios == 1:
        return "the workload holds a single I/O: no update can fall inside it"
    if last == 0:
        return (
            f"all {ios} I/Os of the workload are at time 0, as in a trace without "
            "timestamps (a fio version 2 iolog without wait lines), so no update can fall "
            "inside it: give the trace a rate to space its I/Os (isc analyze --rate IOPS, "
            "read_trace(..., rate=IOPS))"
        )
    return (
        f"the workload lasts {last:g} s, less than the update interval of {interval:g} s: "
        f"no update would run; use an interval of at most {_at_most(last)} s"
    )
