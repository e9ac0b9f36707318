"""The update workflows: periodic incremental updates, the unmarked full copy, rollback.

Rules checked here (docs/design.md): 1 (each update leaves the image at its mark,
with writer threads racing the copy), 2 (no lost change after a refused
protection, a failed copy or a rollback), 6 (honest destination states), 7
(one update at a time per session), 8 (the protected image survives a failed
copy and rolls back), 10 (bad input changes nothing), and the workflow steps
themselves: protect and unprotect around every copy, consistency groups,
``every()`` and the log. The site is always a :class:`LocalSite`, wrapped by
:class:`HookSite` to see every request and to answer some of them itself.
"""

from __future__ import annotations

import logging
import random
import struct
import threading
from collections.abc import Callable

import pytest
from helpers import (
    TIMEOUT,
    Gate,
    HookLUN,
    Worker,
    Writers,
    assert_no_lost_change,
    chunk_bytes,
    chunks_touched,
    differing_chunks,
    fill_random,
)
from test_remote import Outage

from isc import (
    CopyJob,
    DeltaBitmap,
    Destination,
    DestState,
    MemoryLUN,
    ParameterError,
    Session,
    State,
    StateError,
)
from isc.remote import PROTECT_GRANULARITY, Ack, LocalSite, ProtectedLUN, RequestSite
from isc.update import (
    PeriodicUpdate,
    UnmarkedFullCopy,
    UpdateBusy,
    UpdateError,
    check_identities,
    mark_group,
    rollback,
)

G = 4096
SIZE = 48 * G + 1536  # a short last chunk; three whole protection chunks and a short one
IO = 4 * G  # copies run in several pieces, so a failure or a hook can fall in between
NOT_YET = 0.05  # seconds to watch for something that must not happen yet


class HookSite(RequestSite):
    """A :class:`LocalSite` that logs every request and lets the test answer some itself.

    ``hooks[request](dest, timeout)`` runs first: an :class:`Ack` it returns
    is the answer (the LocalSite is not asked), None passes the request on,
    an exception reaches the caller. ``calls`` lists ``(request, dest name)``,
    ``timeouts`` the timeout of each and ``acks`` each answer.
    """

    def __init__(self) -> None:
        self.local = LocalSite()
        self.hooks: dict[str, Callable[[Destination, float | None], Ack | None]] = {}
        self.calls: list[tuple[str, str]] = []
        self.timeouts: list[float | None] = []
        self.acks: list[Ack] = []

    def _request(self, request: str, dest: Destination, timeout: float | None) -> Ack:
        self.calls.append((request, dest.name))
        self.timeouts.append(timeout)
        hook = self.hooks.get(request)
        ack = hook(dest, timeout) if hook else None
        if ack is None:
            ack = getattr(self.local, request)(dest, timeout)
        self.acks.append(ack)
        return ack

    def protected(self, dest: Destination) -> bool:
        """Whether the LocalSite holds a protection of ``dest`` (not logged as a call)."""
        return self.local.status(dest).info["protected"]

    def forget(self) -> None:
        self.calls.clear()
        self.timeouts.clear()
        self.acks.clear()


def refuse(dest: Destination, timeout: float | None) -> Ack:
    return Ack(0, False, "no room for a snapshot")


def hang_up(dest: Destination, timeout: float | None) -> Ack:
    raise ConnectionError("the site hung up")


def never_answer(dest: Destination, timeout: float | None) -> Ack:
    """A site that stays silent: wait for an answer up to ``timeout``, then give up."""
    answered = threading.Event()  # nobody sets it
    if answered.wait(TIMEOUT if timeout is None else timeout):
        raise AssertionError("nobody answers")
    return Ack(0, False, f"no answer from the site within {timeout} s")


def protections(dests: list[Destination], update_calls: list[str]) -> list[tuple[str, str]]:
    """The site calls an update makes: each request of ``update_calls`` for every destination."""
    return [(request, d.name) for request in update_calls for d in dests]


def rig(
    dests: int = 2,
    *,
    name: str = "alpha",
    prefix: str = "d",
    seed: int = 0,
    kind: type[Session] = Session,
):
    """A session ``name`` (of class ``kind``) on a random source, NEW destinations, a HookSite."""
    source = MemoryLUN(SIZE)
    fill_random(source, random.Random(seed))
    session = kind(source, G, name=name)
    destinations = [Destination(HookLUN(MemoryLUN(SIZE)), f"{prefix}{i}") for i in range(dests)]
    return session, destinations, HookSite()


def updated(dests: int = 2, **rig_args):
    """:func:`rig` after a first successful update: the destinations are CONSISTENT."""
    session, destinations, site = rig(dests, **rig_args)
    PeriodicUpdate(session, destinations, site).run()
    site.forget()
    return session, destinations, site


def scribble(session: Session, rng: random.Random, count: int) -> list[tuple[int, int]]:
    """``count`` host writes of random data at random places; their ``(offset, length)``."""
    writes = []
    for _ in range(count):
        length = rng.randrange(1, 3 * G)
        offset = rng.randrange(0, SIZE - length + 1)
        session.write(offset, rng.randbytes(length))
        writes.append((offset, length))
    return writes


def touched(writes: list[tuple[int, int]]) -> set[int]:
    return {c for offset, length in writes for c in chunks_touched(offset, length, G)}


def changed_bytes(writes: list[tuple[int, int]]) -> int:
    """What an incremental copy sends after ``writes``: their chunks, once each."""
    return sum(chunk_bytes(c, G, SIZE) for c in touched(writes))


def tracked(session: Session) -> set[int]:
    bitmap = session.bitmap
    return {c for c in range(bitmap.chunks) if bitmap.tracking(c)}


def contents(dest: Destination) -> bytes:
    return dest.lun.read(0, SIZE)


def source_image(session: Session) -> bytes:
    return session.read(0, SIZE)


def assert_in_step(session: Session, dests: list[Destination], luns: list) -> None:
    """After a successful update: each destination equals the source, CONSISTENT, unprotected."""
    image = source_image(session)
    for dest, lun in zip(dests, luns, strict=True):
        assert dest.state is DestState.CONSISTENT, dest.name
        assert dest.lun is lun, f"{dest.name} still has its protection's LUN"
        assert contents(dest) == image, dest.name


# -- rule 1: each update copies the image at its mark, and only what changed ------------------


def test_updates_copy_the_image_at_each_mark_and_send_only_what_changed(busy_switching):
    session, dests, site = rig()
    luns = [d.lun for d in dests]
    lock = threading.Lock()
    written: list[tuple[int, int]] = []  # host writes since the last mark

    def write(writer: int, seq: int, rng: random.Random) -> None:
        length = rng.randrange(1, 3 * G)
        offset = rng.randrange(0, SIZE - length + 1)
        session.write(offset, rng.randbytes(length))
        with lock:
            written.append((offset, length))

    marks: list[tuple[bytes, list[tuple[int, int]]]] = []

    def protect(dest: Destination, timeout: float | None) -> None:
        # The site hears of the first destination right after the mark. The
        # writers were settled before run() and get no budget before the
        # transfer starts: the source still holds the image the mark froze,
        # and the log holds exactly the writes between this mark and the last.
        if dest is dests[0]:
            with lock:
                marks.append((source_image(session), written[:]))
                written.clear()

    def progress(done: int, total: int) -> None:
        # Writes race every piece of the transfer: wait for one, let another run on.
        finished = writers.total_done
        writers.allow(2)
        writers.wait_done(finished + 1)

    site.hooks["protect"] = protect
    update = PeriodicUpdate(session, dests, site, io_size=IO, progress=progress)
    with Writers(write, 3, seed=11) as writers:
        for n in range(8):
            writers.settle()
            site.forget()
            (result,) = update.run()
            image, since = marks[-1]
            if n == 0:  # new destinations: a full copy
                assert result.bytes_sent == result.bytes_total == SIZE
            else:
                assert since, "no host write between two updates"
                assert result.bytes_sent == result.bytes_total == changed_bytes(since)
            assert session.state is State.UNMARKED
            assert session.save_area.used == 0
            assert site.calls == protections(dests, ["protect", "unprotect"])
            for dest, lun in zip(dests, luns, strict=True):
                assert dest.state is DestState.CONSISTENT
                assert dest.lun is lun
                assert site.local.status(dest).info == {"protected": False}
                assert lun.read(0, SIZE) == image, f"{dest.name} after update {n}"
            writers.allow(10)  # host writes between updates
        writers.settle()
    assert session.stats.cofw_chunks > 0  # the writers did race the transfers


# -- rule 7: one update at a time ------------------------------------------------------------


@pytest.mark.parametrize(
    "first", ["update protecting", "update transferring", "full copy transferring"]
)
def test_a_second_update_while_one_runs_is_refused_and_changes_nothing(first, caplog):
    session, (dest,), site = updated(1)
    lun = dest.lun
    scribble(session, random.Random(1), 10)
    gate = Gate()
    if first == "update protecting":
        site.hooks["protect"] = gate
        running = PeriodicUpdate(session, [dest], site)
    elif first == "update transferring":
        running = PeriodicUpdate(session, [dest], site, io_size=IO, progress=gate)
    else:
        running = UnmarkedFullCopy(session, [dest], io_size=IO, progress=gate)
    worker = Worker(running.run)
    gate.wait_reached()  # the first update is provably in progress
    other = Destination(HookLUN(MemoryLUN(SIZE)), "other")
    attempts = {
        "the same update": running.run,
        "another update": PeriodicUpdate(session, [other], site).run,
        "an unmarked full copy": UnmarkedFullCopy(session, [other], site, protect=True).run,
        "a rollback": lambda: rollback(session, dest, site),
    }
    for what, attempt in attempts.items():
        before = (session.bitmap.to_bytes(), list(site.calls), contents(dest), dest.state)
        with pytest.raises(UpdateBusy, match="already running"):
            attempt()
        after = (session.bitmap.to_bytes(), list(site.calls), contents(dest), dest.state)
        assert after == before, f"{what} changed something"
        assert other.lun.writes == 0 and other.state is DestState.NEW
    assert "alpha: an update is already running" in caplog.text
    gate.open()
    worker.finish()
    assert contents(dest) == source_image(session)
    assert dest.lun is lun
    expected = DestState.INCONSISTENT if first.startswith("full") else DestState.CONSISTENT
    assert dest.state is expected


# -- protection failures: the update is abandoned, nothing is lost ---------------------------


@pytest.mark.parametrize(
    ("failure", "timeout"),
    [(refuse, 7.5), (hang_up, 7.5), (never_answer, 0.05)],
    ids=["refused", "raises", "no answer"],
)
def test_a_failed_protection_abandons_the_update(failure, timeout, caplog):
    session, dests, site = updated(2)
    luns = [d.lun for d in dests]
    images = [contents(d) for d in dests]
    lun_writes = [lun.writes for lun in luns]
    writes = scribble(session, random.Random(3), 12)
    site.hooks["protect"] = lambda dest, t: failure(dest, t) if dest.name == "d1" else None
    update = PeriodicUpdate(session, dests, site, timeout=timeout)
    with pytest.raises(UpdateError, match="cannot protect d1") as info:
        update.run()
    assert info.value.results == []
    # The first destination was protected, so it is unprotected again.
    assert site.calls == [("protect", "d0"), ("protect", "d1"), ("unprotect", "d0")]
    assert site.timeouts == [timeout] * 3
    assert session.state is State.UNMARKED
    assert session.bitmap.transfer_count == 0
    assert tracked(session) == touched(writes)  # what the update did not send is still tracked
    for dest, lun, image, before in zip(dests, luns, images, lun_writes, strict=True):
        assert dest.lun is lun and not site.protected(dest)
        assert lun.writes == before, f"{dest.name} was written"
        assert contents(dest) == image
        assert dest.state is DestState.CONSISTENT
    assert "cannot protect d1" in caplog.text
    site.hooks.clear()
    (result,) = update.run()
    assert result.bytes_sent == changed_bytes(writes)
    assert_in_step(session, dests, luns)


# -- rule 8: a failed copy leaves the protected image, a rollback restores it -----------------


@pytest.mark.parametrize("then", ["rollback", "retry"])
def test_a_failed_copy_keeps_the_protection_for_a_rollback(then):
    session, (dest,), site = updated(1)
    lun = dest.lun
    image = contents(dest)
    scribble(session, random.Random(5), 20)
    lun.fail_at, lun.partial = lun.writes + 3, True  # two pieces land, then half of one
    update = PeriodicUpdate(session, [dest], site, io_size=IO)
    with pytest.raises(UpdateError, match="injected failure") as info:
        update.run()
    lun.fail_at = None
    (failed,) = info.value.results
    assert failed.outcomes["d0"].startswith("failed")
    assert site.calls == [("protect", "d0")]  # no unprotect after a failed copy
    assert dest.state is DestState.INCONSISTENT
    assert isinstance(dest.lun, ProtectedLUN) and dest.lun.lun is lun
    status = site.local.status(dest).info
    assert status["protected"] and status["intact"]
    assert lun.read(0, SIZE) != image
    assert session.state is State.UNMARKED
    assert_no_lost_change(session, lun)
    site.forget()
    if then == "rollback":
        ack = rollback(session, dest, site)
        assert ack.ok and ack.extents
        assert lun.read(0, SIZE) == image  # exactly the last consistent image
        assert dest.state is DestState.CONSISTENT
        assert site.protected(dest)  # a rollback keeps the protection
        for offset, length in ack.extents:  # what the rollback rewrote is sent again
            assert set(chunks_touched(offset, min(length, SIZE - offset), G)) <= tracked(session)
        assert_no_lost_change(session, lun)
        site.forget()
    (result,) = update.run()
    assert site.calls == [("protect", "d0"), ("unprotect", "d0")]
    assert site.acks[0].ok and site.acks[0].reason == "already protected"
    assert not site.protected(dest)
    assert result.bytes_sent > 0
    assert_in_step(session, [dest], [lun])


def test_rollback_after_two_failed_updates_restores_the_consistent_image_as_consistent():
    session, (dest,), site = updated(1)
    lun = dest.lun
    image = contents(dest)
    rng = random.Random(6)
    update = PeriodicUpdate(session, [dest], site, io_size=IO)
    for _ in range(2):  # the second update finds the protection left by the first
        scribble(session, rng, 10)
        lun.fail_at = lun.writes + 2
        with pytest.raises(UpdateError):
            update.run()
        assert dest.state is DestState.INCONSISTENT
    lun.fail_at = None
    rollback(session, dest, site)
    assert lun.read(0, SIZE) == image  # the image kept since before the first failure
    assert_no_lost_change(session, lun)
    assert dest.state is DestState.CONSISTENT  # so it is reported as what it is


def test_rollback_of_an_unprotected_destination_fails_and_changes_nothing():
    session, (dest,), site = updated(1)
    scribble(session, random.Random(7), 5)
    before = session.bitmap.to_bytes()
    with pytest.raises(UpdateError, match="not protected"):
        rollback(session, dest, site)
    assert session.bitmap.to_bytes() == before
    assert dest.state is DestState.CONSISTENT


# -- a rollback records its intent before it asks the site -----------------------------------


def leftover_protection() -> tuple[Session, Destination, HookSite, HookLUN, bytes]:
    """A CONSISTENT d0 whose protection outlived a successful update (its unprotect was refused).

    The protection still holds d0's image from before that update, so a
    rollback rewrites what the update sent: the case where a rollback nobody
    tracks makes a destination that is reported consistent differ from the
    source. Returns the session, d0, the site, d0's LUN and the protected image.
    """
    session, (dest,), site = updated(1)
    lun = dest.lun
    protected_image = contents(dest)
    scribble(session, random.Random(16), 20)
    site.hooks["unprotect"] = refuse
    PeriodicUpdate(session, [dest], site, io_size=IO).run()
    site.hooks.clear()
    site.forget()
    assert dest.state is DestState.CONSISTENT and site.protected(dest)
    assert contents(dest) != protected_image and not tracked(session)
    return session, dest, site, lun, protected_image


@pytest.mark.parametrize("lost", ["the site raises", "no answer"])
def test_a_rollback_whose_answer_is_lost_counts_as_done(lost):
    session, dest, site, lun, protected_image = leftover_protection()

    def act_then_lose_the_answer(dest: Destination, timeout: float | None) -> Ack:
        assert site.local.rollback(dest).ok
        if lost == "the site raises":
            raise ConnectionError("the site hung up after rolling back")
        return Ack(0, False, "no answer within 0.2 s", outcome_unknown=True)

    site.hooks["rollback"] = act_then_lose_the_answer
    with pytest.raises(UpdateError, match="may have happened: d0 is inconsistent"):
        rollback(session, dest, site)
    assert lun.read(0, SIZE) == protected_image  # the site did roll back
    assert dest.state is DestState.INCONSISTENT  # never CONSISTENT on an unknown outcome
    assert_no_lost_change(session, lun)
    site.hooks.clear()
    PeriodicUpdate(session, [dest], site, io_size=IO).run()
    assert_in_step(session, [dest], [lun])


def test_rollback_tracks_and_persists_its_intent_before_it_asks_the_site():
    session, dest, site, lun, protected_image = leftover_protection()
    persisted: list[tuple[list[tuple[str, str]], DestState, set[int]]] = []
    ack = rollback(
        session,
        dest,
        site,
        persist=lambda: persisted.append((list(site.calls), dest.state, tracked(session))),
    )
    ((calls, state, chunks),) = persisted
    assert calls == [("status", "d0")]  # the site was not asked to roll back yet
    assert state is DestState.INCONSISTENT
    rewritten = {
        c for offset, length in ack.extents for c in chunks_touched(offset, length, G) if c < 49
    }
    assert rewritten and rewritten <= chunks == tracked(session)
    assert lun.read(0, SIZE) == protected_image
    assert dest.state is DestState.CONSISTENT  # the image it had when it was protected
    assert_no_lost_change(session, lun)


def test_rollback_tracks_the_whole_volume_when_the_site_lists_no_extents():
    session, dest, site, lun, protected_image = leftover_protection()
    site.hooks["status"] = lambda dest, timeout: Ack(0, True, info={"protected": True})
    rollback(session, dest, site)
    assert session.bitmap.tracking_count == session.bitmap.chunks
    assert lun.read(0, SIZE) == protected_image


def test_a_rollback_whose_intent_cannot_be_persisted_is_not_asked():
    session, dest, site, lun, _ = leftover_protection()
    image = lun.read(0, SIZE)

    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        rollback(session, dest, site, persist=disk_full)
    assert site.calls == [("status", "d0")]
    assert lun.read(0, SIZE) == image and dest.state is DestState.CONSISTENT


def test_a_rollback_the_site_refuses_leaves_the_destination_as_it_was():
    session, dest, site, lun, _ = leftover_protection()
    image = lun.read(0, SIZE)
    site.hooks["rollback"] = refuse
    with pytest.raises(UpdateError, match="rollback of d0 failed: no room for a snapshot"):
        rollback(session, dest, site)
    assert lun.read(0, SIZE) == image and dest.state is DestState.CONSISTENT
    assert_no_lost_change(session, lun)


@pytest.mark.parametrize(
    "status",
    [
        Ack(0, False, "the site is down"),
        Ack(0, True, info={"protected": True, "intact": False, "problem": "save area full"}),
    ],
    ids=["unanswered", "image lost"],
)
def test_a_rollback_that_cannot_succeed_changes_nothing(status):
    session, dest, site, lun, _ = leftover_protection()
    image, before = lun.read(0, SIZE), session.bitmap.to_bytes()
    site.hooks["status"] = lambda dest, timeout: status
    with pytest.raises(UpdateError, match=r"the site is down|the protected image was lost"):
        rollback(session, dest, site, persist=lambda: pytest.fail("nothing to persist"))
    assert site.calls == [("status", "d0")]
    assert session.bitmap.to_bytes() == before
    assert lun.read(0, SIZE) == image and dest.state is DestState.CONSISTENT


# -- protection capacity -----------------------------------------------------------------------


def test_a_snapshot_that_runs_out_fails_the_copy_and_keeps_the_image_restorable():
    session, (dest,), site = updated(1)
    lun = dest.lun
    image = contents(dest)
    site.local.capacity = 2 * PROTECT_GRANULARITY  # two of d0's four protection chunks
    session.write(0, random.Random(8).randbytes(SIZE))  # every chunk changes
    update = PeriodicUpdate(session, [dest], site, io_size=IO)
    with pytest.raises(UpdateError, match=r"could not save the original data of chunk 2: .* take"):
        update.run()
    status = site.local.status(dest).info
    assert status["intact"] and status["saved_chunks"] == 2
    tail = 2 * PROTECT_GRANULARITY
    assert lun.read(tail, SIZE - tail) == image[tail:]  # nothing was written unsaved
    assert dest.state is DestState.INCONSISTENT
    assert_no_lost_change(session, lun)
    rollback(session, dest, site)  # rule 8: the protected image is whole
    assert lun.read(0, SIZE) == image and dest.state is DestState.CONSISTENT
    assert_no_lost_change(session, lun)
    # The way out: drop the small protection; the next one is as large as d0.
    assert site.unprotect(dest).ok
    site.local.capacity = None
    update.run()
    assert_in_step(session, [dest], [lun])


def test_an_unreachable_destination_keeps_its_image_and_stops_no_other():
    session, dests, site = updated(2)
    d0, d1 = dests
    luns = [d.lun for d in dests]
    image = contents(d1)
    outage = Outage(d1.lun, down=True)
    d1.lun = outage
    scribble(session, random.Random(17), 12)
    update = PeriodicUpdate(session, dests, site, io_size=IO)
    with pytest.raises(UpdateError, match=r"d1 failed: .*injected outage"):
        update.run()  # d1 is protected while down (rule 13): its copy fails, d0's does not
    assert d0.state is DestState.CONSISTENT and contents(d0) == source_image(session)
    assert not site.protected(d0) and site.protected(d1)
    outage.down = False
    luns[1].fail_at = luns[1].writes + 2  # back, and its next copy fails midway
    scribble(session, random.Random(18), 12)
    with pytest.raises(UpdateError, match="injected failure"):
        update.run()
    luns[1].fail_at = None
    assert d1.state is DestState.INCONSISTENT and contents(d1) != image
    rollback(session, d1, site)
    assert contents(d1) == image  # the image from before the outage, whole
    assert d1.state is DestState.CONSISTENT
    assert_no_lost_change(session, luns[1])
    assert site.unprotect(d1).ok
    d1.lun = luns[1]
    update.run()
    assert_in_step(session, dests, luns)


# -- rule 10: bad input changes nothing -----------------------------------------------------


@pytest.mark.parametrize("bad", ["small destination", "io_size"])
def test_an_update_with_bad_copy_options_changes_nothing(bad):
    session, dests, site = updated(1)
    luns = [d.lun for d in dests]
    writes = scribble(session, random.Random(9), 5)
    options: dict = {"io_size": G + 512} if bad == "io_size" else {}
    if bad == "small destination":
        dests = [*dests, Destination(MemoryLUN(SIZE - 1), "small")]
        luns.append(dests[-1].lun)
    with pytest.raises(ParameterError):
        PeriodicUpdate(session, dests, site, **options).run()
    assert session.state is State.UNMARKED
    assert tracked(session) == touched(writes)
    for dest, lun in zip(dests, luns, strict=True):
        assert dest.lun is lun and not site.protected(dest), dest.name
    (result,) = PeriodicUpdate(session, dests[:1], site).run()
    assert result.bytes_sent == changed_bytes(writes)


# -- consistency groups ------------------------------------------------------------------------

WRITERS = 4
STRIDE = 5 * G  # each writer's record lies in a chunk of its own
RECORD = 512
ROUNDS = 20


def record(writer: int, seq: int) -> bytes:
    return struct.pack("<QQ", writer, seq) * (RECORD // 16)


def sequence_numbers(dest: Destination) -> list[int]:
    """The sequence number of each writer's record on ``dest``; a torn record fails."""
    data = contents(dest)
    seqs = []
    for w in range(WRITERS):
        raw = data[w * STRIDE : w * STRIDE + RECORD]
        seq = struct.unpack_from("<Q", raw, 8)[0]
        assert raw == record(w, seq), f"writer {w}'s record on {dest.name} is torn"
        seqs.append(seq)
    return seqs


def test_a_group_update_copies_one_consistent_cut(busy_switching):
    site = HookSite()
    alpha, (a0,), _ = rig(1, name="alpha", prefix="a")
    beta, (b0,), _ = rig(1, name="beta", prefix="b", seed=1)
    luns = [a0.lun, b0.lun]
    for w in range(WRITERS):
        alpha.write(w * STRIDE, record(w, 0))
        beta.write(w * STRIDE, record(w, 0))

    def write(writer: int, seq: int, rng: random.Random) -> None:
        # A dependent pair: beta's write is issued only once alpha's has returned.
        alpha.write(writer * STRIDE, record(writer, seq))
        beta.write(writer * STRIDE, record(writer, seq))

    members = [(alpha, [a0]), (beta, [b0])]
    update = PeriodicUpdate.group(members, site, io_size=IO)
    with Writers(write, WRITERS, seed=21) as writers:
        for _ in range(ROUNDS):
            # The writers run flat out through the whole update, mark included.
            finished = writers.total_done
            writers.allow(1 << 30)
            writers.wait_done(finished + WRITERS)
            update.run()
            writers.limit(0)
            writers.settle()
            # One mark instant t for both sessions. Pair n writes alpha, then
            # beta; pair n + 1 starts after beta's write n returned. If beta's
            # copy holds write n, it landed before t, so alpha's write n did
            # too: alpha is never behind. If alpha's copy holds write n + 1,
            # beta's write n landed before it: beta is at most one behind.
            # Marking the two sessions at different instants breaks this, when
            # a pair happens to fall between the marks; the next test forces one.
            a_seqs, b_seqs = sequence_numbers(a0), sequence_numbers(b0)
            for w in range(WRITERS):
                assert b_seqs[w] <= a_seqs[w] <= b_seqs[w] + 1, (w, a_seqs, b_seqs)
    PeriodicUpdate.group(members, site).run()
    assert_in_step(alpha, [a0], luns[:1])
    assert_in_step(beta, [b0], luns[1:])
    assert max(sequence_numbers(a0)) > 0


class ProbedSession(Session):
    """A session that calls ``after_mark()`` right after each of its marks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after_mark: Callable[[], None] = lambda: None

    def mark(self, full: bool = False) -> int:
        generation = super().mark(full)
        self.after_mark()
        return generation


def test_a_pair_written_between_the_group_marks_lands_after_both():
    site = HookSite()
    alpha, (a0,), _ = rig(1, name="alpha", prefix="a", kind=ProbedSession)
    beta, (b0,), _ = rig(1, name="beta", prefix="b", seed=1)
    members = [(alpha, [a0]), (beta, [b0])]
    update = PeriodicUpdate.group(members, site)
    update.run()
    pair = record(0, 1)
    landed = threading.Event()
    probes: list[tuple[Worker, bool]] = []

    def write_pair() -> None:
        alpha.write(0, pair)
        beta.write(0, pair)
        landed.set()

    def after_mark() -> None:
        # Inside the group's mark: alpha is marked, beta not yet. A pair
        # issued now must wait until both are marked, or beta's copy would
        # hold a write whose alpha half its copy lacks. A bounded look: the
        # pair must not land while the group is being marked.
        probe = Worker(write_pair)
        probes.append((probe, landed.wait(NOT_YET)))

    alpha.after_mark = after_mark
    update.run()
    alpha.after_mark = lambda: None
    ((probe, landed_inside),) = probes
    probe.finish()
    assert not landed_inside, "a host write went through while the group was being marked"
    assert contents(a0)[:RECORD] != pair
    assert contents(b0)[:RECORD] != pair, "beta's copy holds a write alpha's copy lacks"
    update.run()
    assert contents(a0)[:RECORD] == contents(b0)[:RECORD] == pair


def test_a_group_protects_destinations_that_share_a_name_in_different_sessions():
    # Names are unique within one copy job, not across a group's sessions:
    # each destination must still be protected before its copy writes to it.
    site = HookSite()
    alpha, (a0,), _ = rig(1, name="alpha", prefix="replica-")
    beta, (b0,), _ = rig(1, name="beta", prefix="replica-", seed=1)
    written_unprotected: set[str] = set()

    def progress(done: int, total: int) -> None:  # after each piece of each copy
        for session, dest in ((alpha, a0), (beta, b0)):
            if dest.state is DestState.INCONSISTENT and not isinstance(dest.lun, ProtectedLUN):
                written_unprotected.add(session.name)

    rng = random.Random(15)
    try:
        update = PeriodicUpdate.group([(alpha, [a0]), (beta, [b0])], site, progress=progress)
        for _ in range(2):  # new destinations, then consistent ones
            update.run()
            scribble(alpha, rng, 5)
            scribble(beta, rng, 5)
    except ParameterError:  # refusing the clash before anything changes keeps the rule too
        assert alpha.state is beta.state is State.UNMARKED
        assert not site.protected(a0) and a0.state is b0.state is DestState.NEW
        return
    assert written_unprotected == set()


@pytest.mark.parametrize("busy", ["marked", "copying unmarked"])
def test_mark_group_marks_none_when_one_session_cannot_be_marked(busy):
    alpha = Session(MemoryLUN(SIZE), G, name="alpha")
    beta = Session(MemoryLUN(SIZE), G, name="beta")
    gate = Gate()
    copy = None
    if busy == "marked":
        beta.mark()
    else:  # an unmarked full copy holds beta's marks while it runs
        job = CopyJob(beta, [Destination(MemoryLUN(SIZE), "b0")], io_size=IO, progress=gate)
        copy = Worker(lambda: job.full(marked=False))
        gate.wait_reached()
    before = [(s.state, s.generation) for s in (alpha, beta)]
    try:
        with pytest.raises(StateError):
            mark_group([alpha, beta])
        assert [(s.state, s.generation) for s in (alpha, beta)] == before
        # Nothing is left frozen: host writes to both still go through.
        Worker(lambda: (alpha.write(0, b"a"), beta.write(0, b"b"))).finish()
        site = HookSite()
        dests = [Destination(MemoryLUN(SIZE), "a0"), Destination(MemoryLUN(SIZE), "b0")]
        update = PeriodicUpdate.group([(alpha, dests[:1]), (beta, dests[1:])], site)
        with pytest.raises(StateError):
            update.run()
        assert site.calls == []
        assert [(s.state, s.generation) for s in (alpha, beta)] == before
    finally:
        gate.open()
        if copy is not None:
            copy.finish()


def test_freeze_holds_new_writes_until_thaw():
    bitmap = DeltaBitmap(SIZE, G)
    bitmap.freeze()
    began = threading.Event()
    writer = Worker(lambda: (bitmap.begin_write(0, G), began.set()))
    try:
        assert not began.wait(NOT_YET)  # a bounded look: the write waits for the thaw
        assert bitmap.tracking_count == 0
        bitmap.mark()  # marking still works while frozen: that is what freezing is for
        assert bitmap.generation == 1
    finally:
        bitmap.thaw()
    writer.finish()
    assert began.is_set()
    bitmap.end_write(0, G, False)
    assert bitmap.tracking(0) and not bitmap.transfer(0)  # the write landed after the mark


def test_freeze_is_exclusive():
    # A checkpoint and a group mark may both freeze one bitmap: the later waits.
    bitmap = DeltaBitmap(SIZE, G)
    bitmap.freeze()
    refrozen = threading.Event()
    second = Worker(lambda: (bitmap.freeze(), refrozen.set()))
    try:
        assert not refrozen.wait(NOT_YET)  # a bounded look: it waits for the thaw
    finally:
        bitmap.thaw()
    second.finish()
    assert refrozen.is_set()
    bitmap.thaw()


def test_freeze_waits_for_the_write_in_flight():
    bitmap = DeltaBitmap(SIZE, G)
    bitmap.begin_write(0, G)
    frozen = threading.Event()
    freezer = Worker(lambda: (bitmap.freeze(), frozen.set()))
    try:
        assert not frozen.wait(NOT_YET)  # a bounded look: freeze waits for end_write
    finally:
        bitmap.end_write(0, G, False)
    freezer.finish()
    assert frozen.is_set()
    bitmap.thaw()


# -- the unmarked full copy ------------------------------------------------------------------


@pytest.mark.parametrize("protect", [False, True])
def test_an_unmarked_full_copy_then_an_update_sends_only_what_changed(protect):
    session, dests, site = rig(2)
    luns = [d.lun for d in dests]
    rng = random.Random(10)
    writes: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        writes.extend(scribble(session, rng, 2))  # host writes while the copy runs

    copy = UnmarkedFullCopy(
        session, dests, site if protect else None, protect=protect, io_size=IO, progress=progress
    )
    result = copy.run()
    assert result.mode == "full-unmarked"
    assert result.bytes_sent == SIZE
    assert session.state is State.UNMARKED
    assert site.calls == (protections(dests, ["protect", "unprotect"]) if protect else [])
    image = source_image(session)
    for dest, lun in zip(dests, luns, strict=True):
        assert dest.state is DestState.INCONSISTENT
        assert dest.lun is lun and not site.protected(dest)
        # The whole source was copied; it differs only where it was written meanwhile.
        assert set(differing_chunks(image, contents(dest), G)) <= touched(writes)
    assert tracked(session) == touched(writes)
    writes += scribble(session, rng, 5)
    site.forget()
    (update_result,) = PeriodicUpdate(session, dests, site).run()
    assert update_result.bytes_sent == changed_bytes(writes)
    assert site.calls == protections(dests, ["protect", "unprotect"])
    assert_in_step(session, dests, luns)


def test_a_failed_unmarked_full_copy_keeps_the_protection():
    session, dests, site = updated(2)
    luns = [d.lun for d in dests]
    images = [contents(d) for d in dests]
    scribble(session, random.Random(12), 8)
    luns[1].fail_at = luns[1].writes + 3
    copy = UnmarkedFullCopy(session, dests, site, protect=True, io_size=IO)
    with pytest.raises(UpdateError, match="unmarked full copy failed"):
        copy.run()
    luns[1].fail_at = None
    # d1's trouble is its own: d0 was copied and unprotected, d1 keeps its protection.
    assert site.calls == [("protect", "d0"), ("protect", "d1"), ("unprotect", "d0")]
    assert not site.protected(dests[0]) and site.protected(dests[1])
    assert dests[1].lun.lun is luns[1]
    for dest, lun in zip(dests, luns, strict=True):
        assert dest.state is DestState.INCONSISTENT
        assert_no_lost_change(session, lun)
    rollback(session, dests[1], site)
    assert contents(dests[1]) == images[1]
    assert dests[1].state is DestState.CONSISTENT
    site.forget()
    PeriodicUpdate(session, dests, site).run()
    assert site.calls == protections(dests, ["protect", "unprotect"])
    assert not any(site.protected(d) for d in dests)
    assert_in_step(session, dests, luns)


def test_an_unmarked_full_copy_with_protection_needs_a_site():
    session, dests, _ = rig(1)
    with pytest.raises(ParameterError, match="needs a site"):
        UnmarkedFullCopy(session, dests, protect=True)


# -- every() ---------------------------------------------------------------------------------


def test_every_runs_updates_until_stopped_and_survives_a_failed_one(caplog):
    session, (dest,), site = rig(1)
    rng = random.Random(13)
    runs = 0
    fourth, stopped = threading.Event(), threading.Event()

    def protect(dest: Destination, timeout: float | None) -> Ack | None:
        nonlocal runs
        runs += 1
        scribble(session, rng, 3)  # the next run has something to send
        if runs == 2:
            return Ack(0, False, "maintenance window")
        if runs == 4:
            fourth.set()
            # Hold the fourth run until stop() was called: no fifth may start.
            assert stopped.wait(TIMEOUT)
        return None

    site.hooks["protect"] = protect
    update = PeriodicUpdate(session, [dest], site)
    thread = update.every(0.001)
    try:
        assert fourth.wait(TIMEOUT), "the fourth update never ran"
    finally:
        update.stop()
        stopped.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert runs == 4
    assert "periodic update: cannot protect d0: maintenance window" in caplog.text
    # The fourth update finished; the writes made after its mark wait, tracked, for the next.
    assert dest.state is DestState.CONSISTENT and not site.protected(dest)
    assert_no_lost_change(session, dest.lun)


@pytest.mark.parametrize("seconds", [0, -1.0])
def test_every_needs_a_positive_interval(seconds):
    session, dests, site = rig(1)
    with pytest.raises(ParameterError, match="interval"):
        PeriodicUpdate(session, dests, site).every(seconds)


# -- the log -------------------------------------------------------------------------------------


def test_each_step_is_logged_with_the_session_and_destination_names(caplog):
    caplog.set_level(logging.INFO, logger="isc")
    session, dests, site = rig(2)
    update = PeriodicUpdate(session, dests, site, io_size=IO)
    rng = random.Random(14)

    def update_log() -> list[str]:
        messages = [r.getMessage() for r in caplog.records if r.name == "isc.update"]
        caplog.clear()
        for message in messages:
            assert any(name in message for name in ("alpha", "d0", "d1")), message
        return messages

    update.run()
    logged = update_log()
    assert logged[0].startswith("alpha: marked for update")
    assert logged[1:5] == [
        "protect d0: ok",
        "protect d1: ok",
        "unprotect d0: ok",
        "unprotect d1: ok",
    ]
    assert logged[5] == f"alpha: update of d0, d1 done, {SIZE} bytes sent"

    scribble(session, rng, 3)
    site.hooks["protect"] = lambda dest, t: refuse(dest, t) if dest.name == "d1" else None
    with pytest.raises(UpdateError):
        update.run()
    assert update_log()[1:] == [
        "protect d0: ok",
        "protect d1: no room for a snapshot",
        "unprotect d0: ok",
        "cannot protect d1: no room for a snapshot; the update was abandoned",
    ]
    site.hooks.clear()

    dests[0].lun.fail_at = dests[0].lun.writes + 1
    with pytest.raises(UpdateError):
        update.run()
    copy_log = [r.getMessage() for r in caplog.records if r.name == "isc.copy"]
    assert any(m.startswith("alpha: destination d0 dropped out of the copy") for m in copy_log)
    logged = update_log()
    assert logged[-2:] == [
        "alpha: d0 dropped out of the update and stay protected",
        f"alpha: update of d1 done, {logged[-1].rsplit(', ', 1)[1]}",
    ]
    assert "unprotect d1: ok" in logged and "unprotect d0: ok" not in logged
    dests[0].lun.fail_at = None
    rollback(session, dests[0], site)
    assert update_log() == ["status d0: ok", "rollback d0: ok"]


def test_a_fresh_protection_records_the_state_of_the_image_it_holds():
    # A protection dropped outside isc leaves an old record of CONSISTENT; the
    # fresh protection of an INCONSISTENT destination must not inherit it, or
    # a rollback would report a mix as CONSISTENT (rule 6).
    session, (dest,), site = updated(1)
    hook = dest.lun
    hook.fail_at = hook.writes + 2
    scribble(session, random.Random(21), 8)
    with pytest.raises(UpdateError):
        PeriodicUpdate(session, [dest], site, io_size=IO).run()
    assert dest.state is DestState.INCONSISTENT and dest.protected_state is DestState.CONSISTENT
    site.local.unprotect(dest)  # dropped at the site, behind the update's back
    hook.fail_at = hook.writes + 2
    with pytest.raises(UpdateError):
        PeriodicUpdate(session, [dest], site, io_size=IO).run()
    assert site.acks[-2].ok and not site.acks[-2].kept  # the protect of the second update
    assert dest.protected_state is DestState.INCONSISTENT
    hook.fail_at = None
    rollback(session, dest, site)
    assert dest.state is DestState.INCONSISTENT
    assert_no_lost_change(session, dest.lun)


def test_a_kept_protection_keeps_the_state_of_its_first_image():
    session, (dest,), site = updated(1)
    hook = dest.lun
    hook.fail_at = hook.writes + 2
    scribble(session, random.Random(22), 8)
    image = contents(dest)
    with pytest.raises(UpdateError):
        PeriodicUpdate(session, [dest], site, io_size=IO).run()
    hook.fail_at = hook.writes + 2
    with pytest.raises(UpdateError):
        PeriodicUpdate(session, [dest], site, io_size=IO).run()
    protects = [a for c, a in zip(site.calls, site.acks, strict=True) if c[0] == "protect"]
    assert [a.kept for a in protects] == [False, True]
    hook.fail_at = None
    rollback(session, dest, site)
    assert dest.state is DestState.CONSISTENT and contents(dest) == image


class NamedSite(LocalSite):
    """A local site whose status names each destination's export as ``names`` says."""

    def __init__(self, names: dict[str, str]) -> None:
        super().__init__()
        self.names = names
        self.asked: list[str] = []

    def status(self, dest: Destination, timeout: float | None = None) -> Ack:
        ack = super().status(dest, timeout)
        self.asked.append(dest.name)
        return Ack(ack.request_id, True, info={**ack.info, "identity": self.names[dest.name]})


def test_a_destination_whose_agent_names_another_export_gets_every_chunk():
    # Rule 12 at an agent: the identity its status names is checked before each update.
    source = MemoryLUN(SIZE)
    fill_random(source, random.Random(31))
    session = Session(source, G)
    dests = [Destination(MemoryLUN(SIZE), "a"), Destination(MemoryLUN(SIZE), "b")]
    site = NamedSite({"a": "m:1:10", "b": "m:1:11"})
    update = PeriodicUpdate(session, dests, site)
    identities: dict[str, str] = {}
    assert (
        check_identities(update.site, update.destinations, identities, {"a"}) == []
    )  # the first: recorded
    assert identities == {"a": "m:1:10"} and site.asked == ["a"]  # b has no agent of its own
    update.run()
    session.write(0, b"changed")
    site.names["a"] = "m:1:99"  # another file at the agent: copied in full
    (found,) = check_identities(update.site, update.destinations, identities, {"a"})
    assert found.startswith("a is not the export it was (its agent names another file")
    assert dests[0].state is DestState.NEW and identities["a"] == "m:1:99"
    dests[0].lun = MemoryLUN(SIZE)
    (result,) = update.run()
    assert result.bytes_seeded + result.bytes_sent == SIZE  # seeded from b, which is in step
    assert (
        check_identities(update.site, update.destinations, identities, {"a"}) == []
    )  # the same file again
    for dest in dests:
        assert dest.state is DestState.CONSISTENT and dest.lun.read(0, SIZE) == source.read(0, SIZE)
