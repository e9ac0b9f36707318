"""RBD destinations on a real single-node Ceph cluster (tests/ceph.py, one per test run).

* periodic updates to two RBD destinations under host writes: after each,
  every image equals the source at the mark (``qemu-img compare`` with an
  ``rbd:`` name), the protection snapshots exist during the copy and are gone
  after it;
* a copy cut short by a killed ``qemu-nbd``: the snapshot stays, ``isc
  rollback`` (no ``--site``) restores the image byte for byte, breaking the
  lock the dead ``qemu-nbd`` held, and the next ``isc update`` repairs it and
  drops the snapshot;
* ``isc update`` SIGKILLed mid-copy: the leftover snapshot is found, rolled
  back to, and reused (not replaced) by the next update;
* a consistency group of three images: one group snapshot, a failed copy of
  each, one group rollback to the previous cut;
* one image, two sessions: the second add-dest is refused naming the holder
  (the image's metadata), and once the first session lost it, its update fails
  for that image alone; a damaged holder value is refused, not taken as free;
* the site's own failures (an unknown destination, a timeout, a group
  rollback asked for part of a group), the URI form, the private export.

Without the cluster: :class:`~isc.remote.RoutingSite`, the group requests of
the update workflow, and an abandoned update that keeps a protection left by
a failed one.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import threading
import time
from functools import partial
from pathlib import Path

import pytest
from ceph import qemu_nbd_pids
from helpers import TIMEOUT, HookLUN, Writers, fill_random, session_file
from test_crash import ISC
from test_serve import Export

from isc import DestState, FileLUN, MemoryLUN, ParameterError, Session
from isc.copy import Destination
from isc.lun import ReconnectingLUN
from isc.rbd import RBDLUN, RBDImage, RBDSite, snapshot_name, stop_exports
from isc.remote import Ack, LocalSite, RoutingSite
from isc.store import Progress, create_session, open_session, update
from isc.update import PeriodicUpdate, UpdateError, rollback_group

SIZE = 16 << 20
G = 65536
IO = 256 << 10  # several runs per copy, each flushed (flush_every): a kill lands between them


def isc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*ISC, *args], capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def scribble(write, rng: random.Random, count: int = 24) -> None:
    """``count`` random writes of 4 KiB to 200 KiB, spread over the whole source."""
    for _ in range(count):
        length = rng.randrange(4096, 200 << 10)
        write(rng.randrange(SIZE - length), rng.randbytes(length))


def same_image(ceph, name: str, image: bytes, tmp_path: Path) -> bool:
    """Whether the cluster's image ``name`` holds ``image`` (``qemu-img compare``)."""
    expected = tmp_path / "expected.img"
    expected.write_bytes(image)
    done = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected), ceph.qemu_uri(name)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


def wait_no_export(image: str) -> None:
    """Wait (bounded) until no ``qemu-nbd`` exports ``image``: a killed isc's ends by itself."""
    deadline = time.monotonic() + TIMEOUT
    for pid in qemu_nbd_pids(image):
        try:
            exited = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # gone already
        try:  # a pidfd is readable once its process has exited
            ready, _, _ = select.select([exited], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(exited)
        assert ready, f"a qemu-nbd of {image} outlived its client"


@pytest.fixture
def names(request) -> list[str]:
    """Image names of this test: unique in the shared cluster."""
    base = re.sub(r"\W", "", request.node.name)[-40:]
    return [f"{base}-{i}" for i in range(3)]


def replicated(ceph, tmp_path: Path, images: list[str], seed: int) -> tuple[Path, bytes]:
    """A session on a random source file with the RBD ``images`` as destinations
    (``isc add-dest``), made consistent by one ``isc update``; its state dir and source."""
    with FileLUN.create(tmp_path / "source.img", SIZE) as source:
        data = fill_random(source, random.Random(seed))
    state = tmp_path / "state"
    create_session(state, str(tmp_path / "source.img"), granularity=G)
    for image in images:
        isc("add-dest", str(state), ceph.create_image(image, SIZE), "--name", image)
    isc("update", str(state))
    for image in images:
        assert ceph.snapshots(image) == [] and ceph.read(image) == data
    return state, data


def test_periodic_updates_to_two_rbd_images_under_host_writes(ceph, tmp_path, names):
    state, _ = replicated(ceph, tmp_path, names[:2], seed=1)
    stored, _ = open_session(state)
    with stored:
        session = stored.session
        cuts: list[bytes] = []
        mark = session.mark

        def marking(full: bool = False) -> int:
            generation = mark(full)
            # The update's mark freezes host writes until every session is marked.
            cuts.append(session.source.read(0, SIZE))
            return generation

        session.mark = marking  # type: ignore[method-assign]
        during: list[list[list[str]]] = []

        def write(writer: int, seq: int, rng: random.Random) -> None:
            scribble(session.write, rng, 1)

        with Writers(write, 2, seed=7) as writers:

            def look(done: int, total: int) -> None:  # after each run of each copy
                if len(during) < len(cuts):
                    during.append([ceph.snapshots(name) for name in names[:2]])
                    writers.allow(20)  # host writes during the copy: COFW

            site = stored.site(LocalSite())  # in the session's name, its images' holder
            progress = Progress(stored, also=look, bar=False)
            workflow = PeriodicUpdate(
                session, stored.destinations, site, io_size=IO, flush_every=IO, progress=progress
            )
            for _ in range(3):
                writers.allow(20)
                writers.wait_done(writers.total_done + 10)  # and before the mark, and during it
                update(stored, workflow, progress)
                snapshot = f"isc-{session.name}-{session.generation}"
                assert during[-1] == [[snapshot], [snapshot]]
                for name in names[:2]:
                    assert ceph.snapshots(name) == []
                    assert same_image(ceph, name, cuts[-1], tmp_path)
                writers.settle()
        assert len(set(cuts)) == 3  # the host wrote between the updates
        assert all(d.state is DestState.CONSISTENT for d in stored.destinations)


def test_a_copy_cut_short_by_a_killed_qemu_nbd_is_rolled_back_and_repaired(ceph, tmp_path, names):
    state, before = replicated(ceph, tmp_path, names[:2], seed=2)
    d1, d2 = names[:2]
    stored, _ = open_session(state)
    with stored:
        session = stored.session
        scribble(session.write, random.Random(3))
        killed: list[int] = []

        def kill(done: int, total: int) -> None:
            if done >= 2 * IO and not killed:  # two runs are on d1, flushed
                killed.extend(qemu_nbd_pids(d1))
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)

        site = stored.site(LocalSite())  # in the session's name, its images' holder
        progress = Progress(stored, also=kill, bar=False)
        workflow = PeriodicUpdate(
            session, stored.destinations, site, io_size=IO, flush_every=IO, progress=progress
        )
        with pytest.raises(UpdateError, match=f"{d1} .*stays protected"):
            update(stored, workflow, progress)
        assert len(killed) == 1
        snapshot = f"isc-{session.name}-{session.generation}"
        after = session.source.read(0, SIZE)
        dest = stored.destinations[0]
        # What a rollback rewrites is what the copy wrote: the site lists at least that.
        status = site.status(dest)
        assert status.ok and status.info["protected"] and status.info["snapshot"].endswith(snapshot)
        held = ceph.read(d1)
        assert held != before
        for offset, length in status.info["extents"]:
            held = held[:offset] + before[offset : offset + length] + held[offset + length :]
        assert held == before
    assert ceph.snapshots(d1) == [snapshot] and ceph.snapshots(d2) == []
    assert ceph.rbd_json("lock", "ls", f"rbd/{d1}")  # the dead qemu-nbd's
    report = json.loads(isc("status", str(state), "--json").stdout)
    assert [d["state"] for d in report["destinations"]] == ["inconsistent", "consistent"]

    done = isc("rollback", str(state), d1)
    assert f"rolled back {d1}" in done.stdout
    assert ceph.read(d1) == before
    assert ceph.snapshots(d1) == [snapshot]  # a rollback keeps the protection
    assert ceph.rbd_json("lock", "ls", f"rbd/{d1}") == []

    isc("update", str(state))
    assert ceph.read(d1) == ceph.read(d2) == after
    assert ceph.snapshots(d1) == []
    report = json.loads(isc("status", str(state), "--json").stdout)
    assert [d["state"] for d in report["destinations"]] == ["consistent", "consistent"]


def test_sigkill_of_isc_update_leaves_a_snapshot_that_is_rolled_back_to_and_reused(
    ceph, tmp_path, names
):
    # A second destination, an NBD export of this process, kills isc at its Nth write.
    export = Export(tmp_path / "t.sock", HookLUN(FileLUN.create(tmp_path / "t.img", SIZE)))
    export.start()
    try:
        with FileLUN.create(tmp_path / "source.img", SIZE) as source:
            fill_random(source, random.Random(4))
        state = tmp_path / "state"
        create_session(state, str(tmp_path / "source.img"), granularity=G, name="s")
        (d,) = names[:1]
        isc("add-dest", str(state), ceph.create_image(d, SIZE), "--name", d)
        isc("add-dest", str(state), export.uri, "--name", "t")
        isc("update", str(state))
        before = ceph.read(d)
        stored, _ = open_session(state)
        with stored:
            scribble(stored.session.write, random.Random(5))
            after = stored.source.read(0, SIZE)
        pid = threading.Event()
        proc: list[subprocess.Popen] = []
        first = export.lun.writes + 1

        def kill_at_second(n: int, offset: int, data) -> None:
            if n == first + 1:
                assert pid.wait(TIMEOUT)
                os.kill(proc[0].pid, signal.SIGKILL)

        export.lun.before_write = kill_at_second
        proc.append(subprocess.Popen([*ISC, "update", str(state)], stderr=subprocess.PIPE))
        pid.set()
        _, err = proc[0].communicate(timeout=TIMEOUT)
        assert proc[0].returncode == -signal.SIGKILL, err
        export.lun.before_write = None
        wait_no_export(d)
        (snapshot,) = ceph.snapshots(d)
        assert re.fullmatch(r"isc-s-\d+", snapshot)

        isc("rollback", str(state), d)
        assert ceph.read(d) == before
        seen: list[list[str]] = []
        export.lun.before_write = lambda n, offset, data: seen or seen.append(ceph.snapshots(d))
        isc("update", str(state))
        assert seen == [[snapshot]]  # the leftover protection, not a newer one
        assert ceph.snapshots(d) == [] and ceph.read(d) == after
    finally:
        export.stop()
        export.lun.close()


def rbd_destination(ceph, name: str, size: int = SIZE) -> Destination:
    """A destination on a new image, opened as the store opens one (reconnecting)."""
    uri = ceph.create_image(name, size)
    lun = ReconnectingLUN(partial(RBDLUN, uri), size, f"destination {name}")
    return Destination(HookLUN(lun), name)


def test_a_group_of_three_images_is_protected_and_rolled_back_as_one(ceph, tmp_path, names):
    site = RBDSite()
    members = []
    for i, name in enumerate(names):
        session = Session(MemoryLUN(SIZE), G, name=f"vol{i}")
        fill_random(session.source, random.Random(10 + i))
        dest = rbd_destination(ceph, name)
        site.add(name, ceph.uri(name), session)
        members.append((session, [dest]))
    dests = [dest for _, (dest,) in members]
    workflow = PeriodicUpdate.group(members, site, io_size=IO, flush_every=IO)
    try:
        workflow.run()
        group = ceph.rbd_json("group", "image", "list", "rbd/isc-vol0")
        assert sorted(m["image"] for m in group) == sorted(names)
        assert [ceph.snapshots(name) for name in names] == [[], [], []]
        previous = [ceph.read(name) for name in names]
        assert previous == [s.source.read(0, SIZE) for s, _ in members]

        rng = random.Random(11)
        seen: list[list[list[str]]] = []
        for (session, _), dest in zip(members, dests, strict=True):
            scribble(session.write, rng)
            dest.lun.fail_at = dest.lun.writes + 2  # the first run lands, the second fails
        dests[0].lun.before_write = lambda *_: (
            seen or seen.append([ceph.snapshots(name) for name in names])
        )
        with pytest.raises(UpdateError, match="do not hold one point in time"):
            workflow.run()
        snapshot = snapshot_name(members[0][0])
        assert seen == [[[snapshot]] * 3]  # one group snapshot, taken before the copies
        assert all(d.state is DestState.INCONSISTENT for d in dests)
        assert all(ceph.read(name) != old for name, old in zip(names, previous, strict=True))

        refused = site.rollback(dests[1])
        assert not refused.ok and "roll them back together" in refused.reason
        acks = rollback_group([(s, d) for s, (d,) in members], site)
        assert all(ack.ok for ack in acks)
        assert [ceph.read(name) for name in names] == previous
        assert all(d.state is DestState.CONSISTENT for d in dests)
        for (session, _), ack in zip(members, acks, strict=True):
            assert ack.extents == ((0, SIZE),)  # unknown after a group snapshot: all of it
            assert session.bitmap.tracking_count == session.bitmap.chunks

        for dest in dests:
            dest.lun.fail_at = None
        dests[0].lun.before_write = None
        workflow.run()
        assert [ceph.read(name) for name in names] == [s.source.read(0, SIZE) for s, _ in members]
        assert [ceph.snapshots(name) for name in names] == [[], [], []]
    finally:
        for dest in dests:
            dest.lun.close()


def test_a_group_snapshot_stays_until_every_image_it_holds_is_unprotected(ceph, names):
    site = RBDSite()
    sessions = [Session(MemoryLUN(SIZE), G, name=f"g{i}") for i in range(2)]
    dests = [rbd_destination(ceph, name) for name in names[:2]]
    for session, name in zip(sessions, names, strict=False):
        session.mark()
        site.add(name, ceph.uri(name), session)
    try:
        assert all(ack.ok for ack in site.protect_group(dests))
        snapshot = snapshot_name(sessions[0])
        assert site.unprotect(dests[0]).ok
        assert ceph.snapshots(names[0]) == [snapshot]  # d1 still needs it
        # A member protected again (its next update) needs it again: its claim returns.
        assert (
            site.protect(dests[0]).reason
            == f"already protected by the group snapshot rbd/isc-g0@{snapshot}"
        )
        assert site.unprotect(dests[1]).ok
        assert ceph.snapshots(names[1]) == [snapshot]
        assert site.unprotect(dests[0]).ok
        assert [ceph.snapshots(name) for name in names[:2]] == [[], []]
    finally:
        for dest in dests:
            dest.lun.close()


def test_the_site_answers_failures_with_acks(ceph, names):
    session = Session(MemoryLUN(SIZE), G, name="f")
    session.mark()
    site = RBDSite()
    name = names[0]
    site.add(name, ceph.create_image(name, SIZE), session)
    dest = Destination(MemoryLUN(SIZE), name)
    stranger = Destination(MemoryLUN(SIZE), "stranger")
    ack = site.protect(stranger)
    assert not ack.ok and ack.reason == ("stranger is not an RBD destination of this site")
    assert not site.rollback(dest).ok and "is not protected" in site.rollback(dest).reason
    impatient = RBDSite(timeout=0.001)
    impatient.add(name, ceph.uri(name), session)
    ack = impatient.protect(dest)
    assert not ack.ok and ack.outcome_unknown and "did not finish within 0.001 s" in ack.reason
    gone = RBDSite()
    gone.add(name, ceph.uri("no-such-image"), session)
    ack = gone.protect(dest)
    assert not ack.ok and not ack.outcome_unknown
    assert ack.reason.startswith("rbd snap ls rbd/no-such-image: error opening image")
    assert ceph.snapshots(name) == []


def test_an_rbd_lun_runs_a_private_qemu_nbd_that_ends_with_it(ceph, names):
    uri = ceph.create_image(names[0], 1 << 20)
    with RBDLUN(uri) as lun:
        assert len(qemu_nbd_pids(names[0])) == 1
        directory = Path(lun.process.args[4]).parent  # type: ignore[union-attr]
        assert directory.stat().st_mode & 0o777 == 0o700
        assert (directory / "nbd.sock").stat().st_mode & 0o777 == 0o600
        lun.write(4096, b"x" * 4096)
        lun.flush()
        assert stop_exports(RBDImage.parse(uri)) == 1
        assert lun.closed and lun.process.returncode == 0  # type: ignore[union-attr]
    assert not directory.exists() and qemu_nbd_pids(names[0]) == []
    assert ceph.read(names[0])[4096:8192] == b"x" * 4096
    with RBDLUN(uri) as lun:
        lun.write_zeroes(0, 1 << 20)  # the whole object: freed, the image stays thin
    assert ceph.rbd_json("diff", f"rbd/{names[0]}") == []
    with pytest.raises(OSError, match=r"image rbd/no-such: error reading header .* directory$"):
        RBDLUN(ceph.uri("no-such"))


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("nbd://x", "does not start with rbd:"),
        ("rbd:pool", "image name '' is empty"),
        ("rbd:/image", "pool name '' is empty"),
        ("rbd:pool/ns/image", "image name 'ns/image'"),
        ("rbd:pool/image@snap", "image name 'image@snap'"),
        ("rbd:pool/image?conf=ceph.conf", "conf=ceph.conf is not an absolute path"),
        ("rbd:pool/image?user=admin", "'user=admin' is not one conf=PATH"),
        ("rbd:pool/image?conf=/a&conf=/b", "'conf=/b' is not one conf=PATH"),
    ],
)
def test_an_rbd_uri_must_be_rbd_pool_image_with_an_absolute_conf(uri, problem):
    with pytest.raises(ParameterError, match=re.escape(problem)):
        RBDImage.parse(uri)


def test_an_rbd_uri_names_its_image_and_cluster():
    image = RBDImage.parse("rbd:p/vm-1_disk.0?conf=/etc/ceph/a%20b.conf")
    assert image == RBDImage("p", "vm-1_disk.0", "/etc/ceph/a b.conf")
    assert RBDImage.parse("rbd:p/i").uri == "rbd:p/i" and RBDImage.parse("rbd:p/i").conf is None


def test_isc_add_dest_refuses_a_bad_rbd_destination_and_changes_nothing(ceph, tmp_path, names):
    FileLUN.create(tmp_path / "source.img", SIZE).close()
    state = tmp_path / "state"
    create_session(state, str(tmp_path / "source.img"), granularity=G)
    open_session(state)[0].close()  # the first open records its checkpoint
    meta = session_file(state)
    small = ceph.create_image(names[0], SIZE // 2)
    for target, error in [
        ("rbd:rbd/x?conf=relative.conf", "conf=relative.conf is not an absolute path"),
        (ceph.uri("no-such-image"), "error reading header from no-such-image"),
        (small, f"holds {SIZE // 2} bytes, less than the source's {SIZE}"),
    ]:
        done = isc("add-dest", str(state), target, check=False)
        assert done.returncode == 1 and error in done.stderr and done.stderr.count("\n") == 1
        assert session_file(state) == meta
    image = ceph.create_image(names[1], SIZE)
    isc("add-dest", str(state), image, "--name", "a")
    other = image.replace(f"conf={ceph.conf}", f"conf={ceph.conf.parent}/./ceph.conf")
    done = isc("add-dest", str(state), other, "--name", "b", check=False)
    assert done.returncode == 1 and "is already destination a" in done.stderr
    done = isc("rollback", str(state), "a", check=False)
    assert done.returncode == 1 and "rollback of a failed: a is not protected" in done.stderr


def test_an_image_is_the_destination_of_one_session_at_a_time(ceph, tmp_path, names):
    """Rule 12 across sites: the image's metadata names the session that added it; another
    session's add-dest is refused, and once the operator let the image go and the other
    took it, the first one's update fails for that image alone (its local destination is
    copied) and never calls it consistent."""
    states, sources = [], []
    for k in range(2):
        source = tmp_path / f"source{k}.img"
        with FileLUN.create(source, SIZE) as lun:
            fill_random(lun, random.Random(k))
        sources.append(source.read_bytes())
        create_session(tmp_path / f"s{k}", str(source), granularity=G)
        states.append(tmp_path / f"s{k}")
    image = ceph.create_image(names[0], SIZE)
    FileLUN.create(tmp_path / "local.img", SIZE).close()
    isc("add-dest", str(states[0]), str(tmp_path / "local.img"), "--name", "local")
    isc("add-dest", str(states[0]), image, "--name", "img")
    done = isc("add-dest", str(states[1]), image, "--name", "img", check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "is held by session s0 on " in done.stderr
    assert f"rbd image-meta remove rbd/{names[0]} isc.holder" in done.stderr
    assert session_file(states[1])["destinations"] == []
    isc("update", str(states[0]))
    assert ceph.read(names[0]) == sources[0]

    ceph.rbd("image-meta", "remove", f"rbd/{names[0]}", "isc.holder")  # the operator's way
    isc("add-dest", str(states[1]), image, "--name", "img")
    isc("update", str(states[1]))
    failed = isc("update", str(states[0]), check=False)
    assert failed.returncode == 1 and "is held by session s1 on " in failed.stderr
    recorded = {d["name"]: d["state"] for d in session_file(states[0])["destinations"]}
    assert recorded == {"local": "consistent", "img": "new"}
    assert ceph.read(names[0]) == sources[1] and ceph.snapshots(names[0]) == []

    done = isc("remove-dest", str(states[1]), "img", "--json")
    assert json.loads(done.stdout)["released"] is True
    ceph.rbd("image-meta", "set", f"rbd/{names[0]}", "isc.holder", '{"id": 7')  # damaged
    failed = isc("update", str(states[0]), check=False)
    assert failed.returncode == 1 and "isc.holder is damaged" in failed.stderr, failed.stderr
    ceph.rbd("image-meta", "remove", f"rbd/{names[0]}", "isc.holder")
    isc("update", str(states[0]))  # a session of before holders claims at its protect
    assert ceph.read(names[0]) == sources[0]
    holder = json.loads(ceph.rbd("image-meta", "get", f"rbd/{names[0]}", "isc.holder"))
    assert holder["name"] == "s0"


# -- without the cluster: routing and group requests --------------------------------------


class Recorder(LocalSite):
    """A LocalSite that records its requests, with group requests of its own when ``groups``."""

    def __init__(self, groups: bool) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[str]]] = []
        if groups:
            self.protect_group = partial(self._group, "protect")
            self.rollback_group = partial(self._group, "rollback")

    def _group(self, request: str, dests, timeout=None) -> list[Ack]:
        self.calls.append((f"{request}_group", [d.name for d in dests]))
        return [getattr(LocalSite, request)(self, d, timeout) for d in dests]

    def protect(self, dest, timeout=None) -> Ack:
        self.calls.append(("protect", [dest.name]))
        return super().protect(dest, timeout)


def test_a_routing_site_sends_each_destination_to_its_site_and_groups_as_one():
    grouped, single = Recorder(groups=True), Recorder(groups=False)
    site = RoutingSite({"a": grouped, "b": grouped}, single)
    dests = [Destination(MemoryLUN(G), name) for name in "abc"]
    assert site.protect(dests[2]).ok and single.calls == [("protect", ["c"])]
    acks = site.protect_group(dests)
    assert [a.reason for a in acks] == [None, None, "already protected"]
    assert grouped.calls == [("protect_group", ["a", "b"])]
    assert single.calls == [("protect", ["c"]), ("protect", ["c"])]
    assert all(site.status(d).info["protected"] for d in dests)


def test_a_group_update_protects_and_rolls_back_with_one_group_request_each():
    site = Recorder(groups=True)
    members = []
    for i in range(3):
        session = Session(MemoryLUN(SIZE), G, name=f"s{i}")
        fill_random(session.source, random.Random(i))
        members.append((session, [Destination(HookLUN(MemoryLUN(SIZE)), f"d{i}")]))
    workflow = PeriodicUpdate.group(members, site, io_size=IO)
    workflow.run()
    assert site.calls == [("protect_group", ["d0", "d1", "d2"])]
    for session, (dest,) in members:
        session.write(0, b"new")
        dest.lun.fail_at = dest.lun.writes + 1
    with pytest.raises(UpdateError):
        workflow.run()
    acks = rollback_group([(s, d) for s, (d,) in members], site)
    assert site.calls[-1] == ("rollback_group", ["d0", "d1", "d2"]) and all(a.ok for a in acks)
    assert all(d.state is DestState.CONSISTENT for _, (d,) in members)
    # A single session's update protects its destinations one by one.
    PeriodicUpdate(*members[0], site).run()
    assert site.calls[-1] == ("protect", ["d0"])


def test_an_abandoned_update_keeps_a_protection_left_by_a_failed_one():
    # d0's copy failed: its protection holds its last consistent image. When the
    # next update is abandoned because d1 cannot be protected, undoing the
    # protections it took must not drop d0's: d0 still holds a mix.
    site = Recorder(groups=False)
    session = Session(MemoryLUN(SIZE), G, name="s")
    fill_random(session.source, random.Random(1))
    dests = [Destination(HookLUN(MemoryLUN(SIZE)), f"d{i}") for i in range(2)]
    PeriodicUpdate(session, dests, site, io_size=IO).run()
    session.write(0, b"new")
    dests[0].lun.fail_at = dests[0].lun.writes + 1
    with pytest.raises(UpdateError):
        PeriodicUpdate(session, dests, site, io_size=IO).run()
    assert dests[0].state is DestState.INCONSISTENT and site.status(dests[0]).info["protected"]
    refuse = site.protect

    def protect(dest, timeout=None) -> Ack:
        return Ack(0, False, "no room") if dest.name == "d1" else refuse(dest, timeout)

    site.protect = protect  # type: ignore[method-assign]
    with pytest.raises(UpdateError, match="cannot protect d1: no room"):
        PeriodicUpdate(session, dests, site, io_size=IO).run()
    assert site.status(dests[0]).info["protected"]
    assert dests[0].protected_state is DestState.CONSISTENT
    acks = rollback_group([(session, dests[0])], site)
    assert acks[0].ok and dests[0].state is DestState.CONSISTENT
