"""isc's NBD server beside QEMU's, read by the tools backup software uses.

The same writes go to an isc session's export and to ``qemu-nbd -B`` of a qcow2
image with a persistent dirty bitmap of the same granularity; ``nbdinfo
--map``, ``qemu-img map`` with ``x-dirty-bitmap`` (as QEMU's iotest 223 reads a
bitmap) and libnbd's ``block_status`` must then read the same dirty extents
from both, equal to the chunks the writes touched and, for isc, to its own
tracking bitmap; the data must be what the writes wrote. Then, isc alone:
``nbdcopy`` and ``qemu-img convert -n`` into and out of the export (sparse
stays sparse, every write tracked), ``qemu-io`` discards, and ``nbdinfo
--list`` of a marked session's two exports.

Every tool is a real process from Debian's packages (qemu-utils, nbdkit,
libnbd-bin, python3-libnbd); a test whose tool is missing is skipped, naming
it. Writes are seeded.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_nbd import KIB, MIB, run, sparse, spawn, tool
from test_pull import libnbd_python

from isc import FileLUN, Session
from isc.nbd import NBDServer, SessionLUN

SEED = 20261207
G = 64 * KIB
SIZE = 64 * MIB + 3 * 4096  # the last chunk is short

# Ranges of chunks (in G) each write covers, given as qemu-io commands.
WRITES = [
    ("write -P 0x11", 100 * KIB, 8 * KIB),
    ("write -P 0x22", 3 * MIB - 512, 1024),  # across a chunk boundary
    ("write -z", 7 * MIB, 3 * MIB),
    ("write -P 0x33", 20 * MIB, 5 * G + 1),
    ("write -P 0x44", SIZE - 4096, 4096),  # the short chunk
]

BLOCK_STATUS = """
import json, sys
import nbd

uri, context, queries = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
h = nbd.NBD()
h.add_meta_context(context)
h.connect_uri(uri)
answers = []
for offset, length, one in queries:
    got = []
    h.block_status(
        length, offset, lambda name, at, entries, error: got.append(list(entries)),
        nbd.CMD_FLAG_REQ_ONE if one else 0,
    )
    answers.append(got)
h.shutdown()
print(json.dumps(answers))
"""


def qemu_io_commands() -> list[str]:
    return [f"{command} {offset} {length}" for command, offset, length in WRITES]


def model(size: int) -> tuple[bytes, list[int]]:
    """The image the writes leave on a zeroed volume, and the chunks they touch."""
    image = bytearray(size)
    chunks: set[int] = set()
    for command, offset, length in WRITES:
        fill = int(command.split()[-1], 16) if "-P" in command else 0
        image[offset : offset + length] = bytes([fill]) * length
        chunks.update(range(offset // G, (offset + length - 1) // G + 1))
    return bytes(image), sorted(chunks)


def runs(chunks: list[int], size: int) -> list[tuple[int, int]]:
    """The (offset, length) byte ranges of runs of adjacent chunks."""
    found: list[list[int]] = []
    for c in chunks:
        if found and found[-1][1] == c:
            found[-1][1] = c + 1
        else:
            found.append([c, c + 1])
    return [(a * G, min(b * G, size) - a * G) for a, b in found]


@dataclass
class Server:
    kind: str
    uri: str
    socket: Path
    export: str
    tracked: object = None  # isc: the chunks its tracking bitmap holds


@contextmanager
def isc_server(tmp_path: Path) -> Iterator[Server]:
    lun = FileLUN.create(tmp_path / "isc.img", SIZE)
    session = Session(lun, granularity=G, name="vol")
    bitmap = session.bitmap
    try:
        with NBDServer(SessionLUN(session), name="vol") as server:
            server.start_unix(tmp_path / "isc.sock")
            tracked = lambda: [c for c in range(bitmap.chunks) if bitmap.tracking(c)]  # noqa: E731
            yield Server("isc", server.uri, tmp_path / "isc.sock", "vol", tracked)
    finally:
        lun.close()


@contextmanager
def qemu_server(tmp_path: Path) -> Iterator[Server]:
    image = tmp_path / "qemu.qcow2"
    qemu_img = tool("qemu-img")
    run(qemu_img, "create", "-q", "-f", "qcow2", image, str(SIZE))
    run(qemu_img, "bitmap", "--add", "-g", str(G), image, "vol")
    sock = tmp_path / "qemu.sock"
    args = [tool("qemu-nbd"), "-f", "qcow2", "-k", str(sock), "--persistent", "--shared=8"]
    with spawn([*args, "-x", "vol", "-B", "vol", str(image)], sock, name="vol") as remote:
        yield Server("qemu-nbd", remote.uri, sock, "vol")


@pytest.fixture(params=["isc", "qemu-nbd"])
def bitmap_server(request, tmp_path: Path) -> Iterator[Server]:
    """An export with the dirty bitmap qemu:dirty-bitmap:vol, from isc or from QEMU."""
    with (isc_server if request.param == "isc" else qemu_server)(tmp_path) as server:
        yield server


def block_status(uri: str, context: str, queries: list[tuple[int, int, bool]]) -> list:
    """libnbd's block_status of each (offset, length, REQ_ONE): the extents' flat lists."""
    done = run(libnbd_python(), "-c", BLOCK_STATUS, uri, context, json.dumps(queries))
    return json.loads(done.stdout)


def test_both_servers_report_the_writes_as_the_same_dirty_extents(bitmap_server, tmp_path):
    server = bitmap_server
    run(
        tool("qemu-io"),
        "-f",
        "raw",
        *(a for c in qemu_io_commands() for a in ("-c", c)),
        server.uri,
    )
    image, chunks = model(SIZE)
    expected = runs(chunks, SIZE)
    if server.tracked is not None:
        assert server.tracked() == chunks
    # nbdinfo --map
    shown = run(tool("nbdinfo"), "--json", "--map=qemu:dirty-bitmap:vol", server.uri).stdout
    mapped = json.loads(shown)
    assert [(e["offset"], e["length"]) for e in mapped if e["type"] & 1] == expected
    assert sum(e["length"] for e in mapped) == SIZE
    # qemu-img map reads the bitmap as QEMU's iotest 223 does: dirty reads as no data.
    options = f"driver=nbd,export=vol,server.type=unix,server.path={server.socket}"
    options += ",x-dirty-bitmap=qemu:dirty-bitmap:vol"
    shown = run(tool("qemu-img"), "map", "--output=json", "--image-opts", options).stdout
    assert [(e["start"], e["length"]) for e in json.loads(shown) if not e["data"]] == expected
    # libnbd, whole and REQ_ONE
    (whole,) = block_status(server.uri, "qemu:dirty-bitmap:vol", [(0, SIZE, False)])
    flat = [x for entries in whole for x in entries]
    at, dirty = 0, []
    for length, flags in zip(flat[::2], flat[1::2], strict=True):
        if flags & 1:
            dirty.append((at, length))
        at += length
    assert dirty == expected
    # the data the writes wrote
    copy = tmp_path / f"{server.kind}.raw"
    run(tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", server.uri, copy)
    assert copy.read_bytes() == image


def test_isc_answers_every_query_exactly_as_qemu_nbd(tmp_path):
    rng = random.Random(SEED)
    queries = [(0, SIZE, False), (0, SIZE, True), (SIZE - 1, 1, False), (SIZE - 5000, 5000, True)]
    for _ in range(40):
        offset = rng.randrange(SIZE - 1)
        queries.append(
            (offset, rng.randrange(1, min(SIZE - offset, 8 * MIB) + 1), rng.random() < 0.4)
        )
    answers = {}
    (tmp_path / "isc").mkdir()
    (tmp_path / "qemu").mkdir()
    with isc_server(tmp_path / "isc") as ours, qemu_server(tmp_path / "qemu") as theirs:
        for server in (ours, theirs):
            commands = (a for c in qemu_io_commands() for a in ("-c", c))
            run(tool("qemu-io"), "-f", "raw", *commands, server.uri)
            answers[server.kind] = block_status(server.uri, "qemu:dirty-bitmap:vol", queries)
    for query, mine, qemu in zip(queries, answers["isc"], answers["qemu-nbd"], strict=True):
        assert mine == qemu, query


# -- isc alone --------------------------------------------------------------------------------
@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Session, NBDServer, Path]]:
    """A session named vol on a sparse 1 GiB file, exported as vol."""
    path = sparse(tmp_path / "vol.img", 1 << 30)
    lun = FileLUN(path)
    session = Session(lun, granularity=G, name="vol")
    try:
        with NBDServer(SessionLUN(session), name="vol") as server:
            server.start_unix(tmp_path / "vol.sock")
            yield session, server, path
    finally:
        lun.close()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def scattered(path: Path, size: int, seed: int) -> list[tuple[int, int]]:
    """A sparse file of ``size`` bytes with a few random extents of data; the extents."""
    rng = random.Random(seed)
    sparse(path, size)
    extents = sorted(
        (rng.randrange(size // G - 16) * G + rng.randrange(G), rng.randrange(1, 3 * G))
        for _ in range(12)
    )
    with open(path, "r+b") as f:
        for offset, length in extents:
            f.seek(offset)
            f.write(rng.randbytes(length))
    return extents


def assert_tracked(session: Session, extents: list[tuple[int, int]]) -> None:
    """Every chunk the data ``extents`` cover is in the tracking bitmap."""
    bitmap = session.bitmap
    tracked = {c for c in range(bitmap.chunks) if bitmap.tracking(c)}
    assert {c for at, n in extents for c in range(at // G, (at + n - 1) // G + 1)} <= tracked


def same(a: Path | str, b: Path | str) -> None:
    run(tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", a, b)


def test_nbdcopy_into_and_out_of_a_1_gib_export_keeps_it_sparse_and_tracked(served, tmp_path):
    session, server, path = served
    nbdcopy = tool("nbdcopy")
    source = tmp_path / "src.img"
    extents = scattered(source, 1 << 30, SEED)
    run(nbdcopy, "--flush", source, server.uri)
    same(source, path)
    assert allocated(path) < 64 * MIB  # holes went over as zeroes that punch, not data
    assert_tracked(session, extents)
    out = tmp_path / "out.img"
    run(nbdcopy, server.uri, out)
    same(source, out)
    assert allocated(out) < 64 * MIB  # read as holes (base:allocation, OFFSET_HOLE)


def test_qemu_img_convert_both_ways_and_qemu_io_discards_are_tracked(served, tmp_path):
    session, server, path = served
    qemu_img, qemu_io = tool("qemu-img"), tool("qemu-io")
    small = tmp_path / "small.img"
    extents = scattered(small, 32 * MIB, SEED + 1)
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", small, server.uri)
    same(small, server.uri)  # the rest of the export reads as zeros
    assert allocated(path) < 16 * MIB
    assert_tracked(session, extents)
    bitmap = session.bitmap
    back = tmp_path / "back.img"
    sparse(back, 1 << 30)
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", server.uri, back)
    same(path, back)
    before = bitmap.tracking_count
    session.mark()  # what follows is tracked anew
    run(qemu_io, "-f", "raw", "-c", "write -P 0x55 900M 64k", "-c", "discard 901M 1M", server.uri)
    written = [900 * 16, *range(901 * 16, 902 * 16)]  # the write's chunk, the discard's
    assert [c for c in range(bitmap.chunks) if bitmap.tracking(c)] == written
    assert session.read(900 * MIB, 64 * KIB) == b"\x55" * (64 * KIB)
    assert session.read(901 * MIB, MIB) == bytes(MIB)
    assert bitmap.transfer_count == before


def test_nbdinfo_lists_a_marked_sessions_two_exports(served):
    session, server, _ = served
    session.write(0, b"\1")
    session.mark()
    shown = json.loads(run(tool("nbdinfo"), "--list", "--json", server.uri).stdout)
    exports = {e["export-name"]: e for e in shown["exports"]}
    assert set(exports) == {"vol", "vol@frozen"}
    contexts = ["base:allocation", "qemu:dirty-bitmap:vol"]
    assert exports["vol"]["contexts"] == exports["vol@frozen"]["contexts"] == contexts
    assert exports["vol"]["can_trim"] and exports["vol"]["can_zero"] and exports["vol"]["can_fua"]
    frozen = exports["vol@frozen"]
    assert frozen["can_trim"] and not frozen["can_zero"] and not frozen["can_flush"]
    mapped = json.loads(
        run(
            tool("nbdinfo"), "--json", "--map=qemu:dirty-bitmap:vol", server.uri_of("vol@frozen")
        ).stdout
    )
    assert [(e["offset"], e["length"]) for e in mapped if e["type"] & 1] == [(0, G)]
