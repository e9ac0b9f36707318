"""README.md stays true: its Python API example runs as written, and what it names exists.

The example is run the way a reader runs it: copied into a file in an empty
directory and run by this interpreter in a subprocess; what it prints must
be what the README says it prints. Every repository path the README names
(``isc/serve.py``, ``docs/design.md`` ...) and every link it makes must lead
to a file of the repository, so the README never points to what a clone
does not have.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT = 60  # seconds the example may take (it copies 1 MiB)


def section(title: str) -> str:
    """The text of the README section headed ``## title``, up to the next heading of its level."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``language`` in ``text``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)


def test_the_api_example_runs_as_written_and_prints_what_the_readme_shows(tmp_path: Path):
    api = section("The Python API")
    (example,) = blocks(api, "python")
    (printed,) = blocks(api, "text")
    script = tmp_path / "example.py"
    script.write_text(example)
    done = subprocess.run(
        [sys.executable, "-W", "error", script.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's isc, installed or not
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == printed
    assert done.stderr == ""


def test_every_path_and_link_in_the_readme_is_in_the_repository():
    text = README.read_text()
    top = {p.name for p in ROOT.iterdir()}
    # `isc/serve.py`, `benchmarks/README.md`, `../elsewhere`: relative paths in
    # backticks, told from `DIR/.isc-agent/` by their first part.
    named = [
        path
        for path in re.findall(r"`([\w.-]+(?:/[\w.-]+)+)/?`", text)
        if path.split("/")[0] in top | {".."}
    ]
    links = [
        link
        for link in re.findall(r"\]\(([^)\s]+)\)", text)
        if not re.match(r"[a-z][a-z0-9+.-]*:", link)  # http:, mailto: ...
    ]
    assert named, "README.md names no repository path: the pattern above is out of date"

    def held(path: str) -> bool:
        target = (ROOT / path.partition("#")[0]).resolve()
        return target.is_relative_to(ROOT) and target.exists()

    missing = [path for path in named + links if not held(path)]
    assert not missing, f"README.md names what the repository does not hold: {missing}"
