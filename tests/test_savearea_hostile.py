"""The check of a save area's size in memory (:class:`isc.savearea.SaveArea`, ``isc create
--save-area``) attacked where tests/test_local_hostile.py does not reach: a size past what
a mapping's length can hold.

``mmap`` takes a length of at most 2**63 - 1 bytes; one larger raises ``OverflowError``,
not the ``OSError`` the check catches, so ``isc create --save-area 9223372036854775808``
ended in a traceback, and so did every command on a session whose file names such an area
(rule 10: bad input gets one line naming the object and the fix, and changes nothing).
Such an area is refused now in the line of one beyond the address space.
"""

from __future__ import annotations

import json
from pathlib import Path

from test_boundary_hostile import run_isc
from test_cli import files

from isc import FileLUN
from isc.store import open_session

TOO_LARGE = 1 << 63


def test_a_save_area_past_a_mappings_length_is_refused_at_create_in_one_line(
    tmp_path: Path,
) -> None:
    FileLUN.create(tmp_path / "source.img", 1 << 20).close()
    before = sorted(p.name for p in tmp_path.iterdir())
    create = ["create", "big", "--source", "source.img", "--save-area", str(TOO_LARGE)]
    done = run_isc(*create, cwd=tmp_path, fail=True)
    assert "cannot be mapped in memory" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_session_file_naming_a_save_area_past_a_mappings_length_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    FileLUN.create(tmp_path / "source.img", 1 << 20).close()
    run_isc("create", "s", "--source", "source.img", cwd=tmp_path)
    open_session(tmp_path / "s")[0].close()  # its first open makes the files it keeps
    meta = json.loads((tmp_path / "s" / "session.json").read_text())
    meta["save_area"] = {"capacity": TOO_LARGE, "path": None}
    (tmp_path / "s" / "session.json").write_text(json.dumps(meta))
    before = files(tmp_path / "s")
    done = run_isc("mark", "s", cwd=tmp_path, fail=True)
    assert "cannot be mapped in memory" in done.stderr, done.stderr
    assert files(tmp_path / "s") == before
