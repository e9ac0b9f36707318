"""The check of a save area's size (:class:`isc.savearea.SaveArea`, ``isc create
--save-area``) attacked where tests/test_local_hostile.py does not reach: a size past what
a mapping's length or a file's size can hold.

``mmap`` takes a length of at most 2**63 - 1 bytes; one larger raised ``OverflowError``,
not the ``OSError`` the check caught, so ``isc create --save-area 9223372036854775808``
ended in a traceback, and so did every command on a session whose file names such an area;
in a file it was taken at create, and every later command failed naming the size as
outside any LUN and left the area's file behind (rule 10: bad input gets one line naming
the object and the fix, and changes nothing). Such an area is refused in one line, in
memory and in a file, before anything is made.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_boundary_hostile import run_isc
from test_cli import files

from isc import FileLUN
from isc.store import open_session

TOO_LARGE = 1 << 63
REFUSED = "is larger than any file or mapping can be (9223372036854775807 bytes at most)"


@pytest.mark.parametrize("where", ["memory", "file"])
def test_a_save_area_past_a_mappings_length_is_refused_at_create_in_one_line(
    tmp_path: Path, where: str
) -> None:
    FileLUN.create(tmp_path / "source.img", 1 << 20).close()
    before = sorted(p.name for p in tmp_path.iterdir())
    area = str(TOO_LARGE) + (",area.bin" if where == "file" else "")
    done = run_isc(
        "create", "big", "--source", "source.img", "--save-area", area, cwd=tmp_path, fail=True
    )
    assert REFUSED in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("where", ["memory", "file"])
def test_a_session_file_naming_a_save_area_past_a_mappings_length_is_refused_in_one_line(
    tmp_path: Path, where: str
) -> None:
    FileLUN.create(tmp_path / "source.img", 1 << 20).close()
    run_isc("create", "s", "--source", "source.img", cwd=tmp_path)
    open_session(tmp_path / "s")[0].close()  # its first open makes the files it keeps
    meta = json.loads((tmp_path / "s" / "session.json").read_text())
    path = str(tmp_path / "area.bin") if where == "file" else None
    meta["save_area"] = {"capacity": TOO_LARGE, "path": path}
    (tmp_path / "s" / "session.json").write_text(json.dumps(meta))
    before, outside = files(tmp_path / "s"), sorted(p.name for p in tmp_path.iterdir())
    done = run_isc("mark", "s", cwd=tmp_path, fail=True)
    assert REFUSED in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert files(tmp_path / "s") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == outside  # no area file left
