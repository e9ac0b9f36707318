"""LocalSite and Protection: the snapshot that keeps a destination's last consistent image.

Also the addresses of agents (``HOST:PORT``, ``unix:PATH``) as a session
remembers them; what an :class:`AgentSite` says when its agent fails is
tested through the ``isc`` command in ``test_agent.py``.

Rule 8 from the site's side: while protected, every write to the destination
goes through a snapshot that saves each 64 KiB chunk's original data once;
rollback writes those back and reports what it rewrote. A save that fails (a
snapshot out of room, a destination that cannot be read) fails the write
that needed it instead of losing the image; a protection whose image is lost
anyway is never answered "already protected". The update workflows that
drive these requests are tested in ``test_update.py``.
"""

from __future__ import annotations

import errno
import random

import pytest
from helpers import chunk_bytes, chunks_touched, fill_random

from isc import Destination, IscError, MemoryLUN, ParameterError
from isc.lun import ForwardingLUN
from isc.remote import (
    PROTECT_GRANULARITY,
    AgentSite,
    LocalSite,
    ProtectedLUN,
    address_text,
    agent_address,
    same_agent,
    saved_extents,
)

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


class Outage(ForwardingLUN):
    """``lun`` behind a link the test cuts: every read and write raises while ``down``."""

    def __init__(self, lun, down: bool = False) -> None:
        super().__init__(lun)
        self.down = down

    def _reach(self) -> None:
        if self.down:
            raise ConnectionError(errno.ECONNREFUSED, "injected outage: the destination is down")

    def read(self, offset: int, length: int) -> bytes:
        self._reach()
        return super().read(offset, length)

    def readinto(self, offset: int, buffer) -> None:
        self._reach()
        super().readinto(offset, buffer)

    def write(self, offset: int, data) -> None:
        self._reach()
        super().write(offset, data)


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


@pytest.mark.parametrize("failure", ["snapshot full", "destination unreadable"])
def test_a_write_whose_save_fails_is_not_made_and_the_image_stays_whole(failure):
    dest, lun, image = destination()
    outage = Outage(lun)
    dest.lun = outage
    site = LocalSite(capacity=2 * P)  # room for two protection chunks
    assert site.protect(dest).ok
    rng = random.Random(3)
    dest.lun.write(10, rng.randbytes(10))  # chunk 0 saved
    if failure == "snapshot full":
        data, cause = rng.randbytes(2 * P), "cannot take 65536 more bytes for chunk 2"
        at = P  # chunks 1 (saved: now full) and 2 (no room)
    else:
        outage.down = True
        data, cause = rng.randbytes(100), "injected outage"
        at = 2 * P
    written = lun.read(0, SIZE)
    with pytest.raises(IscError, match=f"the protection of d0 could not save .*{cause}"):
        dest.lun.write(at, data)
    assert lun.read(0, SIZE) == written  # rule 8: the write was not made
    info = site.status(dest).info
    assert info["intact"] and info["problem"] is None
    assert info["saved_chunks"] == 1  # what the failed write saved was dropped again
    outage.down = False
    ack = site.rollback(dest)
    assert ack.ok and list(ack.extents) == [(0, P)]
    assert lun.read(0, SIZE) == image
    dest.lun.write(P, rng.randbytes(P))  # chunk 1 is saved anew, then written
    assert site.status(dest).info["saved_chunks"] == 1
    assert site.rollback(dest).ok and lun.read(0, SIZE) == image


def test_an_unreachable_destination_is_protected_and_nothing_reaches_it_unsaved():
    dest, lun, image = destination()
    outage = Outage(lun, down=True)
    dest.lun = outage
    site = LocalSite()
    assert site.protect(dest).ok  # its outage is its own (rule 13): the copy to it fails
    rng = random.Random(4)
    with pytest.raises((IscError, ConnectionError), match="injected outage"):
        dest.lun.write(0, rng.randbytes(100))
    outage.down = False  # back: the first write to each chunk saves it first
    overwrite(dest, rng, WRITES)
    assert site.protect(dest).reason == "already protected"
    assert site.rollback(dest).ok
    assert lun.read(0, SIZE) == image


def test_protecting_a_destination_whose_protected_image_was_lost_fails():
    dest, lun, _ = destination()
    site = LocalSite()
    assert site.protect(dest).ok
    overwrite(dest, random.Random(5), WRITES)
    dest.lun.snapshot.unmark()  # the snapshot ends behind the site's back: its image is gone
    ack = site.protect(dest)
    assert not ack.ok
    assert ack.reason.startswith("d0 is protected, but its protected image was lost (mark 1 ")
    assert ack.reason.endswith(
        "it can no longer be rolled back; unprotect it to drop the protection"
    )
    status = site.status(dest).info
    assert not status["intact"] and "ended by an unmark" in status["problem"]
    assert "the protected image was lost" in site.rollback(dest).reason
    assert site.unprotect(dest).ok and dest.lun is lun
    assert site.protect(dest).ok  # afresh, at the image the destination holds now


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


def test_an_agents_address_reads_back_as_written_and_names_one_control_port(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text, address in (
        ("127.0.0.1:10900", ("127.0.0.1", 10900)),
        ("[::1]:10900", ("::1", 10900)),
        ("unix:run/agent.sock", str(tmp_path / "run" / "agent.sock")),
    ):
        assert agent_address(text) == address
        assert agent_address(address_text(address)) == address
        assert AgentSite.at(address).where == address_text(address)
    for wrong, why in (
        ("nowhere", "'nowhere' is not HOST:PORT"),
        ("host:0", r"'host:0' is not HOST:PORT \(a port from 1 to 65535\)"),
        ("host:65536", "is not HOST:PORT"),
        (":10900", "is not HOST:PORT"),
        ("unix:", "unix:PATH needs a path"),
    ):
        with pytest.raises(ParameterError, match=why):
            agent_address(wrong)
    assert same_agent("Replica.example.com:10900", "replica.example.com:10900")
    assert not same_agent("replica:10900", "replica:10901")
    assert not same_agent("localhost:10900", "unix:localhost:10900")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "agent.sock").touch()
    (tmp_path / "link").symlink_to("run")
    assert same_agent("unix:run/agent.sock", f"unix:{tmp_path}/link/agent.sock")  # one inode
    assert not same_agent("unix:run/agent.sock", "unix:run/other.sock")  # one is missing
    assert same_agent("unix:run/none.sock", f"unix:{tmp_path}/run/none.sock")  # one path
