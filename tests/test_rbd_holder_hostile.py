"""An RBD image's holder (its metadata ``isc.holder``, :mod:`isc.rbd`) attacked where the
holder tests (tests/test_rbd.py) do not reach: the copies that ask no site.

Rule 12 across sites says an image is the destination of one session at a time. ``isc
update`` asks at its protect, and ``isc copy`` asks each destination's own agent
(:func:`isc.store.check_agents`), leaving out one another session holds. Nothing asked an
image's metadata before ``isc copy``: a session added before images had holders (which
claims at its next protect) copied into an image another session has added and holds
since, and called it consistent over that session's copy. An image's status reads its
holder now, and check_agents asks it. That session's ``remove-dest`` warned that the
image stays held for it, though the other session held it.

Rule 13 for a damaged holder value: an agent's damaged holder record refuses its export
as held (``Ack.held``), so an update copies the session's other destinations and fails for
that one alone; an image's damaged ``isc.holder`` failed its protect as any trouble of the
cluster does, and the whole update was abandoned (its docstring said ``Ack.held``).

Rule 10 for a claim the image cannot keep: a holder whose name is over 255 characters is
not in a holder's form (:func:`isc.remote.is_holder`). ``isc add-dest`` of a session so
named wrote that value into the image's metadata, read it back as damaged and was
refused, leaving the image refused to every session until the operator removed it; a
claim now checks the form first and writes nothing, ``isc create`` refuses such a name,
and a session named so before is named by the first 255 characters in its holder.

A real single-node Ceph cluster (tests/ceph.py), real ``isc`` commands.
"""

from __future__ import annotations

import json
import random

from helpers import fill_random, session_file
from test_rbd import SIZE, G, isc

from isc import FileLUN, rbd
from isc.store import METADATA, create_session


def test_isc_copy_leaves_out_an_image_another_session_holds(ceph, tmp_path) -> None:
    """s0 added the image before images had holders (its metadata names none); s1 added it
    since and holds it. s0's ``isc copy --full`` must leave the image alone, as its
    ``isc update`` does (its protect is refused), and never call it consistent."""
    name = f"copyheld-{random.Random().getrandbits(32):08x}"
    sources = []
    for k in range(2):
        source = tmp_path / f"source{k}.img"
        with FileLUN.create(source, SIZE) as lun:
            fill_random(lun, random.Random(k))
        sources.append(source.read_bytes())
        create_session(tmp_path / f"s{k}", str(source), granularity=G)
    image = ceph.create_image(name, SIZE)
    isc("add-dest", str(tmp_path / "s0"), image, "--name", "img")
    ceph.rbd("image-meta", "remove", f"rbd/{name}", "isc.holder")  # as before holders
    isc("add-dest", str(tmp_path / "s1"), image, "--name", "img")
    isc("copy", str(tmp_path / "s1"), "--full")
    assert ceph.read(name) == sources[1]

    isc("copy", str(tmp_path / "s0"), "--full", check=False)
    holder = json.loads(ceph.rbd("image-meta", "get", f"rbd/{name}", "isc.holder"))
    assert holder["name"] == "s1"
    assert ceph.read(name) == sources[1]  # s1's copy, not overwritten by s0's
    states = {d["name"]: d["state"] for d in session_file(tmp_path / "s0")["destinations"]}
    assert states["img"] != "consistent"


def test_a_damaged_holder_value_fails_the_update_for_that_image_alone(ceph, tmp_path) -> None:
    name = f"damaged-{random.Random().getrandbits(32):08x}"
    source = tmp_path / "source.img"
    with FileLUN.create(source, SIZE) as lun:
        fill_random(lun, random.Random(5))
    state = tmp_path / "s"
    create_session(state, str(source), granularity=G)
    FileLUN.create(tmp_path / "local.img", SIZE).close()
    isc("add-dest", str(state), str(tmp_path / "local.img"), "--name", "local")
    image = ceph.create_image(name, SIZE)
    isc("add-dest", str(state), image, "--name", "img")
    ceph.rbd("image-meta", "set", f"rbd/{name}", "isc.holder", '{"id": 7')  # damaged
    failed = isc("update", str(state), check=False)
    assert failed.returncode == 1 and "isc.holder is damaged" in failed.stderr, failed.stderr
    states = {d["name"]: d["state"] for d in session_file(state)["destinations"]}
    assert states == {"local": "consistent", "img": "new"}
    assert (tmp_path / "local.img").read_bytes() == source.read_bytes()
    assert ceph.snapshots(name) == [] and ceph.read(name) == bytes(SIZE)


def test_remove_dest_of_an_image_another_session_holds_leaves_it_alone_with_no_warning(
    ceph, tmp_path
) -> None:
    """s0 added the image before images had holders; s1 added it since and holds it. s0's
    remove-dest holds nothing there to let go: no warning that it stays held for s0."""
    name = f"othersheld-{random.Random().getrandbits(32):08x}"
    FileLUN.create(tmp_path / "source.img", SIZE).close()
    for k in range(2):
        create_session(tmp_path / f"s{k}", str(tmp_path / "source.img"), granularity=G)
    image = ceph.create_image(name, SIZE)
    isc("add-dest", str(tmp_path / "s0"), image, "--name", "img")
    ceph.rbd("image-meta", "remove", f"rbd/{name}", "isc.holder")  # as before holders
    isc("add-dest", str(tmp_path / "s1"), image, "--name", "img")
    done = isc("remove-dest", str(tmp_path / "s0"), "img", "--json")
    assert done.stderr == "" and json.loads(done.stdout)["released"] is True, done.stderr
    holder = json.loads(ceph.rbd("image-meta", "get", f"rbd/{name}", "isc.holder"))
    assert holder["name"] == "s1"


def test_a_claim_of_a_holder_out_of_form_is_refused_and_writes_nothing(ceph, tmp_path) -> None:
    """And a session named with more than 255 characters before ``isc create`` refused such
    names is named by the first 255 in the image's holder."""
    name = f"longname-{random.Random().getrandbits(32):08x}"
    image = ceph.create_image(name, SIZE)
    out_of_form = {"id": "00000000000000aa", "name": "n" * 256, "machine": "m"}
    why = rbd.claim(image, out_of_form)
    assert why is not None and "cannot be named its holder" in why, why
    listed = ceph.rbd("image-meta", "list", f"rbd/{name}")
    assert "isc.holder" not in listed, listed
    FileLUN.create(tmp_path / "source.img", SIZE).close()
    create_session(tmp_path / "s", str(tmp_path / "source.img"), granularity=G, name="n" * 255)
    made = tmp_path / "s" / METADATA
    made.write_text(made.read_text().replace("n" * 255, "n" * 300))  # as made before
    isc("add-dest", str(tmp_path / "s"), image, "--name", "img")
    holder = json.loads(ceph.rbd("image-meta", "get", f"rbd/{name}", "isc.holder"))
    assert holder["name"] == "n" * 255, holder
