"""Destination fingerprints: a destination is the one it was (rule 12).

An incremental copy sends only what changed, so it relies on the
destination still holding what the copies before it sent. A destination that
was replaced or wiped since (a volume re-created, an ``nbdkit memory``
target restarted) would take the increment and be reported CONSISTENT while
it holds a mix. Before an incremental copy relies on a destination, isc
checks a few of its chunks against checksums it took after the last copy
that wrote them:

===============  ===========================================================
after a copy     each destination that completed it gets :data:`SAMPLES`
                 fresh samples ``(chunk, crc32)``, read back from the
                 destination, chosen at random among the chunks the copy
                 wrote and among all chunks, chunks holding data preferred
                 over zero-filled ones; it keeps older samples of chunks the
                 copy did not write, up to ``2 * SAMPLES``. Each chunk read
                 back is compared with the source's where no host write came
                 since: one that differs (a destination that acknowledged
                 writes it did not make) takes it out of the copy, NEW
before a copy    samples of chunks the copy may write are dropped first
                 (they are about to change), so a failed copy leaves none
                 that could disagree with the destination for a good reason
at a flush       during a copy, each destination still in it gets up to
                 :data:`SAMPLES` samples among the chunks flushed since the
                 last flush, so one that drops out of the copy later keeps
                 samples of what it holds
after a crash    a persistent session's record of a running copy keeps the
                 samples from before it, and each checkpoint during the copy
                 writes those its destinations hold then (:mod:`isc.store`):
                 each holds on the destination or names a chunk the
                 recovered bitmaps track, so a destination replaced after a
                 crash mid-copy is found too
check            each remaining sample whose chunk is not in the tracking or
                 transfer bitmap (those may differ for a good reason) is
                 read from the destination; one mismatch makes the
                 destination NEW: its next copy is a full one. One that
                 cannot be read is checked again once the copy flushed it
                 (a reconnecting LUN may have reached another volume): a
                 mismatch or a read error then takes it out of the copy
===============  ===========================================================

Cost: up to ``2 * SAMPLES`` chunk reads per destination to check it, as
many to take new samples after the copy, and up to ``SAMPLES`` at each
flush during it (every ``flush_every`` bytes, see :mod:`isc.copy`).

How likely a replaced destination escapes: it must hold, in every sampled
chunk, exactly the bytes the last copy left there. A wiped or fresh
destination (zeros) escapes only when every sampled chunk of the image is
zero-filled, which the preference for data makes rare: only an image with
fewer than :data:`SAMPLES` non-zero chunks among those read. Samples of
chunks written since they were taken are skipped, so under a workload that
rewrites most of the volume between two copies few samples are checked.
A destination replaced by a copy of itself escapes, rightly: it holds the
same image. The samples are random, so a destination whose damage is
limited to some chunks is found only when a sample falls in one of them:
this is a guard against replacement, not a scrub.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

SAMPLES = 4
"""Chunks of each destination whose checksum is kept after a copy."""

Sample = tuple[int, int]
"""``(chunk, crc32 of its bytes on the destination)``."""

_random = random.SystemRandom()


def _chunk(lun, chunk: int, granularity: int, size: int) -> bytes:
    start = chunk * granularity
    return lun.read(start, min(granularity, size - start))


def take(
    lun,
    runs: np.ndarray,
    granularity: int,
    size: int,
    kept: Sequence[Sample] = (),
    anywhere: bool = True,
    source=None,
    bitmap=None,
) -> list[Sample]:
    """Samples of ``lun`` after a copy that wrote the chunks of ``runs`` ((first, count) rows).

    Reads ``SAMPLES`` random chunks among those of ``runs`` and, if
    ``anywhere`` (after a copy, not in the middle of one), as many among
    all of ``lun``'s (the chunks a copy just wrote are often written again
    soon, and a chunk written since its sample is not checked), keeps
    :data:`SAMPLES` of them, those holding data first, and adds the ``kept``
    samples of chunks the copy did not write, up to ``2 * SAMPLES`` in all.
    With ``source`` and its session's ``bitmap``, each chunk read back is
    compared with the source's where the tracking bitmap shows no host write
    since the copy began: one that differs raises :class:`Differs`.
    """
    chunks = -(-size // granularity)
    counts = runs[:, 1] if len(runs) else np.empty(0, dtype=np.int64)
    total = int(counts.sum())
    ends = np.cumsum(counts)
    picks = set()
    for pick in _random.sample(range(total), min(SAMPLES, total)):
        row = int(np.searchsorted(ends, pick, side="right"))
        picks.add(int(runs[row, 0]) + pick - int(ends[row] - counts[row]))
    if anywhere:
        picks.update(_random.sample(range(chunks), min(SAMPLES, chunks)))
    found = []
    for chunk in sorted(picks):
        data = _chunk(lun, chunk, granularity, size)
        if source is not None and _differs(data, source, bitmap, chunk, granularity, size):
            raise Differs(
                f"chunk {chunk} read back does not hold what the copy sent there (the "
                "destination acknowledged writes it did not make, or another writer changed it)"
            )
        found.append((data == bytes(len(data)), chunk, zlib.crc32(data)))
    found.sort(key=lambda f: f[0])  # chunks holding data first (the sort is stable)
    fresh = [(chunk, crc) for _, chunk, crc in found[:SAMPLES]]
    taken = {chunk for chunk, _ in fresh}
    fresh += [s for s in kept if s[0] not in taken][: 2 * SAMPLES - len(fresh)]
    return sorted(fresh)


def _differs(data: bytes, source, bitmap, chunk: int, granularity: int, size: int) -> bool:
    """Whether ``data`` is not the source's chunk, which no host write changed since the
    copy began; False when that cannot be told (a write came, or the source failed)."""
    try:
        expected = _chunk(source, chunk, granularity, size)
    except Exception:
        return False  # the source's trouble is not the destination's
    # Read first, then the bit: a host write sets it before it changes the data.
    return not bitmap.tracking(chunk) and expected != data


class Differs(Exception):
    """A chunk read back from a destination differs from what it must hold."""


def prune(samples: list[Sample], bitmap) -> list[Sample]:
    """``samples`` without those whose chunk is in the tracking or transfer bitmap."""
    return [(c, crc) for c, crc in samples if not (bitmap.tracking(c) or bitmap.transfer(c))]


def mismatch(lun, samples: list[Sample], bitmap, granularity: int, size: int) -> str | None:
    """How ``lun`` differs from its samples, or None when every checked sample matches.

    Samples of chunks in the tracking or transfer bitmap are skipped (those
    chunks may differ for a good reason). Read errors propagate.
    """
    for chunk, crc in prune(samples, bitmap):
        data = _chunk(lun, chunk, granularity, size)
        if zlib.crc32(data) != crc:
            return (
                f"chunk {chunk} does not hold what the last copy wrote there "
                "(the destination was replaced or overwritten)"
            )
    return None
