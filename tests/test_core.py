"""The compiled delta bitmap against its pure-Python twin, the definition of behaviour.

A hypothesis state machine drives ``isc._core.DeltaBitmap`` and
``isc._reference.DeltaBitmap`` with the same operations (bad input included)
and compares the whole state after every step; example tests pin the edges:
the last (short) chunk, 64-bit word and 4096-chunk summary-block boundaries,
the role swap of a mark, extents and error messages.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import random
import threading
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from isc import _core, _layout, _reference
from isc.errors import IscError, ParameterError, RangeError, StateError

GRANULARITIES = [2048 << i for i in range(6)]
BLOCK = 4096  # chunks per summary block of the core
# Chunk counts at 64-bit word and summary-block boundaries.
BOUNDARY_CHUNKS = [1, 2, 63, 64, 65, 127, 128, 129, 4095, 4096, 4097, 8191, 8192, 8193]
EXTENT_LIMITS = (0, 1, 64)
BITMAPS = ("tracking", "transfer", "saved")


# -- lockstep pair ----------------------------------------------------------------


def assert_same_result(core_value, ref_value):
    if isinstance(ref_value, np.ndarray):
        assert isinstance(core_value, np.ndarray), f"core returned {core_value!r}"
        assert core_value.dtype == np.int64, core_value.dtype
        assert core_value.shape == ref_value.shape, (core_value, ref_value)
        np.testing.assert_array_equal(core_value, ref_value)
    else:
        assert type(core_value) is type(ref_value), (core_value, ref_value)
        assert core_value == ref_value


def describe_difference(core_bytes: bytes, ref_bytes: bytes) -> str:
    """Say which field or chunk differs between two serialized states."""
    core, ref = _layout.unpack(core_bytes), _layout.unpack(ref_bytes)
    for field in core._fields:
        a, b = getattr(core, field), getattr(ref, field)
        if a == b:
            continue
        if not isinstance(a, bytes):
            return f"{field}: core {a!r}, reference {b!r}"
        bits_a, bits_b = (
            np.unpackbits(np.frombuffer(x, np.uint8), bitorder="little") for x in (a, b)
        )
        chunks = np.flatnonzero(bits_a != bits_b)[:10]
        return f"{field} bitmap differs at chunks {chunks.tolist()} (core has {bits_a[chunks]})"
    return "no difference"


class Twins:
    """A core bitmap and a reference bitmap driven in lockstep."""

    def __init__(self, core, ref):
        self.core, self.ref = core, ref
        self.pair = (core, ref)
        self.snapshot = None  # serialized states as of the last agree(), while still current

    @classmethod
    def new(cls, size: int, granularity: int = _layout.DEFAULT_GRANULARITY) -> Twins:
        return cls(_core.DeltaBitmap(size, granularity), _reference.DeltaBitmap(size, granularity))

    def both(self, op):
        """Apply ``op`` to both bitmaps; return ``(error class or None, the core's result)``.

        Both must return equal results or raise the same class, and a call that
        raises must leave its bitmap as it was.
        """
        snapshot = self.snapshot or (self.core.to_bytes(), self.ref.to_bytes())
        outcomes = []
        for bitmap, before in zip((self.core, self.ref), snapshot, strict=True):
            try:
                outcomes.append((None, op(bitmap)))
            except Exception as exc:
                assert bitmap.to_bytes() == before, f"{type(exc).__name__} left a change behind"
                outcomes.append((type(exc), exc))
        (core_error, core_value), (ref_error, ref_value) = outcomes
        assert core_error is ref_error, f"core: {core_value!r}, reference: {ref_value!r}"
        if ref_error is None:
            assert_same_result(core_value, ref_value)
            self.snapshot = None
        return core_error, core_value

    def agree(self):
        """Compare the whole visible state and check both sets of invariants."""
        core, ref = self.core, self.ref
        for name in (
            "size",
            "granularity",
            "chunks",
            "marked",
            "generation",
            "writes",
            "tracking_count",
            "transfer_count",
            "saved_count",
        ):
            assert_same_result(getattr(core, name), getattr(ref, name))
        core_bytes, ref_bytes = core.to_bytes(), ref.to_bytes()
        assert core_bytes == ref_bytes, describe_difference(core_bytes, ref_bytes)
        for limit in EXTENT_LIMITS:
            assert_same_result(core.extents(limit), ref.extents(limit))
        for chunk in {0, ref.chunks - 1}:
            for query in ("tracking", "transfer", "is_saved"):
                assert_same_result(getattr(core, query)(chunk), getattr(ref, query)(chunk))
        for which in BITMAPS:
            assert_same_result(core.chunks_of(which), ref.chunks_of(which))
        assert len(core) == len(ref) == ref.chunks
        assert repr(core) == repr(ref)
        for bitmap in self.pair:
            copy = pickle.loads(pickle.dumps(bitmap))
            assert type(copy) is type(bitmap)
            assert copy == bitmap
        core._check()
        ref._check()
        self.snapshot = (core_bytes, ref_bytes)


# -- strategies ---------------------------------------------------------------------

chunk_counts = st.one_of(
    st.sampled_from(BOUNDARY_CHUNKS),
    st.builds(lambda k, d: 64 * k + d, st.integers(1, 70), st.sampled_from((-1, 0, 1))),
)


def chunk_indices(chunks: int):
    """Chunk indices in [0, chunks], biased to word and block boundaries."""
    near = sorted(
        {
            c + d
            for c in (0, 63, 64, BLOCK - 1, BLOCK, 2 * BLOCK, chunks - 1, chunks)
            for d in (-1, 0, 1)
            if 0 <= c + d <= chunks
        }
    )
    return st.one_of(st.sampled_from(near), st.integers(0, chunks))


def byte_positions(size: int, granularity: int):
    """Byte offsets in [0, size], biased to chunk edges and to the end of the LUN."""
    chunks = -(-size // granularity)
    edges = st.builds(
        lambda c, d: min(max(c * granularity + d, 0), size),
        chunk_indices(chunks),
        st.sampled_from((-1, 0, 1)),
    )
    return st.one_of(edges, st.integers(0, size), st.just(size))


@st.composite
def valid_writes(draw, size: int, granularity: int):
    positions = byte_positions(size, granularity)
    offset = draw(positions)
    if draw(st.booleans()):
        end = draw(positions)
        offset, end = min(offset, end), max(offset, end)
        return offset, end - offset
    length = draw(st.sampled_from((0, 1, granularity - 1, granularity, granularity + 1)))
    return offset, min(length, size - offset)


def bad_writes(size: int, granularity: int):
    """Writes that are not inside [0, size), with values that fit in int64."""
    return st.one_of(
        st.tuples(st.integers(-2 * granularity, -1), st.integers(0, granularity)),
        st.tuples(st.integers(0, size), st.integers(-granularity, -1)),
        st.integers(0, size).map(lambda offset: (offset, size - offset + 1)),
        st.tuples(st.integers(size + 1, size + 2 * granularity), st.integers(0, granularity)),
        st.sampled_from(((2**63 - 1, 1), (1, 2**63 - 1), (2**62, 2**62), (-(2**63), 0))),
    )


def is_valid(size: int, offset: int, length: int) -> bool:
    return offset >= 0 and length >= 0 and offset + length <= size


class InjectedFault(Exception):
    """Raised by a test's save or write callback."""


def reference_write_through(bitmap, write, save, offset, data) -> None:
    """``write_through`` spelled out on the reference: begin, save (a failed one
    unflags its chunks), write, end."""
    length = memoryview(data).nbytes
    cofw = bitmap.begin_write(offset, length)
    try:
        if len(cofw):
            try:
                save(cofw)
            except BaseException:
                bitmap._unflag(cofw)
                raise
        write(offset, data)
    finally:
        bitmap.end_write(offset, length, len(cofw) > 0)


def logging_callbacks(log: list, fault: str | None):
    """A (write, save) pair for write_through that logs its calls and may raise."""

    def write(offset, data):
        log.append(("write", int(offset), memoryview(data).nbytes))
        if fault == "write":
            raise InjectedFault

    def save(chunks):
        log.append(("save", chunks.dtype.str, chunks.tolist()))
        if fault == "save":
            raise InjectedFault

    return write, save


def outcome(call):
    """``(exception class or None, result)`` of ``call()``."""
    try:
        return None, call()
    except Exception as exc:
        return type(exc), exc


def memoryview_of(length: int) -> memoryview:
    return memoryview(bytes(length))


def int32_array_of(length: int) -> np.ndarray:
    return np.zeros(length // 4, np.int32)


# Ways to hold a host write's data; write_through takes any bytes-like object.
BUFFERS = (bytes, bytearray, memoryview_of, int32_array_of)


def bounded(call):
    """Run a call that may wait in another thread: fail instead of hanging if it never returns."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the call is still waiting: a write in flight was left behind"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# -- the state machine ----------------------------------------------------------------


class LockstepMachine(RuleBasedStateMachine):
    """Random operation sequences on a core bitmap and a reference bitmap together."""

    granularity = _layout.DEFAULT_GRANULARITY

    @initialize(chunks=chunk_counts, data=st.data())
    def create(self, chunks, data):
        granularity = self.granularity
        last = data.draw(st.one_of(st.just(granularity), st.integers(1, granularity)), "last")
        self.size = (chunks - 1) * granularity + last
        self.twins = Twins.new(self.size, granularity)
        # (offset, length, cofw) of each begin_write not ended yet
        self.in_flight: list[tuple[int, int, bool]] = []
        # Built once per bitmap: strategies are costly to construct at every step.
        self.valid_writes = valid_writes(self.size, granularity)
        self.bad_writes = bad_writes(self.size, granularity)
        self.chunk_ends = chunk_indices(chunks)
        self.chunks_and_outside = st.one_of(
            chunk_indices(chunks - 1), st.sampled_from((-1, chunks, 2**63 - 1))
        )
        self.bad_ranges = st.sampled_from(
            ((-1, 1), (0, -1), (0, chunks + 1), (chunks, 1), (1, chunks))
        )
        # The open snapshot: its header, the state it froze, the records taken from each twin.
        self.open: tuple[tuple, bytes, list[list[bytes]]] | None = None
        # Maps rebuilt from committed snapshots, each from the other twin's records.
        self.replicas: list = [None, None]

    @invariant()
    def agree(self):
        if hasattr(self, "twins"):
            self.twins.agree()

    # -- drawing arguments

    def draw_write(self, data) -> tuple[int, int]:
        kind = data.draw(st.sampled_from(("valid", "valid", "rewrite", "rewrite", "bad")), "kind")
        if kind == "bad":
            return data.draw(self.bad_writes, "bad write")
        runs = self.twins.ref.extents() if kind == "rewrite" else ()
        if len(runs):
            # Overwrite chunks that still wait for the copy: these need COFW.
            first, count = runs[data.draw(st.integers(0, len(runs) - 1), "run")]
            chunk = data.draw(st.integers(int(first), int(first + count - 1)), "chunk")
            offset = chunk * self.granularity + data.draw(st.integers(0, 100), "into chunk")
            offset = min(offset, self.size - 1)
            length = data.draw(st.integers(1, 3 * self.granularity), "length")
            return offset, min(length, self.size - offset)
        return data.draw(self.valid_writes, "write")

    def draw_chunk_range(self, data) -> tuple[int, int]:
        if data.draw(st.integers(0, 4), "bad range") == 0:
            return data.draw(self.bad_ranges, "bad range")
        first, end = sorted(
            (data.draw(self.chunk_ends, "first"), data.draw(self.chunk_ends, "end"))
        )
        return first, end - first

    def span(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.granularity, (offset + max(length, 1) - 1) // self.granularity

    def saving_spans(self) -> list[tuple[int, int]]:
        return [self.span(o, n) for o, n, cofw in self.in_flight if cofw]

    # -- host writes

    @rule(data=st.data())
    def record_write(self, data):
        offset, length = self.draw_write(data)
        if is_valid(self.size, offset, length) and data.draw(st.booleans(), "numpy ints"):
            offset, length = np.int64(offset), np.int64(length)
        self.twins.both(lambda b: b.record_write(offset, length))

    @rule(data=st.data())
    def record_writes(self, data):
        batch = [self.draw_write(data) for _ in range(data.draw(st.integers(0, 6), "batch"))]
        offsets, lengths = [o for o, _ in batch], [n for _, n in batch]
        if data.draw(st.booleans(), "as arrays"):
            offsets, lengths = np.array(offsets, np.int64), np.array(lengths, np.int64)
        self.twins.both(lambda b: b.record_writes(offsets, lengths))

    # Few writes in flight at once, so that marks get their turn.
    @precondition(lambda self: len(self.in_flight) < 3)
    @rule(data=st.data())
    def begin_write(self, data):
        offset, length = self.draw_write(data)
        if is_valid(self.size, offset, length):
            lo, hi = self.span(offset, length)
            # It would wait for an end_write this single thread never issues.
            if any(lo <= b and a <= hi for a, b in self.saving_spans()):
                return
        error, cofw = self.twins.both(lambda b: bounded(lambda: b.begin_write(offset, length)))
        if error is None:
            self.in_flight.append((offset, length, len(cofw) > 0))

    @rule(data=st.data())
    def write_through(self, data):
        offset, length = self.draw_write(data)
        length = min(max(length, 0), self.size + 1)
        buffer = data.draw(st.sampled_from(BUFFERS), "buffer")(length)
        if is_valid(self.size, offset, memoryview(buffer).nbytes):
            lo, hi = self.span(offset, memoryview(buffer).nbytes)
            if any(lo <= b and a <= hi for a, b in self.saving_spans()):
                return
        fault = data.draw(st.sampled_from((None, None, "save", "write")), "fault")
        core_log, ref_log = [], []
        core_write, core_save = logging_callbacks(core_log, fault)
        ref_write, ref_save = logging_callbacks(ref_log, fault)
        core = self.twins.core
        core_error, core_value = outcome(
            lambda: bounded(lambda: core.write_through(core_write, core_save, offset, buffer))
        )
        ref_error, ref_value = outcome(
            lambda: reference_write_through(self.twins.ref, ref_write, ref_save, offset, buffer)
        )
        assert core_error is ref_error, f"core: {core_value!r}, reference: {ref_value!r}"
        assert core_log == ref_log
        self.twins.snapshot = None

    @rule(data=st.data())
    def end_write(self, data):
        if self.in_flight and data.draw(st.integers(0, 4), "unmatched") > 0:
            index = data.draw(st.integers(0, len(self.in_flight) - 1), "which write")
            offset, length, cofw = self.in_flight.pop(index)
            error, _ = self.twins.both(lambda b: b.end_write(offset, length, cofw))
            assert error is None
            return
        # An end_write no begin_write matches: with writes in flight, only a
        # cofw=True one naming a span that is not being saved is unmatched.
        offset, length = self.draw_write(data)
        cofw = bool(self.in_flight) or data.draw(st.booleans(), "cofw")
        if cofw and self.span(offset, length) in self.saving_spans():
            return
        error, _ = self.twins.both(lambda b: b.end_write(offset, length, cofw))
        assert error is StateError

    # -- states

    # mark waits for writes in flight; this single thread would never end them.
    @precondition(lambda self: not self.in_flight)
    @rule(full=st.sampled_from((False, False, False, True)))
    def mark(self, full):
        self.twins.both(lambda b: bounded(lambda: b.mark(full=full)))

    @rule(which=st.sampled_from(("unmark", "unmark", "unmark", "clear_tracking")))
    def unmark_or_clear_tracking(self, which):
        # clear_tracking, like mark, waits for writes in flight.
        if which == "clear_tracking" and self.in_flight:
            return
        self.twins.both(lambda b: bounded(getattr(b, which)))

    # -- the copy side

    @rule(data=st.data())
    def send(self, data):
        if data.draw(st.booleans(), "one chunk"):
            chunk = data.draw(self.chunks_and_outside, "chunk")
            self.twins.both(lambda b: b.test_and_clear(chunk))
            return
        first, count = self.draw_chunk_range(data)
        current = self.twins.ref.generation
        generation = data.draw(st.sampled_from((None, -1, current, current, current - 1)))
        if generation is None:
            self.twins.both(lambda b: b.clear_transfer(first, count))
        else:
            self.twins.both(lambda b: b.clear_transfer(first, count, generation))

    @rule(data=st.data())
    def inspect(self, data):
        query = data.draw(
            st.sampled_from(
                ("extents", "saved_in", "tracking", "transfer", "is_saved", "chunks_of")
            ),
            "query",
        )
        if query == "chunks_of":
            which = data.draw(st.sampled_from((*BITMAPS, "Tracking", "all", 0, None)), "which")
            self.twins.both(lambda b: b.chunks_of(which))
        elif query == "extents":
            limit = data.draw(st.one_of(st.integers(-2, 70), st.sampled_from((4095, 4096))))
            self.twins.both(lambda b: b.extents(limit))
        elif query == "saved_in":
            first, count = self.draw_chunk_range(data)
            self.twins.both(lambda b: b.saved_in(first, count))
        else:
            chunk = data.draw(self.chunks_and_outside, "chunk")
            self.twins.both(lambda b: getattr(b, query)(chunk))

    # -- snapshots (checkpoints): whatever runs meanwhile, the records hold the frozen state

    @precondition(lambda self: self.open is None)
    @rule(everything=st.sampled_from((False, False, True)))
    def snapshot(self, everything):
        error, header = self.twins.both(lambda b: b.snapshot(everything))
        assert error is None
        self.open = (header, self.twins.ref.to_bytes(), [[], []])
        self.twins.both(lambda b: b.snapshot_records(bytearray(_layout.MAX_RECORD - 1)))

    @precondition(lambda self: self.open is not None)
    @rule(size=st.sampled_from((_layout.MAX_RECORD, _layout.MAX_RECORD + 100, 3 << 12)))
    def take_records(self, size):
        for bitmap, taken in zip(self.twins.pair, self.open[2], strict=True):
            out = bytearray(size)
            taken.append(bytes(out[: bitmap.snapshot_records(out)]))

    @precondition(lambda self: self.open is not None)
    @rule(commit=st.sampled_from((True, True, False)))
    def end_snapshot(self, commit):
        (base, t, marked, generation), frozen, taken = self.open
        self.open = None
        if not commit:
            self.twins.both(lambda b: b.snapshot_end(False))
            return
        for bitmap, records in zip(self.twins.pair, taken, strict=True):
            out = bytearray(1 << 16)
            while n := bitmap.snapshot_records(out):
                records.append(bytes(out[:n]))
        # Each twin's records rebuild the frozen state in a map of the other kind.
        for i, (records, kind) in enumerate(zip(taken, (_reference, _core), strict=True)):
            if base:
                self.replicas[i] = kind.DeltaBitmap(self.size, self.granularity)
            data = b"".join(records)
            assert self.replicas[i].apply_records(data) == len(data)
            self.replicas[i].load_state(t, marked, generation)
            assert self.replicas[i].to_bytes() == frozen, describe_difference(
                self.replicas[i].to_bytes(), frozen
            )
        self.twins.both(lambda b: b.snapshot_end(True))

    # The serialized state holds no writes in flight, so reload only between writes.
    @precondition(lambda self: not self.in_flight and self.open is None)
    @rule(kind=st.sampled_from((bytes, bytearray, memoryview)))
    def cross_load(self, kind):
        core_bytes, ref_bytes = self.twins.core.to_bytes(), self.twins.ref.to_bytes()
        self.twins = Twins(
            _core.DeltaBitmap.from_bytes(kind(ref_bytes)),
            _reference.DeltaBitmap.from_bytes(kind(core_bytes)),
        )


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_core_matches_reference(granularity):
    machine = type(f"Lockstep{granularity}", (LockstepMachine,), {"granularity": granularity})
    # 40% of the profile's examples (40 by default): six granularities share the time.
    budget = settings(max_examples=settings.default.max_examples * 2 // 5, stateful_step_count=50)
    run_state_machine_as_test(machine, settings=budget)


# -- geometry -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "granularity"),
    [
        (0, 4096),
        (-1, 4096),
        (4096, 1024),
        (4096, 3072),
        (4096, 131072),
        (4096, 0),
        (4096, -2048),
        (True, 4096),
        (4096, True),
        (4096, 4096.0),
        (4096.0, 4096),
        ("4096", 4096),
        (None, 4096),
    ],
)
def test_bad_geometry_raises_like_reference(size, granularity):
    with pytest.raises((TypeError, ValueError)) as ref_error:
        _reference.DeltaBitmap(size, granularity)
    with pytest.raises(ref_error.type) as core_error:
        _core.DeltaBitmap(size, granularity)
    if ref_error.type is ParameterError:
        assert str(granularity if size > 0 else size) in str(core_error.value)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("chunks", [1, 63, 64, 65, 4097])
@pytest.mark.parametrize("last", ["one byte", "full"])
def test_geometry_matches_reference(granularity, chunks, last):
    size = (chunks - 1) * granularity + (1 if last == "one byte" else granularity)
    twins = Twins.new(np.int64(size), np.int64(granularity))
    assert twins.core.chunks == chunks
    twins.agree()


def test_default_granularity_is_64k():
    assert _core.DeltaBitmap(1 << 20).granularity == _reference.DeltaBitmap(1 << 20).granularity


# -- the end of the LUN ---------------------------------------------------------------


@pytest.mark.parametrize("granularity", [2048, 65536])
@pytest.mark.parametrize("chunks", [1, 64, 65, 4097])
@pytest.mark.parametrize("last", [1, 2047, 2048])
def test_write_ending_exactly_at_size(granularity, chunks, last):
    size = (chunks - 1) * granularity + last
    twins = Twins.new(size, granularity)
    for length in sorted({1, last, min(last + 1, size), size}):
        twins.both(lambda b, n=length: b.record_write(size - n, n))
        twins.agree()
    assert twins.core.tracking(chunks - 1)
    twins.both(lambda b: b.mark())
    twins.both(lambda b: b.record_write(size - 1, 1))
    twins.both(lambda b: b.record_write(size, 1))
    twins.agree()
    assert twins.core.is_saved(chunks - 1)


@pytest.mark.parametrize("chunks_and_last", [(1, 2048), (64, 2048), (65, 1), (4096, 2048)])
def test_zero_length_write_at_size_touches_nothing(chunks_and_last):
    chunks, last = chunks_and_last
    size = (chunks - 1) * 2048 + last
    twins = Twins.new(size, 2048)
    twins.both(lambda b: b.record_write(size, 0))
    twins.both(lambda b: b.record_writes([size, 0], [0, 0]))
    twins.agree()
    assert twins.core.tracking_count == 0
    twins.both(lambda b: b.begin_write(size, 0))
    twins.both(lambda b: b.end_write(size, 0, False))
    twins.agree()
    assert twins.core.tracking_count == 0
    error, _ = twins.both(lambda b: b.record_write(size + 1, 0))
    assert error is RangeError


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_last_short_chunk(granularity):
    size = 64 * granularity + granularity // 2
    twins = Twins.new(size, granularity)
    assert twins.core.chunks == 65
    twins.both(lambda b: b.record_write(size - granularity // 2, granularity // 2))
    error, _ = twins.both(lambda b: b.record_write(size - granularity // 2, granularity // 2 + 1))
    assert error is RangeError
    twins.agree()
    assert twins.core.tracking(64)
    assert not twins.core.tracking(63)


# Write ranges (first chunk, last chunk) across word and summary-block edges.
BOUNDARY_SPANS = [
    (62, 63),
    (63, 64),
    (63, 128),
    (127, 129),
    (BLOCK - 1, BLOCK),
    (BLOCK - 64, BLOCK + 64),
    (BLOCK - 1, 2 * BLOCK),
    (0, 3 * BLOCK + 5),
    (2 * BLOCK - 1, 2 * BLOCK),
]


@pytest.mark.parametrize(("first", "last"), BOUNDARY_SPANS)
@pytest.mark.parametrize("granularity", [2048, 8192])
def test_writes_spanning_word_and_block_boundaries(first, last, granularity):
    size = (3 * BLOCK + 7) * granularity - 5
    twins = Twins.new(size, granularity)
    # Start and end mid-chunk: the touched chunks are first..last inclusive.
    offset, end = first * granularity + 7, last * granularity + 1
    twins.both(lambda b: b.record_write(offset, end - offset))
    twins.agree()
    assert twins.core.tracking_count == last - first + 1
    twins.both(lambda b: b.mark())
    twins.agree()
    assert_same_result(twins.core.extents(), np.array([[first, last - first + 1]]))
    # A rewrite straddling the run's end saves only its chunks with transfer bits.
    twins.both(lambda b: b.record_write(last * granularity, 2 * granularity))
    twins.both(lambda b: b.record_write(first * granularity, (last - first + 1) * granularity))
    twins.agree()
    twins.both(lambda b: b.unmark())
    twins.agree()


# -- mark ----------------------------------------------------------------------------


def bits(bitmap, field: str) -> np.ndarray:
    """One flag per chunk of ``field`` (tracking, transfer or saved), from the serialized state."""
    raw = getattr(_layout.unpack(bitmap.to_bytes()), field)
    flags = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
    return flags[: bitmap.chunks].astype(bool)


@pytest.mark.parametrize("chunks", [65, 4097, 8193])
def test_mark_swaps_tracking_into_transfer(chunks):
    bitmap = _core.DeltaBitmap(chunks * 2048, 2048)
    rng = np.random.default_rng(chunks)
    bitmap.record_writes(rng.integers(0, chunks, 300) * 2048, rng.integers(0, 2049, 300))
    tracked = bits(bitmap, "tracking")
    assert not bits(bitmap, "transfer").any()
    bitmap.mark()
    np.testing.assert_array_equal(bits(bitmap, "transfer"), tracked)
    assert not bits(bitmap, "tracking").any()
    assert (bitmap.marked, bitmap.generation) == (True, 1)
    assert bitmap.transfer_count == tracked.sum()
    assert bitmap.tracking_count == 0
    bitmap._check()


@pytest.mark.parametrize("chunks", [1, 63, 64, 65, 4095, 4096, 4097, 8193])
@pytest.mark.parametrize("last", [1, 2048])
def test_full_mark_sets_every_transfer_bit(chunks, last):
    size = (chunks - 1) * 2048 + last
    twins = Twins.new(size, 2048)
    twins.both(lambda b: b.record_write(0, min(size, 3 * 2048)))
    twins.both(lambda b: b.mark(full=True))
    twins.agree()
    assert twins.core.transfer_count == chunks
    assert twins.core.tracking_count == 0
    assert_same_result(twins.core.extents(), np.array([[0, chunks]]))
    twins.both(lambda b: b.record_write(size - 1, 1))
    twins.both(lambda b: b.unmark())
    twins.agree()
    assert twins.core.tracking_count == chunks


def test_mark_twice_is_a_state_error_and_changes_nothing():
    twins = Twins.new(1 << 20, 4096)
    twins.both(lambda b: b.record_write(0, 5000))
    twins.both(lambda b: b.mark())
    twins.agree()
    for full in (False, True):
        error, exc = twins.both(lambda b, f=full: b.mark(full=f))
        assert error is StateError
        assert "already marked" in str(exc)
        assert "generation 1" in str(exc)
    twins.agree()


def test_unmark_when_unmarked_is_a_no_op():
    twins = Twins.new(1 << 20, 4096)
    twins.both(lambda b: b.record_write(4096, 4096))
    before = twins.core.to_bytes()
    twins.both(lambda b: b.unmark())
    assert twins.core.to_bytes() == before
    twins.agree()


@pytest.mark.parametrize("full", ["tracking", "transfer", "both"])
def test_unmark_with_a_full_bitmap_keeps_the_union(full):
    """A full bitmap is the union already: no merge, and a full tracking bitmap keeps its role."""
    chunks = 3 * 4096 + 5
    twins = Twins.new(chunks * 2048, 2048)
    twins.both(lambda b: b.record_write(7 * 2048, 2048))
    twins.both(lambda b: b.mark(full=full != "tracking"))
    twins.both(lambda b: b.record_write(0, chunks * 2048 if full != "transfer" else 2048))
    twins.both(lambda b: b.clear_transfer(1, 1))  # sent: back in tracking only if written
    twins.both(lambda b: b.unmark())
    twins.both(lambda b: (b.snapshot(), b.snapshot_end(False))[0])  # the same roles
    twins.agree()
    assert twins.core.tracking_count == (chunks - 1 if full == "transfer" else chunks)


@pytest.mark.parametrize("sent", [[], [0], [64 * 64 + 5], [BLOCK - 1, BLOCK], [3 * BLOCK + 64]])
@pytest.mark.parametrize("written_again", [False, True])
def test_unmark_merges_around_full_transfer_words(sent, written_again):
    """Unmark skips full transfer words 64 at a time (they hold the union already);
    the words of a sent chunk, and every word after it in its span, still merge."""
    chunks = 3 * BLOCK + 65
    twins = Twins.new(chunks * 2048, 2048)
    twins.both(lambda b: b.mark(full=True))
    for chunk in sent:
        twins.both(lambda b, c=chunk: b.clear_transfer(c, 1))
    kept = {1} if written_again else {1, *sent}  # never written after the mark
    for first, end in zip([-1, *sorted(kept)], [*sorted(kept), chunks], strict=True):
        if end > first + 1:
            twins.both(lambda b, f=first, e=end: b.record_write((f + 1) * 2048, (e - f - 1) * 2048))
    twins.both(lambda b: b.unmark())
    twins.agree()
    expected = chunks if written_again else chunks - len(sent)
    assert twins.core.tracking_count == expected


@pytest.mark.parametrize("clear", ["unmark", "clear_tracking"])
def test_emptying_long_runs_of_full_pages_reads_as_zero_and_takes_writes(clear):
    """Runs of whole pages the core empties go back to the kernel (``_clear``): around a
    block left empty, around a short last page, and written again after."""
    page = 512 * 64  # chunks per 4 KiB page of words
    chunks = 160 * page + 37  # runs of 80 and 79 pages, past ZERO_BY_MADVISE
    hole = range(80 * page + 64 * 8, 80 * page + 64 * 9)  # one block of page 80
    bitmap = _core.DeltaBitmap(chunks * 2048, 2048)
    bitmap.mark(full=True)
    everywhere = np.arange(0, chunks, 64, dtype=np.int64)
    kept = everywhere[(everywhere < hole.start) | (everywhere >= hole.stop)]
    lengths = np.minimum(64, chunks - kept) * 2048
    saved = bitmap.record_writes(kept * 2048, lengths)
    assert saved.size == chunks - len(hole)
    getattr(bitmap, clear)()
    if clear == "unmark":  # what was not sent comes back to tracking
        assert (bitmap.tracking_count, bitmap.transfer_count, bitmap.saved_count) == (chunks, 0, 0)
        assert bitmap.tracking(hole.start) and bitmap.tracking(chunks - 1)
    else:
        assert (bitmap.tracking_count, bitmap.transfer_count) == (0, chunks)
        assert bitmap.saved_count == chunks - len(hole)
    bitmap._check()
    bitmap.unmark()
    bitmap.mark()  # the emptied array is tracking again: it reads zero and takes writes
    bitmap.record_writes([0, 150 * page * 2048], [2048, 2048])
    assert bitmap.tracking_count == 2 and bitmap.tracking(150 * page)
    bitmap._check()


# -- extents -----------------------------------------------------------------------


EXTENT_SPLITS = [0, 1, 2, 63, 64, 65, BLOCK - 1, BLOCK, BLOCK + 1, 2**62]


@pytest.mark.parametrize("max_chunks", EXTENT_SPLITS)
def test_extents_split_runs_across_words_and_blocks(max_chunks):
    chunks = 3 * BLOCK + 100
    twins = Twins.new(chunks * 2048, 2048)
    runs = [(0, 1), (2, 62), (63, 2), (200, 1), (BLOCK - 70, 140), (BLOCK + 71, 2 * BLOCK)]
    runs.append((chunks - 3, 3))
    for first, count in runs:
        twins.both(lambda b, f=first, n=count: b.record_write(f * 2048, n * 2048))
    twins.both(lambda b: b.mark())
    twins.agree()
    _, extents = twins.both(lambda b: b.extents(max_chunks))
    # Whatever the split, the runs are ascending, within the limit and cover the transfer bits.
    firsts, counts = extents[:, 0], extents[:, 1]
    assert (np.diff(firsts) > 0).all()
    assert (counts > 0).all()
    if max_chunks:
        assert (counts <= max_chunks).all()
    covered = np.zeros(chunks, bool)
    for first, count in extents:
        assert not covered[first : first + count].any()
        covered[first : first + count] = True
    np.testing.assert_array_equal(covered, bits(twins.core, "transfer"))


def test_extents_of_an_empty_transfer_bitmap_is_an_empty_table():
    twins = Twins.new(1 << 20, 2048)
    twins.both(lambda b: b.record_write(0, 1 << 20))
    _, unmarked = twins.both(lambda b: b.extents())
    twins.both(lambda b: b.mark())
    twins.both(lambda b: b.clear_transfer(0, b.chunks))
    _, all_sent = twins.both(lambda b: b.extents())
    twins.agree()
    assert unmarked.shape == all_sent.shape == (0, 2)


def test_extents_after_clearing_a_whole_block():
    # Clearing every bit of a block leaves the core's summary stale; extents must cope.
    twins = Twins.new(3 * BLOCK * 2048, 2048)
    twins.both(lambda b: b.record_writes([0, BLOCK * 2048, 2 * BLOCK * 2048], [2048] * 3))
    twins.both(lambda b: b.mark())
    twins.both(lambda b: b.test_and_clear(BLOCK))
    for _ in range(2):
        twins.agree()
    twins.both(lambda b: b.record_write(BLOCK * 2048 + 5, 1))
    twins.both(lambda b: b.unmark())
    twins.both(lambda b: b.mark())
    twins.agree()


# -- error messages -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "shown"),
    [
        (lambda b: b.record_write(-5, 1), "-5"),
        (lambda b: b.record_write(0, -7), "-7"),
        (lambda b: b.record_write(1 << 20, 1), str((1 << 20) + 1)),
        (lambda b: b.record_write(12345, 1 << 20), str(12345 + (1 << 20))),
        (lambda b: b.begin_write(-9, 1), "-9"),
        (lambda b: b.record_writes([0, 1 << 21], [1, 0]), str(1 << 21)),
        (lambda b: b.tracking(256), "256"),
        (lambda b: b.transfer(-1), "-1"),
        (lambda b: b.is_saved(1000), "1000"),
        (lambda b: b.test_and_clear(257), "257"),
        (lambda b: b.clear_transfer(250, 7), "257"),
        (lambda b: b.clear_transfer(-3, 1), "-3"),
        (lambda b: b.clear_transfer(0, 1, 7), "generation 7"),
        (lambda b: b.saved_in(256, 2), "258"),
        (lambda b: b.extents(-4), "-4"),
        (lambda b: b.end_write(8192, 100, False), "8192"),
    ],
)
def test_error_messages_name_the_offending_value(call, shown):
    bitmap = _core.DeltaBitmap(1 << 20, 4096)
    before = bitmap.to_bytes()
    with pytest.raises(IscError) as error:
        call(bitmap)
    assert shown in str(error.value)
    assert bitmap.to_bytes() == before


def test_error_message_names_the_lun_size():
    with pytest.raises(RangeError, match=str(1 << 20)):
        _core.DeltaBitmap(1 << 20, 4096).record_write(1 << 20, 1)


# Values past int64 are still just out of range, whatever the integer type.
HUGE_CALLS = [
    ("record_write", (2**63, 1)),
    ("record_write", (0, 2**64)),
    ("record_write", (np.uint64(2**63), 0)),
    ("begin_write", (2**64, 0)),
    ("test_and_clear", (2**63,)),
    ("tracking", (2**64,)),
    ("transfer", (-(2**63) - 1,)),
    ("is_saved", (2**70,)),
    ("clear_transfer", (0, 2**64)),
    ("clear_transfer", (2**63, 0)),
    ("extents", (-(2**64),)),
    ("record_writes", ([2**63], [0])),
    ("record_writes", (np.array([2**63], np.uint64), np.array([0], np.uint64))),
]


@pytest.mark.parametrize(("method", "args"), HUGE_CALLS, ids=[m for m, _ in HUGE_CALLS])
def test_integers_past_int64_raise_like_reference(method, args):
    twins = Twins.new(1 << 20, 4096)
    error, _ = twins.both(lambda b: getattr(b, method)(*args))
    assert issubclass(error, ValueError)


@pytest.mark.parametrize(
    ("offsets", "lengths"),
    [
        (np.array([0, 2**63], np.uint64), np.array([1, 0], np.uint64)),
        (np.array([0], np.uint64), np.array([2**64 - 1], np.uint64)),
        (np.array([-5], np.int64), np.array([1], np.int64)),
    ],
)
def test_record_writes_error_names_the_write_as_given(offsets, lengths):
    errors = []
    for cls in (_core.DeltaBitmap, _reference.DeltaBitmap):
        with pytest.raises(RangeError) as error:
            cls(1 << 20, 4096).record_writes(offsets, lengths)
        errors.append(str(error.value))
    core_message, ref_message = errors
    assert core_message == ref_message


NON_INTEGER_CALLS = [
    ("record_write", (1.5, 1)),
    ("record_write", (0, 4096.0)),
    ("begin_write", ("0", 1)),
    ("end_write", (None, 1, False)),
    ("test_and_clear", (1.0,)),
    ("tracking", ("1",)),
    ("clear_transfer", (0, 2.0)),
    ("saved_in", (0.0, 1)),
    ("extents", (1.5,)),
]


@pytest.mark.parametrize(
    ("method", "args"), NON_INTEGER_CALLS, ids=[m for m, _ in NON_INTEGER_CALLS]
)
def test_non_integers_raise_type_error_like_reference(method, args):
    twins = Twins.new(1 << 20, 4096)
    error, _ = twins.both(lambda b: getattr(b, method)(*args))
    assert error is TypeError


# -- record_writes ---------------------------------------------------------------


def test_record_writes_accepts_lists_and_integer_arrays():
    offsets, lengths = [0, 70000, 4095 * 2048], [1, 2048 * 3, 2048]
    reference = _reference.DeltaBitmap(8193 * 2048, 2048)
    reference.record_writes(offsets, lengths)
    expected = reference.to_bytes()
    as_given = [
        (offsets, lengths),
        (tuple(offsets), tuple(lengths)),
        (np.array(offsets, np.int64), np.array(lengths, np.int64)),
        (np.array(offsets, np.uint64), np.array(lengths, np.uint32)),
        (np.array(offsets, np.int32), np.array(lengths, np.int16)),
        (np.array(offsets * 2, np.int64)[::2], np.array(lengths * 2, np.int64)[::2]),
        (np.array(offsets, ">i8"), np.array(lengths, ">i8")),
    ]
    for given_offsets, given_lengths in as_given:
        bitmap = _core.DeltaBitmap(8193 * 2048, 2048)
        result = bitmap.record_writes(given_offsets, given_lengths)
        assert result.dtype == np.int64
        assert result.shape == (0,)
        assert bitmap.to_bytes() == expected


@pytest.mark.parametrize(
    ("offsets", "lengths", "error"),
    [
        ([0, 1], [1], ValueError),
        (np.zeros(3, np.int64), np.zeros(2, np.int64), ValueError),
        (np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64), ValueError),
        (np.zeros((2, 1), np.int64), np.zeros(2, np.int64), ValueError),
        (np.int64(0), np.int64(1), ValueError),
        ([0.0, 1.5], [1, 1], TypeError),
        ([0, 1], [1.0, 2.0], TypeError),
        (np.zeros(2, bool), np.ones(2, bool), TypeError),
        (["0"], ["1"], TypeError),
        ([0, None], [1, 1], TypeError),
    ],
)
def test_record_writes_rejects_bad_arrays(offsets, lengths, error):
    twins = Twins.new(1 << 20, 2048)
    raised, _ = twins.both(lambda b: b.record_writes(offsets, lengths))
    assert raised is not None
    assert issubclass(raised, error)


@settings(max_examples=60)
@given(data=st.data(), marked=st.booleans(), as_arrays=st.booleans())
def test_record_writes_with_one_bad_entry_changes_nothing(data, marked, as_arrays):
    size, granularity = 200 * 2048 + 5, 2048
    twins = Twins.new(size, granularity)
    twins.both(lambda b: b.record_write(0, size))
    if marked:
        twins.both(lambda b: b.mark())
    twins.agree()
    batch = data.draw(st.lists(valid_writes(size, granularity), max_size=8), "good writes")
    index = data.draw(st.integers(0, len(batch)), "where")
    batch.insert(index, data.draw(bad_writes(size, granularity), "bad write"))
    offsets, lengths = [o for o, _ in batch], [n for _, n in batch]
    if as_arrays:
        offsets, lengths = np.array(offsets, np.int64), np.array(lengths, np.int64)
    before = twins.core.to_bytes()
    error, _ = twins.both(lambda b: b.record_writes(offsets, lengths))
    assert error is RangeError
    assert twins.core.to_bytes() == before
    twins.agree()


@settings(max_examples=60)
@given(
    chunks=st.sampled_from((1, 64, 65, 4097)),
    data=st.data(),
    mark=st.sampled_from(("unmarked", "marked", "full")),
)
def test_record_writes_equals_record_write_in_order(chunks, data, mark):
    size = chunks * 2048
    batch = data.draw(st.lists(valid_writes(size, 2048), max_size=20), "batch")
    one_by_one, batched = _core.DeltaBitmap(size, 2048), _core.DeltaBitmap(size, 2048)
    for bitmap in (one_by_one, batched):
        bitmap.record_writes([o for o, _ in batch[::2]], [n for _, n in batch[::2]])
        if mark != "unmarked":
            bitmap.mark(full=mark == "full")
    singles = [one_by_one.record_write(o, n) for o, n in batch]
    together = batched.record_writes([o for o, _ in batch], [n for _, n in batch])
    np.testing.assert_array_equal(together, np.concatenate([np.empty(0, np.int64), *singles]))
    assert batched.to_bytes() == one_by_one.to_bytes()
    # COFW chunks are saved once per mark, so the batch names each chunk once.
    assert len(np.unique(together)) == len(together)


def test_cofw_arrays_are_int64_and_ascending():
    bitmap = _core.DeltaBitmap(300 * 2048, 2048)
    bitmap.mark(full=True)
    for result in (
        bitmap.record_write(70 * 2048 + 1, 100 * 2048),
        bitmap.begin_write(0, 71 * 2048),
        bitmap.record_writes([200 * 2048], [90 * 2048]),
    ):
        assert result.dtype == np.int64
        assert result.ndim == 1
        assert len(result)
        assert (np.diff(result) > 0).all()
    bitmap.end_write(0, 71 * 2048, True)


# -- write_through -------------------------------------------------------------------


@pytest.mark.parametrize("fault", [None, "save", "write"])
def test_write_through_ends_the_write_even_when_a_callback_fails(fault):
    twins = Twins.new(64 * 2048, 2048)
    twins.both(lambda b: b.record_write(0, 4 * 2048))
    twins.both(lambda b: b.mark())
    logs = {}
    for name, bitmap, write_through in (
        ("core", twins.core, twins.core.write_through),
        ("ref", twins.ref, lambda *args: reference_write_through(twins.ref, *args)),
    ):
        logs[name] = []
        write, save = logging_callbacks(logs[name], fault)
        error, _ = outcome(lambda w=write, s=save, f=write_through: f(w, s, 2048 + 5, bytes(4096)))
        assert error is (InjectedFault if fault else None)
        # The write is no longer in flight: a mark (after unmark) does not wait.
        bitmap.unmark()
        bounded(bitmap.mark)
    assert logs["core"] == logs["ref"]
    assert logs["core"][0][0] == "save"
    twins.agree()


@pytest.mark.parametrize("data", [None, 12, "text", [0, 1]])
def test_write_through_of_a_non_buffer_is_a_type_error_and_calls_nothing(data):
    bitmap = _core.DeltaBitmap(64 * 2048, 2048)
    log = []
    write, save = logging_callbacks(log, None)
    with pytest.raises(TypeError):
        bitmap.write_through(write, save, 0, data)
    assert log == []
    assert bitmap.writes == 0
    bounded(bitmap.mark)


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (64 * 2048, 1), (64 * 2048 - 1, 2)])
def test_write_through_out_of_range_raises_before_any_callback(offset, length):
    bitmap = _core.DeltaBitmap(64 * 2048, 2048)
    log = []
    write, save = logging_callbacks(log, None)
    with pytest.raises(RangeError, match=str(offset)):
        bitmap.write_through(write, save, offset, bytes(length))
    assert log == []
    assert bitmap.tracking_count == 0
    bounded(bitmap.mark)


# -- the save area's slots and the file COFW save ----------------------------------------

SLOTS = (_core.Slots, _reference.Slots)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["take", "take", "take", "free", "reset", "reset_high_water"]),
            st.sampled_from([1, 1024, 4096, 4096, 4096]),
            st.integers(0, 1 << 16),
        ),
        max_size=60,
    )
)
def test_slots_match_the_reference(ops):
    """Same slots, offsets, used and high water from the core and the twin (capacity 16 KiB)."""
    pair = [kind(16384) for kind in SLOTS]
    held: list[list] = [[], []]
    for op, length, pick in ops:
        results = []
        for slots, entries in zip(pair, held, strict=True):
            entry = None
            if op == "take":
                entry = slots.take(length)
                if entry is not None:
                    entries.append(entry)
            elif op == "free" and entries:
                slots.free(entries.pop(pick % len(entries)))
            elif op == "reset":
                slots.reset()
                entries.clear()
            elif op == "reset_high_water":
                slots.reset_high_water()
            results.append((entry, slots.used, slots.high_water))
        assert results[0] == results[1], op
        assert pair[0].used == sum(entry[2] for entry in held[0]) <= 16384


@pytest.mark.parametrize("kind", SLOTS)
def test_slots_reuse_the_last_freed_slot_of_the_size_then_the_smallest_larger(kind):
    slots = kind(16384)
    a, b, c = (slots.take(4096) for _ in range(3))
    small = slots.take(1024)
    assert (a, b, c, small) == (
        (0, 4096, 4096),
        (4096, 4096, 4096),
        (8192, 4096, 4096),
        (12288, 1024, 1024),
    )
    slots.free(a)
    slots.free(c)
    assert slots.take(4096) == c  # last freed first
    slots.free(small)
    assert slots.take(1024) == small  # its own size before a larger one
    assert slots.take(1024) == (0, 4096, 1024)  # then the smallest larger, whole
    assert slots.take(1024) == (13312, 1024, 1024)  # then the end
    assert slots.take(4096) is None  # no free slot fits, and 14 KiB + 4 KiB is past the end
    assert slots.take(8192) is None  # used would be 19 KiB
    assert (slots.used, slots.high_water) == (4096 * 2 + 1024 * 3, 4096 * 3 + 1024)
    slots.reset()
    assert (slots.used, slots.take(4096)) == (0, (0, 4096, 4096))


@pytest.mark.parametrize("kind", SLOTS)
@pytest.mark.parametrize("capacity", [0, -1])
def test_slots_need_a_positive_capacity(kind, capacity):
    with pytest.raises(ParameterError, match="capacity > 0"):
        kind(capacity)


FILE_SAVE_CASES = [
    "saves",
    "unmarked",
    "sent",
    "no slot",
    "held",
    "closed source",
    "short read",
    "released arena",
]


@pytest.mark.parametrize("case", FILE_SAVE_CASES)
def test_file_save_matches_the_reference_and_falls_back_on_anything_but_success(tmp_path, case):
    """Both FileSaves save whole chunks (the last one short) straight from the file, skip
    chunks no longer flagged, do nothing unmarked, and hand a chunk they cannot save,
    and every chunk after it, to the fallback."""
    g = 2048
    size = 4 * g + 100  # chunk 4 is 100 bytes
    contents = bytes(range(256)) * (size // 256) + bytes(size % 256)
    seen = {}
    for core, kind in ((True, "core"), (False, "reference")):
        path = tmp_path / f"{kind}.img"
        path.write_bytes(contents)
        bitmap = (_core if core else _reference).DeltaBitmap(size, g)
        bitmap.mark(full=True)
        flagged = bitmap.record_write(0, size)  # flags chunks 0..4 saved
        lock, area_lock = threading.Lock(), threading.Lock()
        slots = (_core if core else _reference).Slots(g if case == "no slot" else 8 * g)
        index: dict = {}
        arena = memoryview(bytearray(8 * g))
        fell_back: list = []
        source = types.SimpleNamespace(_fd=os.open(path, os.O_RDONLY))
        save = (_core if core else _reference).FileSave(
            bitmap, source, lock, slots, index, arena, area_lock, fell_back.append
        )
        if case == "unmarked":
            bitmap.unmark()
        elif case == "sent":
            bitmap.clear_transfer(1, 2)  # chunks 1 and 2 were sent since: not flagged now
        elif case == "held":
            index[2] = slots.take(g)
        elif case == "closed source":
            os.close(source._fd)
            source._fd = -1
        elif case == "short read":
            os.truncate(path, 3 * g + 10)  # chunk 3 reads short
        elif case == "released arena":
            arena.release()
        save(flagged)
        assert not (lock.locked() or area_lock.locked())
        if source._fd >= 0:
            os.close(source._fd)
        seen[kind] = (
            {c: e for c, e in index.items()},
            [chunks.tolist() for chunks in fell_back],
            (save.chunks, save.nbytes, slots.used),
            {c: bytes(arena[e[0] : e[0] + e[2]]) for c, e in index.items()},
        )
    assert seen["core"] == seen["reference"]
    saved, fallback, counts, data = seen["core"]
    expected_saved, expected_fallback = {
        "saves": ([0, 1, 2, 3, 4], []),
        "unmarked": ([], []),
        "sent": ([0, 3, 4], []),
        "no slot": ([0], [[1, 2, 3, 4]]),
        "held": ([0, 1, 2], [[2, 3, 4]]),
        "closed source": ([], [[0, 1, 2, 3, 4]]),
        "short read": ([0, 1, 2], [[3, 4]]),
        "released arena": ([], [[0, 1, 2, 3, 4]]),
    }[case]
    assert sorted(saved) == expected_saved
    assert fallback == expected_fallback
    fresh = [c for c in expected_saved if not (case == "held" and c == 2)]
    assert counts[:2] == (len(fresh), sum(min(g, size - c * g) for c in fresh))
    assert counts[2] == sum(e[2] for e in saved.values())  # a failed read freed its slot
    for c in fresh:
        assert data[c] == contents[c * g : min((c + 1) * g, size)]


def test_write_through_calls_a_file_save_and_ends_the_write_when_its_fallback_fails(tmp_path):
    """write_through calls a FileSave directly; a fallback that raises unflags the chunks."""
    g = 2048
    path = tmp_path / "source.img"
    path.write_bytes(bytes(8 * g))
    bitmap = _core.DeltaBitmap(8 * g, g)
    bitmap.mark(full=True)
    fd = os.open(path, os.O_RDONLY)
    source = types.SimpleNamespace(_fd=fd)
    slots, index = _core.Slots(g), {}

    def fallback(chunks):
        raise InjectedFault(chunks.tolist())

    save = _core.FileSave(
        bitmap,
        source,
        threading.Lock(),
        slots,
        index,
        memoryview(bytearray(g)),
        threading.Lock(),
        fallback,
    )
    written = []
    bitmap.write_through(lambda o, d: written.append(o), save, 0, bytes(g))
    assert (list(index), written, save.chunks) == ([0], [0], 1)
    with pytest.raises(InjectedFault, match=r"\[1\]"):  # no slot left: the fallback's turn
        bitmap.write_through(lambda o, d: written.append(o), save, g, bytes(g))
    os.close(fd)
    assert written == [0]
    assert (bitmap.is_saved(0), bitmap.is_saved(1)) == (True, False)
    bounded(bitmap.unmark)
    bounded(bitmap.mark)


def test_a_write_through_a_file_save_that_its_activity_log_refuses_unflags_its_chunks(
    tmp_path,
):
    """The chunks a FileSave would take without an array are unflagged like an array's."""
    g = 2048
    path = tmp_path / "source.img"
    path.write_bytes(bytes(8 * g))
    bitmap = _core.DeltaBitmap(8 * g, g)
    fails = [True]

    def log(first, last):
        if fails[0]:
            raise InjectedFault(first, last)

    bitmap.track_activity(4 * g, log)
    bitmap.mark(full=True)
    fd = os.open(path, os.O_RDONLY)
    slots, index = _core.Slots(8 * g), {}
    save = _core.FileSave(
        bitmap,
        types.SimpleNamespace(_fd=fd),
        threading.Lock(),
        slots,
        index,
        memoryview(bytearray(8 * g)),
        threading.Lock(),
        None,
    )
    written = []
    with pytest.raises(InjectedFault):
        bitmap.write_through(lambda o, d: written.append(o), save, g - 1, b"xy")
    assert (written, index, bitmap.saved_count) == ([], {}, 0)
    fails[0] = False
    bitmap.write_through(lambda o, d: written.append(o), save, g - 1, b"xy")  # saved now
    os.close(fd)
    assert (written, sorted(index), bitmap.saved_count) == ([g - 1], [0, 1], 2)
    bounded(bitmap.unmark)


SAVED_WRITE_CASES = [
    "memory",
    "file",
    "released arena",
    "closed destination",
    "failing write",
    "failing read",
    "chunk past the end",
]


@pytest.mark.parametrize("case", SAVED_WRITE_CASES)
def test_saved_write_matches_the_reference_and_stops_at_anything_but_success(tmp_path, case):
    """Both SavedWrites write the held chunks, adjacent ones together up to the limit, skip
    chunks not held, and stop before a chunk they cannot write, returning how many chunks
    they handled; the destination then holds exactly the groups written."""
    g = 2048
    size = 8 * g + 100  # chunk 8 is 100 bytes
    held = {1: 5, 2: 0, 3: 7, 5: 2, 8: 3}  # chunk -> arena slot, out of order
    chunks = [1, 2, 3, 4, 5, 8]  # chunk 4 is flagged but not stored yet
    slots = random.Random(8).randbytes(8 * g)
    area = tmp_path / "area"
    area.write_bytes(slots)
    seen = {}
    for kind in (_core, _reference):
        index = {c: (s * g, g, min(g, size - c * g)) for c, s in held.items()}
        area_lock = threading.Lock()
        arena = None if case in ("file", "failing read") else memoryview(bytearray(slots))
        fd = os.open(area, os.O_RDONLY) if arena is None else -1
        if case == "failing read":
            os.truncate(area, 6 * g)  # chunks 1 and 2 read, chunk 3 (slot 7) does not
        out = os.memfd_create("dest", os.MFD_ALLOW_SEALING)
        os.write(out, b"\xee" * size)
        if case == "failing write":
            os.ftruncate(out, 4 * g)  # chunk 5 would grow the file: the seal refuses
            fcntl.fcntl(out, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        dest = types.SimpleNamespace(_write_fd=-1 if case == "closed destination" else out)
        write = kind.SavedWrite(index, area_lock, arena, fd, g, 2 * g)
        if case == "released arena":
            arena.release()
        end = 5 * g + 10 if case == "chunk past the end" else size
        handled = write(np.array(chunks, dtype=np.int64), end, dest)
        assert not area_lock.locked()
        counts = (write.chunks, write.nbytes, write.writes)
        seen[kind.__name__] = (handled, counts, os.pread(out, size, 0))
        for f in (out, fd):
            if f >= 0:
                os.close(f)
        area.write_bytes(slots)
    assert seen["isc._core"] == seen["isc._reference"]
    handled, counts, data = seen["isc._core"]
    # Groups: [1, 2] (the limit's worth), [3], 4 skipped, [5], [8].
    written, expected_handled = {
        "memory": ([1, 2, 3, 5, 8], 6),
        "file": ([1, 2, 3, 5, 8], 6),
        "released arena": ([], 0),
        "closed destination": ([], 0),
        "failing write": ([1, 2, 3], 4),  # chunk 5's write fails
        "failing read": ([1, 2], 2),  # chunk 3's read fails
        "chunk past the end": ([1, 2, 3], 4),  # chunk 5 does not end at end
    }[case]
    assert handled == expected_handled
    groups = len(written) - (1 in written)
    assert counts == (len(written), sum(min(g, size - c * g) for c in written), groups)
    expected = bytearray(b"\xee" * (4 * g if case == "failing write" else size))
    for c in written:
        length = min(g, size - c * g)
        expected[c * g : c * g + length] = slots[held[c] * g : held[c] * g + length]
    assert data == bytes(expected)


def test_saved_write_needs_a_limit_of_at_least_a_chunk():
    for kind in (_core, _reference):
        with pytest.raises(ParameterError, match="0 < granularity <= limit"):
            kind.SavedWrite({}, threading.Lock(), None, -1, 4096, 2048)


# -- the Python protocols: ==, len, pickling, chunks_of -------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 3 * BLOCK - 1), st.integers(1, 80)),
        st.tuples(st.just("send"), st.integers(0, 3 * BLOCK - 1), st.integers(1, 80)),
        st.tuples(st.sampled_from(("mark", "full mark", "unmark")), st.just(0), st.just(0)),
    ),
    max_size=8,
)


def replay(bitmap, steps) -> None:
    """Apply (operation, chunk, count) steps; ones the state refuses are skipped."""
    for op, chunk, count in steps:
        count = min(count, bitmap.chunks - chunk)
        if op == "write":
            bitmap.record_write(chunk * bitmap.granularity, count * bitmap.granularity)
        elif op == "send" and bitmap.marked:
            bitmap.clear_transfer(chunk, count)
        elif op in ("mark", "full mark") and not bitmap.marked:
            bitmap.mark(full=op == "full mark")
        elif op == "unmark":
            bitmap.unmark()


@settings(max_examples=60)
@given(first=operations, second=operations, shared=st.integers(0, 8))
def test_equality_is_equality_of_the_serialized_state(first, second, shared):
    """``==`` of two cores, of two references and of their ``to_bytes`` agree; the second
    map replays a prefix of the first map's steps, so that equal maps are common."""
    steps = (first, first[:shared] + second)
    cores = [_core.DeltaBitmap(3 * BLOCK * 2048 - 100, 2048) for _ in steps]
    refs = [_reference.DeltaBitmap(3 * BLOCK * 2048 - 100, 2048) for _ in steps]
    for bitmap_steps, core, ref in zip(steps, cores, refs, strict=True):
        replay(core, bitmap_steps)
        replay(ref, bitmap_steps)
    same = cores[0].to_bytes() == cores[1].to_bytes()
    assert (cores[0] == cores[1]) is (cores[1] == cores[0]) is same
    assert (refs[0] == refs[1]) is same
    assert (cores[0] != cores[1]) is not same


def test_equality_ignores_which_physical_array_tracks_and_the_write_count():
    """Same bits, mark and generation are equal, however the roles were swapped to get there."""
    size = 2 * BLOCK * 2048
    swapped, kept = (_core.DeltaBitmap(size, 2048) for _ in range(2))
    swapped.mark()  # the roles swap
    swapped.record_write(0, size)  # tracking is full: unmark keeps its role
    swapped.unmark()
    kept.mark(full=True)  # no swap
    kept.record_write(0, size)
    kept.record_write(0, 1)
    kept.unmark()
    assert swapped.snapshot()[1] != kept.snapshot()[1]  # tracking lives in different arrays
    assert swapped.writes != kept.writes
    assert swapped == kept
    kept.record_write(size - 1, 1)
    assert swapped == kept  # already set
    kept.mark()
    assert swapped != kept


@pytest.mark.parametrize("kind", [_core, _reference])
def test_bitmaps_of_another_geometry_or_type_are_unequal_and_none_is_hashable(kind):
    bitmap = kind.DeltaBitmap(8192, 2048)
    assert bitmap == kind.DeltaBitmap(8192, 2048)
    assert bitmap != kind.DeltaBitmap(8192, 4096)
    assert bitmap != kind.DeltaBitmap(8193, 2048)
    assert bitmap != bitmap.to_bytes()
    other = (_reference if kind is _core else _core).DeltaBitmap(8192, 2048)
    assert bitmap != other  # the twins compare by state only within their kind
    with pytest.raises(TypeError, match="unhashable"):
        hash(bitmap)


@pytest.mark.parametrize("kind", [_core, _reference])
def test_pickling_keeps_the_state_and_restarts_the_write_count(kind):
    bitmap = kind.DeltaBitmap(5 * 2048 + 7, 2048)
    bitmap.record_write(0, 3 * 2048)
    bitmap.mark()
    bitmap.record_write(2048, 1)
    copy = pickle.loads(pickle.dumps(bitmap, protocol=pickle.HIGHEST_PROTOCOL))
    assert copy == bitmap
    assert (copy.marked, copy.generation, copy.writes) == (True, 1, 0)
    np.testing.assert_array_equal(copy.chunks_of("saved"), [1])
    assert repr(copy) == repr(bitmap)
    assert "tracking=1, transfer=3, saved=1" in repr(copy)


def test_len_is_the_number_of_chunks():
    for kind in (_core, _reference):
        assert len(kind.DeltaBitmap(10 * 2048 + 1, 2048)) == 11


def test_chunks_of_names_the_bitmaps_it_takes():
    twins = Twins.new(1 << 20, 4096)
    error, exc = twins.both(lambda b: b.chunks_of("dirty"))
    assert error is ParameterError
    assert str(exc) == "chunks_of takes 'tracking', 'transfer' or 'saved', got 'dirty'"


@pytest.mark.parametrize("chunks", [1, 64, 65, BLOCK, BLOCK + 1, 3 * BLOCK - 1])
def test_chunks_of_full_and_sparse_bitmaps_across_blocks(chunks):
    twins = Twins.new(chunks * 2048, 2048)
    twins.both(lambda b: b.record_write(0, chunks * 2048))
    twins.both(lambda b: b.mark())
    twins.both(lambda b: b.record_writes([0, (chunks - 1) * 2048], [1, 1]))
    twins.agree()
    np.testing.assert_array_equal(twins.core.chunks_of("transfer"), np.arange(chunks))
    np.testing.assert_array_equal(twins.core.chunks_of("saved"), sorted({0, chunks - 1}))


# -- a 16 TiB LUN ------------------------------------------------------------------


@pytest.mark.big
def test_big_16tib_lun_at_2k_chunks_stays_sparse():
    """2^33 chunks: calloc'd bitmaps whose pages are never touched, summary-driven scans."""
    size, granularity = 1 << 44, 2048
    core = _core.DeltaBitmap(size, granularity)
    ref = _reference.DeltaBitmap(size, granularity)
    assert core.chunks == 1 << 33
    for bitmap in (core, ref):
        bitmap.record_write(size - 3 * granularity - 1, 3 * granularity)
        bitmap.record_write(size - 1, 1)
        bitmap.mark()
    assert_same_result(core.extents(), ref.extents())
    assert len(core.extents()) == 1
    assert_same_result(core.extents(1), ref.extents(1))
    assert_same_result(core.transfer_count, ref.transfer_count)
    assert_same_result(core.record_write(size - 2048, 2048), ref.record_write(size - 2048, 2048))
    assert_same_result(core.test_and_clear(core.chunks - 4), ref.test_and_clear(core.chunks - 4))
    for which in BITMAPS:
        assert_same_result(core.chunks_of(which), ref.chunks_of(which))
    # Compared by summary blocks: the untouched pages stay untouched.
    again = _core.DeltaBitmap(size, granularity)
    again.record_writes([size - 3 * granularity - 1, size - 1], [3 * granularity, 1])
    again.mark()
    again.record_write(size - 2048, 2048)
    again.test_and_clear(core.chunks - 4)
    assert again == core
    again.record_write(0, 1)
    assert again != core
    for bitmap in (core, ref):
        bitmap.unmark()
    for name in ("tracking_count", "transfer_count", "saved_count", "generation", "marked"):
        assert_same_result(getattr(core, name), getattr(ref, name))
    assert core.extents().shape == (0, 2)
