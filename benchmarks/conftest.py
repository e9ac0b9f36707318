"""Shared setup for the isc benchmark suites.

Refuses to run against a stale build of the core (numbers from an old ``.so``
would be silently wrong), frees each test's bitmaps before the next one
starts so that the large cases never overlap in memory, and records in each
benchmark's extra_info how busy other processes kept the machine.
"""

import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
_BUILD = "python setup.py build_ext --inplace -q"


def pytest_sessionstart(session: pytest.Session) -> None:
    pyx = _ROOT / "isc" / "_core.pyx"
    built = sorted(_ROOT.glob("isc/_core.*.so"), key=lambda p: p.stat().st_mtime)
    if not built:
        pytest.exit(f"isc/_core is not built; run `{_BUILD}` first", returncode=2)
    if built[-1].stat().st_mtime < pyx.stat().st_mtime:
        pytest.exit(
            f"{built[-1].name} is older than isc/_core.pyx; rebuild with `{_BUILD}`",
            returncode=2,
        )


@pytest.fixture(autouse=True)
def _free_between_tests():
    yield
    gc.collect()


def _busy_seconds() -> float:
    """CPU seconds spent by the whole machine outside idle, from ``/proc/stat``."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@pytest.fixture(autouse=True)
def busy_elsewhere(request) -> Iterator[None]:
    """Record in extra_info how many CPUs other processes kept busy during the test.

    The machine has two cores: a copy and a host writer already use both, so
    anything else running (measured from ``/proc/stat`` less this process and
    its children, steal time included) slows the figures. Unused without
    ``benchmark``.
    """
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    wall, busy, own = time.monotonic(), _busy_seconds(), _own_seconds()
    yield
    wall = time.monotonic() - wall
    other = (_busy_seconds() - busy) - (_own_seconds() - own)
    # Clock ticks are 10 ms: over a short test the ratio is coarse.
    benchmark.extra_info["busy_elsewhere"] = round(max(other, 0.0) / wall, 2)
    benchmark.extra_info["test_seconds"] = round(wall, 3)
