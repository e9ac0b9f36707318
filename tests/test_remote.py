"""LocalSite and Protection: the snapshot that keeps a destination's last consistent image.

Rule 8 from the site's side: while protected, every write to the destination
goes through a snapshot that saves each 64 KiB chunk's original data once;
rollback writes those back and reports what it rewrote; a snapshot that runs
out of room says so and refuses to roll back, while the writes still land
(rule 5). The update workflows that drive these requests are tested in
``test_update.py``.
"""

from __future__ import annotations

import random

from helpers import chunk_bytes, chunks_touched, fill_random

from isc import Destination, MemoryLUN
from isc.remote import PROTECT_GRANULARITY, LocalSite, ProtectedLUN, saved_extents

P = PROTECT_GRANULARITY
SIZE = 3 * P + 1000  # a short last protection chunk


def destination(seed: int = 0) -> tuple[Destination, MemoryLUN, bytes]:
    """A destination on a random MemoryLUN; the LUN and its image."""
    lun = MemoryLUN(SIZE)
    image = fill_random(lun, random.Random(seed))
    return Destination(lun, "d0"), lun, image


def overwrite(dest: Destination, rng: random.Random, writes: list[tuple[int, int]]) -> set[int]:
    """Write random data through ``dest.lun`` at ``writes``; the protection chunks touched."""
    for offset, length in writes:
        dest.lun.write(offset, rng.randbytes(length))
    return {c for offset, length in writes for c in chunks_touched(offset, length, P)}


WRITES = [(100, 50), (P - 10, 20), (3 * P + 500, 500)]  # chunks 0, 0-1 and the short 3


def test_protect_routes_writes_through_a_snapshot_that_rollback_writes_back():
    dest, lun, image = destination()
    site = LocalSite()
    ack = site.protect(dest)
    assert ack.ok and ack.reason is None
    assert isinstance(dest.lun, ProtectedLUN) and dest.lun.lun is lun
    assert dest.lun.size == SIZE
    rng = random.Random(1)
    for round_ in range(2):  # a rollback starts a fresh snapshot of the restored image
        chunks = overwrite(dest, rng, WRITES)
        assert lun.read(0, SIZE) != image  # the writes landed
        info = site.status(dest).info
        assert info["protected"] and info["intact"] and info["problem"] is None
        assert info["saved_chunks"] == len(chunks) == 3
        assert info["saved_bytes"] == sum(chunk_bytes(c, P, SIZE) for c in chunks)
        # Adjacent chunks 0 and 1 make one range; the short last chunk another.
        ranges = [(0, 2 * P), (3 * P, SIZE - 3 * P)]
        assert info["extents"] == [list(r) for r in ranges]  # what a rollback would rewrite
        ack = site.rollback(dest)
        assert ack.ok, round_
        assert list(ack.extents) == ranges
        assert lun.read(0, SIZE) == image
        assert isinstance(dest.lun, ProtectedLUN)  # still protected
        assert site.status(dest).info["saved_chunks"] == 0
    overwrite(dest, rng, WRITES)
    ack = site.unprotect(dest)
    assert ack.ok and ack.reason is None
    assert dest.lun is lun
    assert site.status(dest).info == {"protected": False}


def test_protecting_a_protected_destination_succeeds_and_keeps_the_first_image():
    dest, lun, image = destination()
    site = LocalSite()
    assert site.protect(dest).ok
    front = dest.lun
    overwrite(dest, random.Random(2), WRITES)
    ack = site.protect(dest)  # left over from a failed update
    assert ack.ok and ack.reason == "already protected"
    assert dest.lun is front
    assert site.rollback(dest).ok
    assert lun.read(0, SIZE) == image  # the image at the first protect


def test_requests_about_an_unprotected_destination():
    dest, lun, image = destination()
    site = LocalSite()
    ack = site.unprotect(dest)
    assert ack.ok and ack.reason == "not protected"
    ack = site.rollback(dest)
    assert not ack.ok and "not protected" in ack.reason and ack.extents == ()
    assert site.status(dest).info == {"protected": False}
    assert dest.lun is lun and lun.read(0, SIZE) == image


def test_a_snapshot_that_runs_out_refuses_to_roll_back_but_writes_land():
    dest, lun, _ = destination()
    site = LocalSite(capacity=P)  # room for one protection chunk
    assert site.protect(dest).ok
    rng = random.Random(3)
    data = rng.randbytes(2 * P)
    dest.lun.write(0, data)  # needs two chunks saved
    assert lun.read(0, 2 * P) == data  # rule 5: the write still landed
    info = site.status(dest).info
    assert info["protected"] and not info["intact"]
    assert "save area full" in info["problem"]
    ack = site.rollback(dest)
    assert not ack.ok and "the protected image was lost" in ack.reason
    assert lun.read(0, 2 * P) == data  # a refused rollback writes nothing
    assert site.unprotect(dest).ok
    assert dest.lun is lun


def test_protected_lun_reads_flushes_and_closes_the_destination_lun():
    dest, lun, image = destination()
    site = LocalSite()
    site.protect(dest)
    front = dest.lun
    assert front.read(10, 100) == image[10:110]
    buffer = bytearray(200)
    front.readinto(P - 100, buffer)
    assert bytes(buffer) == image[P - 100 : P + 100]
    front.flush()
    assert not front.closed
    front.close()
    assert front.closed and lun.closed


def test_request_ids_are_distinct_and_increasing():
    dest, _, _ = destination()
    site = LocalSite()
    ids = [
        site.protect(dest).request_id,
        site.status(dest).request_id,
        site.rollback(dest).request_id,
        site.unprotect(dest).request_id,
        LocalSite().status(dest).request_id,
    ]
    assert ids == sorted(set(ids))


def test_saved_extents_merge_adjacent_chunks_and_the_smallest_gaps_past_the_limit():
    size = 20 * P + 7  # a short last chunk, number 20
    assert saved_extents([], P, size) == ()
    assert saved_extents([0, 1, 2, 5, 20], P, size) == ((0, 3 * P), (5 * P, P), (20 * P, 7))
    # Gaps of 2, 1 and 3 chunks between four runs: the gap of 1 is merged first, then of 2.
    chunks = [0, 3, 5, 9]
    assert saved_extents(chunks, P, size, limit=3) == ((0, P), (3 * P, 3 * P), (9 * P, P))
    assert saved_extents(chunks, P, size, limit=2) == ((0, 6 * P), (9 * P, P))
    assert saved_extents(chunks, P, size, limit=1) == ((0, 10 * P),)
    many = list(range(0, 20, 2))
    covered = saved_extents(many, P, size, limit=4)
    assert len(covered) == 4
    assert all(any(o <= c * P < o + n for o, n in covered) for c in many)
