"""The copy job: marked and unmarked copies, their failures, throttle and progress.

Rules checked here (docs/design.md): 1 (point in time, with writer threads racing
every copy), 2 (no lost change after any failure), 6 (honest destination
states), 10 (bad input changes nothing), and a hypothesis state machine that
interleaves host writes, marks, unmarks, the three copies, injected
destination failures, cancels and save-area exhaustion, checking rules 2, 3,
5 and 6 after every step. Full copies of sparse sources: holes reach every
kind of destination as holes (or zeros), also while host writes turn data
into holes and holes into data during a marked copy. Runs are split among
worker threads only when each gets SPLIT_MIN bytes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import threading

import pytest
from helpers import (
    TIMEOUT,
    HookLUN,
    Writers,
    assert_no_lost_change,
    chunk_bytes,
    chunks_touched,
    differing_chunks,
    fill_random,
    make_lun,
)
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from isc import (
    CopyError,
    CopyJob,
    CopyResult,
    Destination,
    DestState,
    FileLUN,
    MemoryLUN,
    ParameterError,
    SaveArea,
    Session,
    State,
    StateError,
)

G = 4096


def seeded(size: int, seed: int, dests: int = 1, granularity: int = G, **job_args):
    """A session on a random MemoryLUN, destinations made CONSISTENT by a full copy, and a job."""
    source = MemoryLUN(size)
    fill_random(source, random.Random(seed))
    session = Session(source, granularity)
    destinations = [Destination(HookLUN(MemoryLUN(size)), f"d{i}") for i in range(dests)]
    CopyJob(session, destinations).full()
    for dest in destinations:
        dest.lun.writes = 0
        dest.lun.written.clear()
    return session, destinations, CopyJob(session, destinations, **job_args)


def contents(dest: Destination) -> bytes:
    return dest.lun.read(0, dest.lun.size)


# -- rule 1: point in time, with writers racing the copy ---------------------------------------


@pytest.mark.parametrize("save_area", ["roomy", "small"])
@pytest.mark.parametrize("kind", ["memory", "file"])
@pytest.mark.parametrize("granularity", [2048, 8192, 65536])
def test_destinations_hold_the_image_at_the_mark(granularity, kind, save_area, tmp_path):
    g = granularity
    size = 96 * g + 1536  # a short last chunk
    rng = random.Random(g)
    source = make_lun(kind, size, tmp_path, "source")
    fill_random(source, rng)
    capacity = 6 * g if save_area == "small" else size
    session = Session(source, g, SaveArea(capacity))
    dests = [Destination(make_lun(kind, size, tmp_path, f"d{i}"), f"d{i}") for i in range(2)]

    def write(writer: int, seq: int, wrng: random.Random) -> None:
        length = wrng.randrange(512, 3 * g, 512)
        offset = wrng.randrange(0, size - length + 1, 512)
        session.write(offset, wrng.randbytes(length))

    racing = True

    def progress(done: int, total: int) -> None:
        # Three more writes per run sent; wait for one, the others race the next run.
        if racing:
            writers.resume()
            finished = writers.total_done
            writers.allow(3)
            writers.wait_done(finished + 1)

    job = CopyJob(session, dests, io_size=4 * g, progress=progress)
    raced = failed = 0
    images: dict[str, bytes] = {}  # what each destination holds while CONSISTENT
    with Writers(write, 3, seed=g) as writers:
        result = job.full(marked=False)  # seed the destinations while writes run
        assert result.bytes_sent == size
        assert all(d.state is DestState.INCONSISTENT for d in dests)
        for update in range(4):
            for attempt in range(3):
                racing = attempt < 2  # a third attempt runs quiet, so each update ends well
                writers.allow(20)
                if racing:
                    writers.pause()
                else:
                    writers.settle()
                if update == 1:
                    expected = source.read(0, size)  # paused: the full mark freezes this
                    copy = job.full
                else:
                    session.mark()
                    expected = source.read(0, size)
                    copy = job.incremental
                    writers.resume()
                try:
                    result = copy()
                except CopyError as exc:
                    failed += 1
                    assert session.state is State.UNMARKED
                    assert session.stats.aborts == failed
                    assert "save area full" in session.stats.last_abort
                    assert isinstance(exc.result, CopyResult)
                    writers.pause()
                    for dest in dests:
                        if dest.state is DestState.CONSISTENT:  # not written: still its image
                            assert contents(dest) == images[dest.name]
                        assert_no_lost_change(session, dest.lun)
                    writers.resume()
                    continue
                raced += racing
                for dest in dests:
                    assert dest.state is DestState.CONSISTENT
                    assert contents(dest) == expected, f"{dest.name} after update {update}"
                    images[dest.name] = expected
                break
            else:
                pytest.fail(f"update {update} never succeeded")
        writers.settle()
    stats = session.stats
    assert stats.save_area_high_water <= capacity
    assert stats.cofw_chunks > 0
    if save_area == "small":
        assert failed > 0  # the small area did run out
    else:
        assert failed == 0 and raced == 4
    for dest in dests:
        dest.lun.close()
    source.close()


# -- property: any interleaving keeps rules 2, 3, 5 and 6 ---------------------------------------

OFFSETS = st.integers(0, 2**20)  # scaled into the LUN
LENGTHS = st.integers(1, 3 * G)
ACTIONS = st.one_of(  # what a hook does in the middle of a copy; writes weigh double
    st.tuples(st.just("write"), OFFSETS, LENGTHS),
    st.tuples(st.just("write"), OFFSETS, LENGTHS),
    st.just(("cancel",)),
    st.just(("unmark",)),
)
HOOKS = st.lists(
    st.tuples(st.sampled_from(["progress", "write0", "write1"]), st.integers(1, 6), ACTIONS),
    max_size=4,
)
FAULTS = st.one_of(
    st.none(),
    st.tuples(st.just("write"), st.integers(0, 1), st.integers(1, 6)),
    st.tuples(st.just("flush"), st.integers(0, 1), st.just(0)),
)


class CopyMachine(RuleBasedStateMachine):
    """Host writes, marks, unmarks and copies in random order, with faults injected.

    The model keeps, per destination, the image it must hold while it is
    CONSISTENT (the source at the mark of its last successful marked copy),
    and the source image at the session's current mark. Host writes (between
    steps, or in the middle of a copy from the progress callback or inside a
    destination write) predict their COFW chunks and a save-area abort from
    the bitmap just before the write.
    """

    @initialize(
        chunks=st.integers(3, 20),
        tail=st.sampled_from([0, 1, 700]),
        granularity=st.sampled_from([2048, 4096]),
        save_chunks=st.sampled_from([1, 2, 4, None]),
        run_chunks=st.sampled_from([1, 2, 4]),
        seed_copy=st.sampled_from(["full", "unmarked"]),
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(self, chunks, tail, granularity, save_chunks, run_chunks, seed_copy, seed):
        self.g = granularity
        self.size = chunks * granularity + tail
        self.rng = random.Random(seed)
        source = MemoryLUN(self.size)
        fill_random(source, self.rng)
        self.capacity = save_chunks * granularity if save_chunks else self.size
        self.session = Session(source, granularity, SaveArea(self.capacity))
        self.luns = [HookLUN(MemoryLUN(self.size)) for _ in range(2)]
        self.dests = [Destination(lun, f"d{i}") for i, lun in enumerate(self.luns)]
        self.io_size = run_chunks * granularity
        self.images: dict[str, bytes | None] = {}
        self.mark_image: bytes | None = None
        self.copy("full" if seed_copy == "full" else "unmarked", [], None)

    # -- host writes with their expected COFW ----------------------------------------------
    def host_write(self, start: int, length: int) -> None:
        session, bitmap = self.session, self.session.bitmap
        offset = start % self.size
        length = min(length, self.size - offset)
        touched = chunks_touched(offset, length, self.g)
        to_save = [c for c in touched if bitmap.transfer(c) and not bitmap.is_saved(c)]
        used, saved, abort = session.save_area.used, 0, False
        for c in to_save:
            used += chunk_bytes(c, self.g, self.size)
            if used > self.capacity:
                abort = True
                break
            saved += 1
        marked, before = bitmap.marked, session.stats
        data = self.rng.randbytes(length)
        session.write(offset, data)
        after = session.stats
        assert session.read(offset, length) == data  # rule 5: the write always lands
        assert after.cofw_chunks - before.cofw_chunks == saved  # rule 3
        event(f"host write: {saved} COFW{', abort' if abort else ''}")
        assert after.aborts - before.aborts == abort  # rule 5
        assert bitmap.marked == (marked and not abort)
        assert all(bitmap.tracking(c) for c in touched)

    @rule(start=OFFSETS, length=LENGTHS)
    def write(self, start, length):
        self.host_write(start, length)

    @rule()
    def mark(self):
        if self.session.bitmap.marked:
            generation = self.session.generation
            with pytest.raises(StateError):
                self.session.mark()
            assert self.session.generation == generation
        else:
            self.session.mark()
            self.mark_image = self.session.read(0, self.size)

    @rule()
    def unmark(self):
        self.session.unmark()

    # -- copies --------------------------------------------------------------------------
    @rule(kind=st.sampled_from(["incremental", "full", "unmarked"]), hooks=HOOKS, fault=FAULTS)
    def copy(self, kind, hooks, fault):
        session = self.session
        marked = session.bitmap.marked
        if (kind == "incremental") != marked:
            self.refused(kind)
            return
        image = self.mark_image if kind == "incremental" else session.read(0, self.size)
        fired = {"cancel": False, "fault": False, "unmark": False}
        job: CopyJob

        def act(where: str, n: int) -> None:
            for hook_where, hook_n, action in hooks:
                if (hook_where, hook_n) != (where, n):
                    continue
                if action[0] == "write":
                    self.host_write(action[1], action[2])
                elif action[0] == "cancel":
                    job.cancel()
                    fired["cancel"] = True
                else:
                    fired["unmark"] |= session.bitmap.marked
                    session.unmark()

        calls = []

        def progress(done: int, total: int) -> None:
            calls.append((done, total))
            act("progress", len(calls))

        for i, lun in enumerate(self.luns):
            lun.writes = lun.flushes = 0
            lun.written.clear()
            lun.before_write = lambda n, offset, data, i=i: act(f"write{i}", n)
            if fault and fault[1] == i:
                if fault[0] == "write":
                    lun.fail_at = fault[2]
                else:
                    lun.fail_flush = True
        states = [d.state for d in self.dests]
        aborts = session.stats.aborts
        job = CopyJob(session, self.dests, io_size=self.io_size, progress=progress)
        run = {"incremental": job.incremental, "full": job.full}.get(kind)
        try:
            result = run() if run else job.full(marked=False)
            failed = False
        except CopyError as exc:
            result, failed = exc.result, True
        finally:
            for lun in self.luns:
                fired["fault"] |= lun.fail_at is not None and lun.writes >= lun.fail_at
                fired["fault"] |= lun.fail_flush and lun.flushes > 0
                lun.before_write, lun.fail_at, lun.fail_flush = None, None, False
        aborted = session.stats.aborts > aborts
        event(f"{kind} copy {'failed' if failed else 'ok'}")
        event(f"fired: {sorted(k for k, v in fired.items() if v) + ['abort'] * aborted}")

        # Rule 13: a failing destination drops out; the copy fails only when
        # none is left (or it is cancelled, or its mark ends).
        dropped = {d.name for d in self.dests if result.outcomes.get(d.name, "ok") != "ok"}
        if fired["cancel"] or (fired["fault"] and len(self.dests) == 1):
            assert failed
        if fired["fault"] and not failed:
            assert dropped
        if not (fired["cancel"] or fired["fault"] or fired["unmark"] or aborted):
            assert not failed
        assert session.state is State.UNMARKED
        assert session.save_area.used == 0
        assert [t for t in calls if t[0] > t[1]] == []
        assert [d for d, _ in calls] == sorted({d for d, _ in calls})  # strictly increasing
        if not failed:
            assert result.bytes_sent == result.bytes_total
            assert not calls or calls[-1] == (result.bytes_total, result.bytes_total)
            assert set(result.outcomes) == {d.name for d in self.dests}
            assert len(dropped) < len(self.dests)
        else:
            assert set(result.outcomes) == {d.name for d in self.dests}
        for dest, lun, state in zip(self.dests, self.luns, states, strict=True):
            if kind == "unmarked":
                assert dest.state is DestState.INCONSISTENT
                self.images[dest.name] = None
            elif not failed and dest.name not in dropped:
                assert dest.state is DestState.CONSISTENT
                assert contents(dest) == image  # rule 1
                self.images[dest.name] = image
            elif lun.writes or dest.name in dropped:  # it may hold part of the copy
                assert dest.state is DestState.INCONSISTENT
                self.images[dest.name] = None
            else:
                assert dest.state is state

    @rule(hooks=HOOKS, fault=FAULTS)
    def update(self, hooks, fault):
        """The common sequence: mark, then an incremental copy."""
        if not self.session.bitmap.marked:
            self.mark()
        self.copy("incremental", hooks, fault)

    def refused(self, kind: str) -> None:
        session = self.session
        for lun in self.luns:
            lun.writes = 0
        before = (session.bitmap.to_bytes(), session.stats, [d.state for d in self.dests])
        job = CopyJob(session, self.dests, io_size=self.io_size)
        with pytest.raises(StateError):
            {"incremental": job.incremental, "full": job.full}.get(
                kind, lambda: job.full(marked=False)
            )()
        after = (session.bitmap.to_bytes(), session.stats, [d.state for d in self.dests])
        assert after == before
        assert all(lun.writes == 0 for lun in self.luns)

    # -- what holds after every step ---------------------------------------------------------
    @invariant()
    def rules_hold(self):
        session, bitmap = self.session, self.session.bitmap
        bitmap._check()
        stats = session.stats
        assert stats.save_area_used <= stats.save_area_high_water <= self.capacity  # rule 5
        if not bitmap.marked:
            assert bitmap.transfer_count == bitmap.saved_count == 0
            assert stats.save_area_used == 0
        else:
            frozen = session.read_frozen(0, self.size)
            for c in range(bitmap.chunks):
                if bitmap.transfer(c):
                    lo, hi = c * self.g, min((c + 1) * self.g, self.size)
                    assert frozen[lo:hi] == self.mark_image[lo:hi], f"frozen chunk {c}"
        for dest in self.dests:
            assert_no_lost_change(session, dest.lun)  # rule 2
            if dest.state is DestState.CONSISTENT:  # rule 6
                assert contents(dest) == self.images[dest.name], dest.name

    def teardown(self):
        if not hasattr(self, "session"):
            return
        # Rule 2 in the end: one successful incremental copy brings every destination level.
        self.session.unmark()
        self.session.mark()
        CopyJob(self.session, self.dests).incremental()
        source = self.session.read(0, self.size)
        for dest in self.dests:
            assert dest.state is DestState.CONSISTENT
            assert contents(dest) == source, dest.name


TestCopyMachine = CopyMachine.TestCase
TestCopyMachine.settings = settings(
    max_examples=max(400, settings.default.max_examples), stateful_step_count=30
)


# -- failure paths ------------------------------------------------------------------------------


def test_a_destination_write_failure_unmarks_and_the_next_copy_repairs():
    # Flushing after every run confirms each one: only unsent runs go back.
    size = 40 * G
    session, (dest,), job = seeded(size, seed=1, io_size=4 * G, flush_every=4 * G)
    session.write(0, random.Random(2).randbytes(size))
    session.mark()
    dest.lun.fail_at = 3
    with pytest.raises(CopyError, match="injected failure") as failure:
        job.incremental()
    result = failure.value.result
    assert isinstance(result, CopyResult)
    assert result.outcomes["d0"].startswith("failed") and "injected" in result.outcomes["d0"]
    assert result.bytes_sent == 2 * 4 * G  # runs confirmed before the failure
    assert session.state is State.UNMARKED
    assert dest.state is DestState.INCONSISTENT
    assert_no_lost_change(session, dest.lun)
    unsent = [c for c in range(40) if session.bitmap.tracking(c)]
    assert unsent == list(range(8, 40))
    dest.lun.fail_at = None
    session.mark()
    again = job.incremental()
    assert again.bytes_sent == size - result.bytes_sent
    assert contents(dest) == session.read(0, size)
    assert dest.state is DestState.CONSISTENT


def test_a_failing_destination_drops_out_and_the_others_end_consistent():
    # Rule 13: one destination's trouble is its own. Flushing after every
    # run confirms each one, so the dropped destination misses exactly the
    # runs from its failure on, and its next copy sends those.
    size = 40 * G + 300
    io_size = 4 * G
    session, (good, bad), job = seeded(size, seed=3, dests=2, io_size=io_size, flush_every=G)
    rng = random.Random(4)
    for offset in range(0, size, 3 * G):  # every third chunk changes
        session.write(offset, rng.randbytes(min(G, size - offset)))
    session.mark()
    image = session.read(0, size)
    bad.lun.fail_at = 3
    first = job.incremental()
    assert first.outcomes["d0"] == "ok"
    assert first.outcomes["d1"].startswith("failed") and "injected" in first.outcomes["d1"]
    assert first.bytes_sent == first.bytes_total
    assert good.state is DestState.CONSISTENT and contents(good) == image
    assert bad.state is DestState.INCONSISTENT
    assert good.in_step(session) and bad.in_step(session)
    assert_no_lost_change(session, bad.lun)
    confirmed = sum(length for _, length in bad.lun.written)  # runs 1 and 2, flushed
    bad.lun.fail_at = None
    session.mark()
    second = job.incremental()
    assert second.bytes_sent == first.bytes_total - confirmed
    for dest in (good, bad):
        assert contents(dest) == image
        assert dest.state is DestState.CONSISTENT


def test_a_copy_fails_when_every_destination_failed():
    size = 40 * G
    session, (one, two), job = seeded(size, seed=3, dests=2, io_size=4 * G)
    session.write(0, random.Random(4).randbytes(size))
    session.mark()
    one.lun.fail_at = 2
    two.lun.fail_flush = True
    with pytest.raises(CopyError, match="injected") as failure:
        job.incremental()
    outcomes = failure.value.result.outcomes
    assert outcomes["d0"].startswith("failed") and outcomes["d1"].startswith("flush failed")
    assert one.state is two.state is DestState.INCONSISTENT
    assert session.state is State.UNMARKED
    for dest in (one, two):
        assert_no_lost_change(session, dest.lun)


def test_a_destination_failing_its_first_write_is_no_longer_reported_consistent():
    # A write that raised may have landed in part: rule 6 reports the
    # destination INCONSISTENT; its data is still its last image here.
    size = 16 * G
    session, (good, bad), job = seeded(size, seed=5, dests=2, io_size=4 * G)
    before = contents(bad)
    session.write(0, b"new" * 100)
    session.mark()
    bad.lun.fail_at = 1
    result = job.incremental()
    assert result.outcomes == {"d0": "ok", "d1": result.outcomes["d1"]}
    assert good.state is DestState.CONSISTENT
    assert bad.state is DestState.INCONSISTENT
    assert contents(bad) == before
    assert_no_lost_change(session, bad.lun)


def test_cancel_from_the_progress_callback_fails_the_copy_and_loses_nothing():
    size = 40 * G
    session, (dest,), _ = seeded(size, seed=6)
    session.write(0, random.Random(7).randbytes(size))
    session.mark()
    image = session.read(0, size)

    def progress(done: int, total: int) -> None:
        if done == 3 * 4 * G:
            job.cancel()

    job = CopyJob(session, [dest], io_size=4 * G, progress=progress)
    with pytest.raises(CopyError, match="cancelled") as failure:
        job.incremental()
    assert failure.value.result.bytes_sent == 3 * 4 * G
    assert session.state is State.UNMARKED
    assert_no_lost_change(session, dest.lun)
    session.mark()
    CopyJob(session, [dest]).incremental()
    assert contents(dest) == image


@pytest.mark.parametrize(
    ("what", "args", "match"),
    [
        ("smaller destination", {"dest_size": 16 * G - 1}, "less than the source"),
        ("io_size not a multiple", {"io_size": G + 512}, "multiple of the granularity"),
        ("zero io_size", {"io_size": 0}, "multiple of the granularity"),
        ("negative io_size", {"io_size": -G}, "multiple of the granularity"),
        ("no destination", {"dests": 0}, "at least one destination"),
        ("zero throttle", {"throttle": 0}, "throttle"),
        ("negative throttle", {"throttle": -1.0}, "throttle"),
        ("duplicate names", {"same_names": True}, "unique"),
    ],
)
def test_bad_copy_parameters_raise_parameter_error_and_change_nothing(what, args, match):
    size = 16 * G
    session = Session(MemoryLUN(size), G)
    session.write(0, b"x" * size)
    names = ["same", "same"] if args.get("same_names") else ["a", "b"]
    dests = [
        Destination(MemoryLUN(args.get("dest_size", size)), names[i])
        for i in range(args.get("dests", 2))
    ]
    before = session.bitmap.to_bytes()
    with pytest.raises(ParameterError, match=match):
        CopyJob(
            session,
            dests,
            io_size=args.get("io_size", 4 * G),
            throttle=args.get("throttle"),
        )
    assert session.bitmap.to_bytes() == before
    assert all(
        d.state is DestState.NEW and d.lun.read(0, d.lun.size) == bytes(d.lun.size) for d in dests
    )


def test_copies_in_the_wrong_state_raise_state_error_and_change_nothing():
    size = 16 * G
    session, (dest,), job = seeded(size, seed=8)
    session.write(3 * G, b"changed")
    image = contents(dest)

    def snapshot():
        return (session.bitmap.to_bytes(), session.stats, dest.state, contents(dest))

    before = snapshot()
    with pytest.raises(StateError, match="unmarked"):
        job.incremental()
    assert snapshot() == before
    session.mark()
    before = snapshot()
    for copy in (job.full, lambda: job.full(marked=False)):
        with pytest.raises(StateError, match="marked"):
            copy()
        assert snapshot() == before
    assert dest.lun.writes == 0 and contents(dest) == image


def test_mark_and_a_second_unmarked_full_copy_are_refused_while_one_runs():
    size = 16 * G
    session, (dest,), _ = seeded(size, seed=9)
    other = CopyJob(session, [Destination(MemoryLUN(size), "other")])
    attempts = {
        "mark": session.mark,
        "marked full copy": other.full,
        "unmarked full copy": lambda: other.full(marked=False),
    }
    refusals: dict[str, list[str]] = {name: [] for name in attempts}

    def progress(done: int, total: int) -> None:
        for name, attempt in attempts.items():
            with pytest.raises(StateError) as refused:
                attempt()
            refusals[name].append(str(refused.value))
        assert session.state is State.UNMARKED

    result = CopyJob(session, [dest], io_size=4 * G, progress=progress).full(marked=False)
    assert result.bytes_sent == size
    assert all(len(messages) == 4 for messages in refusals.values())
    assert "unmarked full copy is running" in refusals["mark"][0]
    assert session.mark() == session.generation  # the hold ended with the copy


def test_a_failed_unmarked_full_copy_puts_the_unsent_range_back():
    size = 40 * G + 100
    session, (dest,), job = seeded(size, seed=10, io_size=4 * G, flush_every=4 * G)
    session.write(0, random.Random(11).randbytes(size))
    dest.lun.fail_at = 4
    with pytest.raises(CopyError) as failure:
        job.full(marked=False)
    sent = failure.value.result.bytes_sent
    assert sent == 3 * 4 * G
    assert dest.state is DestState.INCONSISTENT
    chunks = session.bitmap.chunks
    assert [c for c in range(chunks) if session.bitmap.tracking(c)] == list(range(12, chunks))
    assert_no_lost_change(session, dest.lun)
    dest.lun.fail_at = None
    session.mark()
    again = job.incremental()
    assert again.bytes_sent == size - sent
    assert contents(dest) == session.read(0, size)
    assert dest.state is DestState.CONSISTENT


def test_a_new_destination_gets_a_full_copy():
    size = 24 * G + 5
    session, (old,), _ = seeded(size, seed=12)
    session.write(G, b"changed")
    new = Destination(MemoryLUN(size), "new")
    session.mark()
    image = session.read(0, size)
    session.write(G, b"after the mark")  # must reach neither destination
    result = CopyJob(session, [old, new]).incremental()
    # The new destination is seeded from the in-step one outside the transfer
    # bitmap; the changed chunk goes to both.
    assert result.mode == "incremental"
    assert result.bytes_sent == G
    assert result.bytes_seeded == size - G
    for dest in (old, new):
        assert contents(dest) == image
        assert dest.state is DestState.CONSISTENT


def test_after_an_unmarked_full_copy_an_incremental_sends_only_what_changed():
    size = 40 * G + 700
    rng = random.Random(13)
    source = MemoryLUN(size)
    fill_random(source, rng)
    session = Session(source, G)
    session.write(0, rng.randbytes(size))  # tracked before: the full copy covers it
    dest = Destination(MemoryLUN(size), "d")
    changed: set[int] = set()

    def host_write() -> None:
        offset = rng.randrange(size)
        length = min(rng.randrange(1, 2 * G), size - offset)
        session.write(offset, rng.randbytes(length))
        changed.update(chunks_touched(offset, length, G))

    def progress(done: int, total: int) -> None:
        if done in (4 * G, 20 * G, 36 * G):
            host_write()

    result = CopyJob(session, [dest], io_size=4 * G, progress=progress).full(marked=False)
    assert result.mode == "full-unmarked" and result.bytes_sent == size
    assert dest.state is DestState.INCONSISTENT
    for _ in range(3):
        host_write()
    session.mark()
    again = CopyJob(session, [dest]).incremental()
    assert again.bytes_sent == sum(chunk_bytes(c, G, size) for c in changed)
    assert contents(dest) == session.read(0, size)
    assert dest.state is DestState.CONSISTENT


# -- throttle and progress ----------------------------------------------------------------------


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_progress_rises_to_the_total_under_a_throttle(marked):
    size = 64 * G + 10
    session, (dest,), _ = seeded(size, seed=14)
    session.write(0, random.Random(15).randbytes(size))
    calls = []
    job = CopyJob(
        session,
        [dest],
        throttle=1e12,
        io_size=8 * G,
        progress=lambda done, total: calls.append((done, total)),
    )
    result = job.full(marked=marked)
    assert contents(dest) == session.read(0, size)
    dones = [done for done, _ in calls]
    assert dones == sorted(set(dones)) and len(calls) == result.extents == 9
    assert result.bytes_total == size
    assert {total for _, total in calls} == {size}
    assert calls[-1] == (size, size)


def test_cancel_interrupts_a_throttle_wait():
    size = 16 * G
    session, (dest,), _ = seeded(size, seed=16)
    session.write(0, b"y" * size)
    session.mark()
    progressed = threading.Event()
    job = CopyJob(session, [dest], throttle=1.0, io_size=G, progress=lambda *_: progressed.set())
    outcome = []

    def run() -> None:
        try:
            job.incremental()
        except CopyError as exc:
            outcome.append(exc)

    copier = threading.Thread(target=run, daemon=True)
    copier.start()
    assert progressed.wait(TIMEOUT)  # one run out; the throttle now waits ~4096 s
    job.cancel("the operator changed their mind")
    copier.join(TIMEOUT)
    assert not copier.is_alive(), "cancel did not end the throttle wait"
    assert outcome and "the operator changed their mind" in str(outcome[0])
    assert session.state is State.UNMARKED
    assert_no_lost_change(session, dest.lun)


# -- a real block device ------------------------------------------------------------------------


@contextlib.contextmanager
def loop_device(path):
    """Attach ``path`` to a free loop device; skip the test when that is impossible."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    attach = subprocess.run(
        ["losetup", "--find", "--show", str(path)], capture_output=True, text=True, check=False
    )
    if attach.returncode != 0:
        pytest.skip(f"cannot attach a loop device (needs root and /dev/loop*): {attach.stderr}")
    device = attach.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=True, timeout=TIMEOUT)


@pytest.mark.parametrize("device_is", ["source", "destination"])
def test_copies_to_and_from_a_loop_device(device_is, tmp_path):
    size = 4 << 20
    backing = tmp_path / "backing.img"
    FileLUN.create(backing, size).close()
    plain = FileLUN.create(tmp_path / "plain.img", size)
    rng = random.Random(17)
    with loop_device(backing) as device, FileLUN(device) as on_device:
        assert on_device.size == size
        source, target = (on_device, plain) if device_is == "source" else (plain, on_device)
        fill_random(source, rng)
        session = Session(source, 8192)
        dest = Destination(target, "d")
        job = CopyJob(session, [dest], io_size=256 << 10)
        job.full()
        assert target.read(0, size) == source.read(0, size)
        changed = set()
        for _ in range(20):
            offset = rng.randrange(size - 20000)
            session.write(offset, rng.randbytes(20000))
            changed.update(chunks_touched(offset, 20000, 8192))
        session.mark()
        image = source.read(0, size)
        result = job.incremental()
        assert result.bytes_sent == 8192 * len(changed)
        assert target.read(0, size) == image
        assert dest.state is DestState.CONSISTENT
    plain.close()
    with open(backing, "rb") as f:  # what went through the device reached its file
        assert f.read() == image


# -- regressions: each of these shows a bug found while writing these tests ----------------------


def test_an_unmarked_full_copy_keeps_a_write_in_flight_when_it_starts():
    # A host write has set its tracking bit and is parked before its data
    # reaches the source when the unmarked full copy starts. The copy clears
    # tracking and sends the old data; the write lands after that (released
    # from the progress callback). Rule 2: the chunk must still be tracked,
    # so the next incremental copy sends it.
    size = 16 * G
    source = HookLUN(MemoryLUN(size))
    session = Session(source, G)
    dest = Destination(MemoryLUN(size), "d")
    CopyJob(session, [dest]).full(marked=False)
    inside, release = threading.Event(), threading.Event()

    def park(n: int, offset: int, data) -> None:
        inside.set()
        assert release.wait(TIMEOUT)

    source.before_write = park
    writer = threading.Thread(target=session.write, args=(0, b"\x01" * 100), daemon=True)
    writer.start()
    assert inside.wait(TIMEOUT)
    source.before_write = None
    job = CopyJob(session, [dest], progress=lambda *_: release.set())
    copier = threading.Thread(target=job.full, kwargs={"marked": False}, daemon=True)
    copier.start()
    # A copy that rightly waits for the write never reaches its progress
    # callback: after a bounded look, let the write go anyway.
    copier.join(1.0)
    release.set()
    writer.join(TIMEOUT)
    copier.join(TIMEOUT)
    assert not writer.is_alive() and not copier.is_alive()
    assert_no_lost_change(session, dest.lun)
    session.mark()
    job.incremental()
    assert contents(dest) == session.read(0, size)


def test_a_new_destination_gets_the_image_at_the_callers_mark():
    # Rule 1: the copy that follows a mark delivers the source as it was at
    # that mark, even when a destination is new and needs every chunk.
    size = 8 * G
    session = Session(MemoryLUN(size), G)
    session.write(0, b"a" * G)
    dest = Destination(MemoryLUN(size), "new")
    session.mark()
    image = session.read(0, size)
    session.write(0, b"b" * G)  # after the mark: must not reach the destination
    # No destination is in step to seed it from and the mark is not full: the
    # image at this mark cannot be built, so the copy is refused unchanged.
    with pytest.raises(StateError, match="full copy"):
        CopyJob(session, [dest]).incremental()
    assert session.state is State.MARKED
    assert dest.state is DestState.NEW
    assert contents(dest) != image


def test_a_destination_whose_write_fails_midway_is_not_reported_consistent():
    # A device can fail after writing part of a request (EIO mid-transfer).
    # Rule 6: a destination whose write raised may hold a mix, so it must not
    # stay CONSISTENT.
    size = 8 * G
    session, (dest,), job = seeded(size, seed=18)
    image = contents(dest)
    session.write(0, b"x" * G)
    session.mark()
    dest.lun.fail_at, dest.lun.partial = 1, True
    with pytest.raises(CopyError):
        job.incremental()
    assert dest.state is not DestState.CONSISTENT or contents(dest) == image


def test_a_refused_unmarked_full_copy_leaves_destination_states_alone():
    # Rule 10: an operation refused in the wrong state changes nothing; here
    # a CONSISTENT destination must not be reported INCONSISTENT.
    size = 8 * G
    session, (busy,), _ = seeded(size, seed=21)
    idle = Destination(MemoryLUN(size), "idle", DestState.CONSISTENT)
    other = CopyJob(session, [idle])
    refused = []

    def progress(done: int, total: int) -> None:
        with pytest.raises(StateError) as failure:
            other.full(marked=False)
        refused.append(failure.value)

    CopyJob(session, [busy], progress=progress).full(marked=False)
    assert refused
    assert idle.state is DestState.CONSISTENT


def test_a_destination_left_out_of_a_copy_is_not_reported_consistent_after_a_later_one():
    # Destination b takes part in the first and third copies only; the second
    # sends chunk 0 to a alone. The third sends chunk 4 to both: b then holds
    # neither the old image nor the new one (rule 6) and chunk 0 differs from
    # the source while in no bitmap (rule 2).
    size = 8 * G
    session = Session(MemoryLUN(size), G)
    a, b = Destination(MemoryLUN(size), "a"), Destination(MemoryLUN(size), "b")
    CopyJob(session, [a, b]).full()
    session.write(0, b"1" * G)
    session.mark()
    CopyJob(session, [a]).incremental()
    session.write(4 * G, b"2" * G)
    session.mark()
    CopyJob(session, [a, b]).incremental()
    assert contents(a) == session.read(0, size)
    assert b.state is not DestState.CONSISTENT or contents(b) == session.read(0, size)


def test_runs_sent_since_the_last_flush_go_back_when_a_copy_fails():
    # A destination may drop acknowledged writes it never flushed: a copy that
    # fails puts back every run sent since its last flush (rule 2).
    size = 40 * G
    session, (dest,), job = seeded(size, seed=21, io_size=4 * G, flush_every=8 * G)
    session.write(0, random.Random(22).randbytes(size))
    session.mark()
    dest.lun.fail_at = 4  # runs 1-2 flushed together, run 3 sent unflushed, run 4 fails
    with pytest.raises(CopyError):
        job.incremental()
    assert [c for c in range(40) if session.bitmap.tracking(c)] == list(range(8, 40))
    assert_no_lost_change(session, dest.lun)


def test_a_failed_flush_keeps_the_written_chunks_to_send():
    # flush() is what makes completed writes durable (fsync); when it fails
    # the destination may have lost any of this copy's writes. Rule 2: every
    # chunk the copy wrote must stay in a bitmap so the next copy resends it.
    size = 16 * G
    session, (dest,), job = seeded(size, seed=19, io_size=4 * G)
    session.write(0, random.Random(20).randbytes(size))
    session.mark()
    dest.lun.fail_flush = True
    with pytest.raises(CopyError, match="flush"):
        job.incremental()
    assert dest.state is DestState.INCONSISTENT
    written = {c for offset, length in dest.lun.written for c in chunks_touched(offset, length, G)}
    assert written == set(range(16))
    kept = {c for c in range(16) if session.bitmap.tracking(c) or session.bitmap.transfer(c)}
    assert kept == written


# -- copies between files go through the kernel ------------------------------------------------
def kernel_copies(monkeypatch, refuse: bool = False) -> list[tuple[int, int]]:
    """Record each ``copy_file_range`` (offset, count); with ``refuse``, fail as across
    file systems (EXDEV)."""
    import errno
    import os

    real = os.copy_file_range
    calls: list[tuple[int, int]] = []

    def recorded(src, dst, count, offset_src, offset_dst):
        calls.append((offset_src, count))
        if refuse:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", recorded)
    return calls


@pytest.mark.parametrize("refuse", [False, True], ids=["kernel", "refused"])
def test_file_to_file_copies_keep_the_point_in_time(tmp_path, monkeypatch, refuse):
    # Chunks overwritten after the mark are patched from the save area over
    # what the kernel copied; when the kernel refuses, the copy goes through
    # the buffer and ends the same.
    import isc.copy

    g, size = 8192, 40 * 8192 + 100
    monkeypatch.setattr(isc.copy, "SPLIT_MIN", g)  # worth splitting from 2 chunks on
    rng = random.Random(5)
    with (
        FileLUN.create(tmp_path / "source.img", size) as source,
        FileLUN.create(tmp_path / "d0.img", size) as d0,
        FileLUN.create(tmp_path / "d1.img", size) as d1,
    ):
        fill_random(source, rng)
        session = Session(source, g)
        dests = [Destination(d0, "d0"), Destination(d1, "d1")]
        calls = kernel_copies(monkeypatch, refuse)
        job = CopyJob(session, dests, io_size=4 * g, workers=2)
        job.full(marked=False)
        assert [contents(d) for d in dests] == [source.read(0, size)] * 2
        for _ in range(20):
            session.write(rng.randrange(size - 3 * g), rng.randbytes(rng.randrange(1, 3 * g)))
        session.mark()
        image = source.read(0, size)
        for _ in range(20):  # after the mark: COFW saves the old data of marked chunks
            session.write(rng.randrange(size - 3 * g), rng.randbytes(rng.randrange(1, 3 * g)))
        assert session.stats.cofw_chunks > 0
        result = job.incremental()
        assert [contents(d) for d in dests] == [image] * 2
        assert all(d.state is DestState.CONSISTENT for d in dests)
        assert result.bytes_sent > 0
        session.mark(full=True)
        image = source.read(0, size)
        session.write(size - 50, b"\xee" * 50)  # the tail chunk, saved and patched
        job.incremental()
        assert [contents(d) for d in dests] == [image] * 2
    # Every run was offered to the kernel. The first copy, the host quiet, went
    # in two pieces of whole chunks, one per worker, to each destination.
    half = 21 * g
    assert sorted(calls[:4]) == [(0, half), (0, half), (half, size - half), (half, size - half)]
    assert all(count <= size for _, count in calls)


def test_a_run_is_split_among_workers_only_while_the_host_is_quiet(tmp_path, monkeypatch):
    import isc.copy

    g = 4096
    monkeypatch.setattr(isc.copy, "KERNEL_RUN", 4 * g)  # 4 runs of 4 chunks
    monkeypatch.setattr(isc.copy, "SPLIT_MIN", g)
    with (
        FileLUN.create(tmp_path / "source.img", 16 * g) as source,
        FileLUN.create(tmp_path / "dest.img", 16 * g) as dest_lun,
    ):
        fill_random(source, random.Random(6))
        session = Session(source, g)
        calls = kernel_copies(monkeypatch)

        def progress(done: int, total: int) -> None:
            if done == 4 * g:  # the host writes while the second run is due
                session.write(0, b"\x01" * 10)

        dest = Destination(dest_lun, "d")
        job = CopyJob(session, [dest], io_size=4 * g, workers=2, progress=progress)
        job.full(marked=False)
        assert dest_lun.read(g, 15 * g) == source.read(g, 15 * g)
    assert [count // g for _, count in calls] == [2, 2, 4, 2, 2, 2, 2]


class RecordedWaits(threading.Event):
    """A cancel event whose waits return at once, recording how long each would be."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        return False


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
@pytest.mark.parametrize("share", [1.0, 0.25])
def test_while_the_host_writes_the_copy_works_its_busy_share(marked, share):
    session, (dest,), _ = seeded(8 * G, 7)
    job = CopyJob(session, [dest], io_size=G, busy_share=share)

    def progress(done: int, total: int) -> None:
        if done in (2 * G, 5 * G):  # the host writes after runs 2 and 5
            session.write(0, b"\x01")

    job.progress = progress
    job._cancel = RecordedWaits()
    if marked:
        session.mark(full=True)
        job.incremental()
    else:
        job.full(marked=False)
    assert dest.lun.read(G, 7 * G) == session.source.read(G, 7 * G)
    # It waits after the runs that follow the writes (3 and 6), never otherwise.
    assert len(job._cancel.waits) == (0 if share == 1 else 2)
    assert all(wait > 0 for wait in job._cancel.waits)


def test_busy_share_must_be_a_fraction():
    session, dests, _ = seeded(4 * G, 8)
    for share in (0, -0.5, 1.01):
        with pytest.raises(ParameterError, match="busy_share"):
            CopyJob(session, dests, busy_share=share)


def test_the_waits_of_a_tiny_throttle_or_busy_share_fit_a_timer():
    # A longer wait raises OverflowError ("timestamp out of range"): the copy
    # must wait as long as a timer can instead, until it is cancelled.
    session, (dest,), _ = seeded(4 * G, 9)

    def progress(done: int, total: int) -> None:
        if done == G:  # the host writes after run 1: the busy share waits after run 2
            session.write(0, b"\x01")

    job = CopyJob(session, [dest], io_size=G, throttle=1e-300, busy_share=1e-300)
    job.progress = progress
    job._cancel = RecordedWaits()
    job.full(marked=False)
    assert dest.lun.read(G, 3 * G) == session.source.read(G, 3 * G)
    # The throttle's wait after each of the 4 runs, the busy share's after run 2.
    assert job._cancel.waits == [threading.TIMEOUT_MAX] * 5


def test_a_cancel_before_a_copy_stops_that_copy_only():
    size = 8 * G
    session, (dest,), job = seeded(size, seed=9, io_size=G)
    session.write(0, b"z" * size)
    session.mark()
    image = session.read(0, size)
    job.cancel("asked before it began")
    with pytest.raises(CopyError, match="asked before it began") as failure:
        job.incremental()
    assert failure.value.result.bytes_sent == G  # the first run went out, then it stopped
    assert_no_lost_change(session, dest.lun)
    session.mark()
    job.incremental()  # the cancel is spent
    assert contents(dest) == image


@pytest.mark.parametrize("fails", ["run", "piece"])
def test_a_kernel_copy_that_fails_leaves_the_destination_inconsistent(tmp_path, monkeypatch, fails):
    import errno

    import isc.copy
    import isc.lun

    g = 4096
    monkeypatch.setattr(isc.copy, "KERNEL_RUN", 8 * g)  # 2 runs of 8 chunks
    if fails == "piece":
        monkeypatch.setattr(isc.lun, "COPY_PIECE", 2 * g)  # each copied in 4 pieces
    with (
        FileLUN.create(tmp_path / "source.img", 16 * g) as source,
        FileLUN.create(tmp_path / "dest.img", 16 * g) as dest_lun,
    ):
        fill_random(source, random.Random(10))
        session = Session(source, g)
        dest = Destination(dest_lun, "d")
        job = CopyJob(session, [dest], io_size=4 * g, workers=1)
        job.full()  # consistent first
        session.write(0, random.Random(11).randbytes(16 * g))  # every chunk to send
        real, calls = os.copy_file_range, []  # its calls, and the yields between them
        failing = 2 if fails == "run" else 6  # the second run, or its second piece

        def fail(src, dst, count, offset_src, offset_dst):
            calls.append((offset_src, count))
            if len(calls) - calls.count("yield") == failing:
                raise OSError(errno.EIO, "the destination disk failed")
            return real(src, dst, count, offset_src, offset_dst)

        monkeypatch.setattr(os, "copy_file_range", fail)
        monkeypatch.setattr(os, "sched_yield", lambda: calls.append("yield"))
        session.mark()
        with pytest.raises(CopyError, match="the destination disk failed") as failure:
            job.incremental()
        if fails == "run":
            assert calls == [(0, 8 * g), (8 * g, 8 * g)]
        else:  # the CPU is yielded between the pieces of a run
            p = [(i * 2 * g, 2 * g) for i in range(6)]
            run_1 = [p[0], "yield", p[1], "yield", p[2], "yield", p[3]]
            assert calls == [*run_1, p[4], "yield", p[5]]
        assert dest.state is DestState.INCONSISTENT  # rule 6
        assert failure.value.result.outcomes["d"].startswith("failed")
        assert_no_lost_change(session, dest_lun)  # rule 2
        monkeypatch.setattr(os, "copy_file_range", real)
        session.mark()
        job.incremental()
        assert dest.state is DestState.CONSISTENT
        assert dest_lun.read(0, 16 * g) == source.read(0, 16 * g)


class RecordedFile(FileLUN):
    """A file destination that lists the ``(offset, length)`` of every ``write``."""

    written: list[tuple[int, int]]

    def write(self, offset: int, data) -> None:
        self.written.append((offset, memoryview(data).nbytes))
        super().write(offset, data)


@pytest.mark.parametrize("path", ["core", "fallback"])
@pytest.mark.parametrize("group", [None, 2], ids=["whole", "two-chunk-writes"])
def test_saved_chunks_that_follow_each_other_go_out_in_one_write(
    tmp_path, monkeypatch, group, path
):
    import isc.session

    g, size = 4096, 16 * 4096 + 100
    if group:
        monkeypatch.setattr(isc.session, "SAVED_WRITE", group * g)
    with (
        FileLUN.create(tmp_path / "source.img", size) as source,
        RecordedFile.create(tmp_path / "dest.img", size) as dest_lun,
    ):
        fill_random(source, random.Random(15))
        session = Session(source, g)
        core = session._write_saved
        if path == "fallback":  # the core stops at once: the session's loop writes them all
            session._write_saved = lambda chunks, end, dest: 0
        session.mark(full=True)
        image = source.read(0, size)
        for chunk in (2, 3, 4, 7, 16):  # saved: the old data of 5 chunks, the last one short
            session.write(chunk * g, b"\x01")
        dest_lun.written = []
        CopyJob(session, [Destination(dest_lun, "d")], workers=1).incremental()
        assert dest_lun.read(0, size) == image
    if group:
        writes = [(2 * g, 2 * g), (4 * g, g), (7 * g, g), (16 * g, 100)]
    else:
        writes = [(2 * g, 3 * g), (7 * g, g), (16 * g, 100)]
    if path == "core":  # with the interpreter lock released, not through FileLUN.write
        assert (dest_lun.written, core.chunks, core.writes) == ([], 5, len(writes))
    else:
        assert (dest_lun.written, core.chunks) == (writes, 0)


class NoPythonWrites(FileLUN):
    """A file destination whose ``write`` must not be called: copies reach it in the kernel
    and, for saved chunks, through the core's ``SavedWrite``."""

    def write(self, offset: int, data) -> None:
        raise AssertionError(f"FileLUN.write({offset}, {memoryview(data).nbytes} bytes) called")


@pytest.mark.parametrize("area", ["memory", "file"])
def test_saved_chunks_reach_the_destination_from_the_core_while_writers_race(
    tmp_path, monkeypatch, area
):
    """Marked full copies under writer threads, in runs of 8 chunks split between two
    copy threads, end with each destination holding the image at the mark: the saved
    chunks, written by the core with the interpreter lock released, never by
    ``FileLUN.write``."""
    import isc.copy

    g = 16384
    size = 64 * g + 1000  # a short last chunk
    monkeypatch.setattr(isc.copy, "KERNEL_RUN", 8 * g)
    monkeypatch.setattr(isc.copy, "SPLIT_MIN", g)
    with (
        FileLUN.create(tmp_path / "source.img", size) as source,
        NoPythonWrites.create(tmp_path / "d0.img", size) as d0,
        NoPythonWrites.create(tmp_path / "d1.img", size) as d1,
    ):
        fill_random(source, random.Random(21))
        save_area = SaveArea(size, None if area == "memory" else tmp_path / "save-area")
        session = Session(source, g, save_area)
        dests = [Destination(d0, "d0"), Destination(d1, "d1")]

        def write(writer: int, seq: int, wrng: random.Random) -> None:
            length = wrng.randrange(512, 2 * g, 512)
            session.write(wrng.randrange(0, size - length + 1, 512), wrng.randbytes(length))

        def progress(done: int, total: int) -> None:
            writers.allow(4)  # writes race the next run
            writers.wait_done(writers.total_done + 1)

        job = CopyJob(session, dests, io_size=4 * g, workers=2, progress=progress)
        with Writers(write, 2, seed=22) as writers:
            for _ in range(3):
                writers.settle()
                session.mark(full=True)
                image = source.read(0, size)
                writers.allow(16)  # saved before the copy reaches their chunks
                writers.wait_done(writers.total_done + 8)
                job.incremental()
                writers.settle()
                for dest in dests:
                    assert dest.state is DestState.CONSISTENT
                    assert contents(dest) == image, dest.name
        assert 0 < session._write_saved.chunks <= 2 * session.stats.cofw_chunks


class BreakingSource(FileLUN):
    """A file source that, after its kernel copy of the range at ``at`` to ``victim``,
    makes the victim's descriptor refuse writes (``EBADF``): the saved chunks that follow
    cannot be written over the copy."""

    victim: FileLUN | None = None
    at = 0

    def copy_to(self, offset: int, length: int, dest) -> bool:
        copied = super().copy_to(offset, length, dest)
        if dest is self.victim and offset == self.at:
            readonly = os.open(dest.path, os.O_RDONLY | os.O_CLOEXEC)
            os.dup2(readonly, dest._write_fd)
            os.close(readonly)
        return copied


@pytest.mark.parametrize("dests", [1, 2])
def test_a_saved_chunk_write_that_fails_drops_its_destination_and_reports_it_inconsistent(
    tmp_path, monkeypatch, dests
):
    """The core stops at a write that fails, the session's loop meets the error, and the
    destination drops out: INCONSISTENT, every chunk that differs still tracked (rules 2
    and 6); the copy fails if it was the only one, else the other ends CONSISTENT."""
    import isc.copy

    g = 4096
    size = 16 * g
    monkeypatch.setattr(isc.copy, "KERNEL_RUN", 8 * g)  # 2 runs: the second one fails
    with (
        BreakingSource.create(tmp_path / "source.img", size) as source,
        FileLUN.create(tmp_path / "d0.img", size) as d0,
        FileLUN.create(tmp_path / "d1.img", size) as d1,
    ):
        fill_random(source, random.Random(31))
        session = Session(source, g, SaveArea(size))
        destinations = [Destination(d0, "d0"), Destination(d1, "d1")][:dests]
        job = CopyJob(session, destinations, io_size=4 * g, workers=1)
        job.full()
        session.mark(full=True)
        image = source.read(0, size)
        for chunk in (1, 9, 10, 12):  # saved, in both runs
            session.write(chunk * g, b"\x02" * 100)
        source.victim, source.at = d0, 8 * g
        if dests == 1:
            with pytest.raises(CopyError, match="Bad file descriptor") as failure:
                job.incremental()
            outcomes = failure.value.result.outcomes
            assert session.state is State.UNMARKED
        else:
            outcomes = job.incremental().outcomes
            assert destinations[1].state is DestState.CONSISTENT
            assert contents(destinations[1]) == image
        assert outcomes["d0"].startswith("failed") and "Bad file descriptor" in outcomes["d0"]
        assert destinations[0].state is DestState.INCONSISTENT
        # Chunk 1 of the first run to each, the second run's 3 to d1 alone.
        assert session._write_saved.chunks == (1 if dests == 1 else 5)
        assert_no_lost_change(session, d0)


# -- sparse sources: full copies send holes as holes --------------------------------------------
K64 = 65536


class ThinLUN(FileLUN):
    """A file LUN that stores a write of whole zero blocks as a hole, as thin volumes and
    QEMU's ``detect-zeroes=unmap`` do: a host write can turn data into a hole."""

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        if offset % 4096 == 0 and len(view) % 4096 == 0 and view == bytes(len(view)):
            self.write_zeroes(offset, len(view))
        else:
            super().write(offset, view)


def allocated(lun) -> int:
    import os

    return os.fstat(lun._fd).st_blocks * 512


def sparse_source(path, rng: random.Random, g: int = K64) -> ThinLUN:
    """A 16-chunk sparse LUN (plus a 700-byte tail): chunks 1, 2, 9 and a 4 KiB
    piece of chunk 12 hold data, the rest are holes."""
    size = 16 * g + 700
    source = ThinLUN.create(path, size)
    source.write(g, rng.randbytes(2 * g))
    source.write(9 * g, rng.randbytes(g))
    source.write(12 * g + 8192, rng.randbytes(4096))
    source.write(size - 700, rng.randbytes(700))
    return source


def chunks_of(extents, g: int) -> set[int]:
    """The chunks that (offset, length) ``extents`` touch."""
    return {c for offset, length in extents for c in chunks_touched(offset, length, g)}


def rounded_to_chunks(extents, g: int, size: int) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for c in sorted(chunks_of(extents, g)):
        if ranges and sum(ranges[-1]) == c * g:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + g)
        else:
            ranges.append((c * g, g))
    return [(o, min(n, size - o)) for o, n in ranges]


@pytest.mark.parametrize("path", ["kernel", "buffer"])
@pytest.mark.parametrize("old", [False, True], ids=["fresh", "old-data"])
@pytest.mark.parametrize("marked", [False, True], ids=["unmarked", "marked"])
def test_a_full_copy_of_a_sparse_source_leaves_the_destination_as_sparse(
    tmp_path, monkeypatch, marked, old, path
):
    rng = random.Random(30)
    with (
        sparse_source(tmp_path / "source.img", rng) as source,
        FileLUN.create(tmp_path / "dest.img", source.size) as target,
    ):
        size = source.size
        if old:  # a destination that held other data everywhere: holes must be punched
            fill_random(target, rng)
        kernel_copies(monkeypatch, refuse=path == "buffer")
        session = Session(source)
        result = CopyJob(session, [Destination(target, "d")], io_size=4 * K64).full(marked)
        assert result.bytes_sent == size
        assert target.read(0, size) == source.read(0, size)
        extents = source.data_extents(0, size)
        if marked:  # sent from the frozen view in whole chunks
            assert target.data_extents(0, size) == rounded_to_chunks(extents, K64, size)
        else:
            assert target.data_extents(0, size) == extents
            assert allocated(target) == allocated(source)


@pytest.mark.parametrize("marked", [False, True], ids=["unmarked", "marked"])
def test_holes_go_as_zeros_to_a_destination_without_write_zeroes(tmp_path, marked):
    rng = random.Random(31)
    with sparse_source(tmp_path / "source.img", rng) as source:
        size = source.size
        target = HookLUN(MemoryLUN(size))  # no write_zeroes: zeros are written
        fill_random(target, rng)
        target.written.clear()
        session = Session(source)
        CopyJob(session, [Destination(target, "d")]).full(marked)
        assert target.read(0, size) == source.read(0, size)
        assert (3 * K64, 6 * K64) in target.written  # the hole from chunk 3 to chunk 8


@pytest.mark.parametrize("server", ["qemu-nbd", "nbdkit-nozero"])
@pytest.mark.parametrize("marked", [False, True], ids=["unmarked", "marked"])
def test_holes_go_as_write_zeroes_to_an_nbd_destination(tmp_path, marked, server):
    import os

    from test_nbd import nbdkit, qemu_nbd

    from isc.nbd import NBDLUN, TransmissionFlag

    rng = random.Random(32)
    with sparse_source(tmp_path / "source.img", rng) as source:
        size = source.size
        if server == "qemu-nbd":  # WRITE_ZEROES, which it turns into punched holes
            serving = qemu_nbd(tmp_path, "--discard=unmap", size=size)
        else:  # no WRITE_ZEROES: zeros are written
            serving = nbdkit(tmp_path, "--filter=nozero", "memory", f"size={size}", "zeromode=none")
        with serving as remote, NBDLUN(remote.uri) as target:
            assert bool(target.flags & TransmissionFlag.SEND_WRITE_ZEROES) == (server == "qemu-nbd")
            fill_random(target, rng)
            target.flush()
            CopyJob(Session(source), [Destination(target, "d")]).full(marked)
            assert target.read(0, size) == source.read(0, size)
            if remote.backing is not None:
                # Allocated: the data chunks, not the old data in the holes.
                assert os.stat(remote.backing).st_blocks * 512 <= 5 * K64


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("change", ["discard", "fill"])
def test_a_marked_full_copy_sends_holes_as_they_were_at_the_mark(tmp_path, change, when):
    # A host write may turn a chunk of the transfer bitmap from data into a
    # hole (a write of zeros to thin storage) or from a hole into data while
    # the copy decides what is a hole. It lands inside the copy's source
    # lookup of its run, before or after the file system is asked: either
    # way the destination must get the chunk as it was at the mark.
    rng = random.Random(33)
    g = K64
    target_chunk = 9 if change == "discard" else 5  # data at the mark / a hole at the mark
    with sparse_source(tmp_path / "source.img", rng) as source:
        size = source.size
        session = Session(source)
        fired = []
        real = source.data_extents

        def racing(offset: int, length: int) -> list[tuple[int, int]]:
            inside = offset <= target_chunk * g < offset + length
            if inside and when == "before" and not fired:
                fired.append(change)
                session.write(target_chunk * g, bytes(g) if change == "discard" else b"\x07" * g)
            extents = real(offset, length)
            if inside and when == "after" and not fired:
                fired.append(change)
                session.write(target_chunk * g, bytes(g) if change == "discard" else b"\x07" * g)
            return extents

        source.data_extents = racing
        target = FileLUN.create(tmp_path / "dest.img", size)
        fill_random(target, rng)
        image = source.read(0, size)
        dest = Destination(target, "d")
        CopyJob(session, [dest], io_size=2 * g).full()
        assert fired and session.stats.cofw_chunks == 1
        assert dest.state is DestState.CONSISTENT
        assert target.read(0, size) == image
        target.close()


def test_marked_full_copies_of_a_sparse_source_hold_the_point_in_time_under_writers(tmp_path):
    # Writers race every run: random data, and zeros that punch holes.
    g = 8192
    rng = random.Random(34)
    size = 48 * g + 300
    source = ThinLUN.create(tmp_path / "source.img", size)
    for chunk in rng.sample(range(48), 12):
        source.write(chunk * g, rng.randbytes(g))
    session = Session(source, g)
    dests = [
        Destination(FileLUN.create(tmp_path / "file.img", size), "file"),  # punched
        Destination(HookLUN(MemoryLUN(size)), "memory"),  # zeros written
    ]
    for dest in dests:
        fill_random(dest.lun, rng)

    def write(writer: int, seq: int, wrng: random.Random) -> None:
        chunk = wrng.randrange(48)
        data = bytes(g) if wrng.random() < 0.4 else wrng.randbytes(wrng.randrange(1, g))
        session.write(chunk * g, data)

    def progress(done: int, total: int) -> None:
        writers.resume()
        finished = writers.total_done
        writers.allow(2)
        writers.wait_done(finished + 1)

    job = CopyJob(session, dests, io_size=4 * g, progress=progress)
    with Writers(write, 2, seed=35) as writers:
        for _ in range(4):
            writers.pause()
            image = source.read(0, size)
            cofw = session.stats.cofw_chunks
            job.full()
            writers.pause()
            for dest in dests:
                assert dest.state is DestState.CONSISTENT
                assert dest.lun.read(0, size) == image, dest.name
            # Allocated on the file destination: the chunks with data at the mark,
            # and at most those written during the copy (sent from the save area).
            allocated_chunks = chunks_of(dests[0].lun.data_extents(0, size), g)
            zero_chunks = set(differing_chunks(image, bytes(size), g)) ^ set(range(49))
            assert len(allocated_chunks & zero_chunks) <= session.stats.cofw_chunks - cofw
            writers.resume()
        writers.settle()
    assert session.stats.cofw_chunks > 0
    for dest in dests:
        dest.lun.close()
    source.close()


class FailingZeroes(FileLUN):
    """A file LUN whose ``write_zeroes`` fails while ``fail`` is set."""

    fail = True

    def write_zeroes(self, offset: int, length: int) -> None:
        if self.fail:
            raise OSError(5, f"injected write_zeroes failure at offset {offset}")
        super().write_zeroes(offset, length)


@pytest.mark.parametrize("marked", [False, True], ids=["unmarked", "marked"])
def test_a_destination_whose_write_zeroes_fails_drops_out_and_gets_the_holes_next(tmp_path, marked):
    rng = random.Random(36)
    with (
        sparse_source(tmp_path / "source.img", rng) as source,
        FileLUN.create(tmp_path / "good.img", source.size) as good_lun,
        FailingZeroes.create(tmp_path / "bad.img", source.size) as bad_lun,
    ):
        size = source.size
        for lun in (good_lun, bad_lun):
            fill_random(lun, rng)
        session = Session(source)
        good, bad = Destination(good_lun, "good"), Destination(bad_lun, "bad")
        result = CopyJob(session, [good, bad], io_size=4 * K64).full(marked)
        assert result.outcomes["good"] == "ok"
        assert "injected write_zeroes failure" in result.outcomes["bad"]
        assert bad.state is DestState.INCONSISTENT
        assert good_lun.read(0, size) == source.read(0, size)
        assert_no_lost_change(session, bad_lun)  # rule 13: what it missed is tracked
        bad_lun.fail = False
        session.mark()
        CopyJob(session, [good, bad]).incremental()
        assert bad_lun.read(0, size) == source.read(0, size)
        assert bad.state is DestState.CONSISTENT


# -- workers: a run is split only when it is large enough ---------------------------------------


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_run_is_split_among_workers_only_when_each_gets_split_min(tmp_path, monkeypatch, sparse):
    import isc.copy

    g = 4096
    monkeypatch.setattr(isc.copy, "SPLIT_MIN", 4 * g)
    size = 64 * g
    with (
        ThinLUN.create(tmp_path / "source.img", size) as source,
        FileLUN.create(tmp_path / "dest.img", size) as target,
    ):
        rng = random.Random(37)
        if sparse:  # data in three ranges
            for first, count in ((4, 3), (20, 2), (40, 3)):
                source.write(first * g, rng.randbytes(count * g))
        else:
            fill_random(source, rng)
        session = Session(source, g)
        dest = Destination(target, "d")
        CopyJob(session, [dest], workers=2).full(marked=False)
        calls = kernel_copies(monkeypatch)
        # A run of 7 chunks is below 2 * SPLIT_MIN: one thread, one call.
        session.write(4 * g, rng.randbytes(7 * g))
        session.mark()
        CopyJob(session, [dest], workers=2).incremental()
        assert calls == [(4 * g, 7 * g)]
        calls.clear()
        CopyJob(session, [dest], workers=2).full(marked=False)
        assert target.read(0, size) == source.read(0, size)
    if sparse:  # 12 data chunks in three ranges, in two groups of 6: the first range is cut
        assert sorted(calls) == [(4 * g, 6 * g), (10 * g, g), (20 * g, 2 * g), (40 * g, 3 * g)]
    else:
        assert sorted(calls) == [(0, 32 * g), (32 * g, 32 * g)]
