"""Shared setup for the isc benchmark suites.

Refuses to run against a stale build of the core (numbers from an old ``.so``
would be silently wrong), and frees each test's bitmaps before the next one
starts so that the large cases never overlap in memory.
"""

import gc
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
