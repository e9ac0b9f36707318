"""A single-node Ceph cluster for the RBD tests and benchmarks, from Debian's packages.

One monitor, one OSD whose object store lives in its memory (memstore), no
manager (RBD and snapshots work without one), no authentication, bound to
the loopback on free ports, every file under one directory. It starts in
about 7 s on two cores and takes about 70 MB of memory plus what is stored.

The monitor is tuned to commit its maps at once (``paxos propose interval``)
rather than once a second: snapshot creation and removal wait for a new map,
so the default would add up to a second to each. Its ``osd client watch
timeout`` is the default (30 s): an RBD client killed while it holds an
image's lock keeps it that long unless the lock is broken.

:func:`missing` names what is not installed; :class:`Cluster` runs one::

    with Cluster(directory) as cluster:
        uri = cluster.create_image("a", 16 << 20)   # rbd:rbd/a?conf=...
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from helpers import free_ports

TIMEOUT = 60.0
"""Seconds any one command of the cluster's setup may take."""

POOL = "rbd"

PACKAGES = {
    "ceph-mon": "ceph-mon",
    "monmaptool": "ceph-mon",  # Debian 12 ships it with the monitor
    "ceph-osd": "ceph-osd",
    "ceph": "ceph-common",
    "rbd": "ceph-common",
    "qemu-nbd": "qemu-utils",
    "qemu-img": "qemu-utils",
}
"""The commands the RBD tests run, and the Debian package of each."""


def missing() -> str | None:
    """Why the RBD tests cannot run here (the packages to install), or None."""
    absent = sorted({pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None})
    if absent:
        return f"the Ceph tests need the Debian packages {', '.join(absent)}"
    return None


class Cluster:
    """A cluster whose files live in ``directory`` (made if missing); see the module docstring.

    ``memstore_bytes`` caps what the OSD stores (in its memory).
    """

    def __init__(self, directory: Path, memstore_bytes: int = 2 << 30) -> None:
        self.directory = Path(directory)
        self.conf = self.directory / "ceph.conf"
        self.memstore_bytes = memstore_bytes
        self._daemons: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        """Make and start the cluster; return once the pool ``rbd`` takes images."""
        d = self.directory
        for sub in ("run", "log", "mon", "osd"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        v2, v1 = free_ports(2)
        mon = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
        self.conf.write_text(
            f"""[global]
fsid = {fsid}
mon host = {mon}
mon initial members = a
public network = 127.0.0.0/8
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
run dir = {d}/run
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 2
mon data avail crit = 1
paxos propose interval = 0.01
paxos min wait = 0.01

[mon]
admin socket = {d}/run/$name.asok

[osd]
admin socket = {d}/run/$name.asok

[client]
admin socket =
log file = {d}/log/client.log
"""
        )
        conf, monmap = str(self.conf), str(d / "monmap")
        self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", mon, monmap)
        self._run("ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", monmap)
        self._daemon("ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd = self._run("ceph", "-c", conf, "--connect-timeout", "30", "osd", "new", osd_uuid)
        osd_id = osd.stdout.strip()
        (d / "osd" / f"ceph-{osd_id}").mkdir()
        self._run("ceph-osd", "-c", conf, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        self._daemon("ceph-osd", "-i", osd_id)
        self._run("ceph", "-c", conf, "osd", "pool", "create", POOL, "8", "8")
        self.rbd("pool", "init", POOL)  # returns once the pool is active

    def _daemon(self, *args: str) -> None:
        with open(self.directory / "log" / f"{args[0]}.out", "ab") as out:
            proc = subprocess.Popen(
                [args[0], "-f", "-c", str(self.conf), *args[1:]],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        self._daemons.append(proc)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
        if done.returncode:
            raise RuntimeError(
                f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done

    def rbd(self, *args: str) -> str:
        """``rbd -c CONF ARGS``: its output; ``RuntimeError`` saying why it failed."""
        return self._run("rbd", "-c", str(self.conf), *args).stdout

    def rbd_json(self, *args: str):
        return json.loads(self.rbd(*args, "--format", "json"))

    def create_image(self, name: str, size: int) -> str:
        """A new image of ``size`` bytes (zeros) in the pool; return its isc URI."""
        self.rbd("create", "--size", f"{size}B", f"{POOL}/{name}")
        return self.uri(name)

    def uri(self, name: str) -> str:
        return f"rbd:{POOL}/{name}?conf={self.conf}"

    def qemu_uri(self, name: str) -> str:
        """The image as QEMU's tools name it (``qemu-img compare``)."""
        return f"rbd:{POOL}/{name}:conf={self.conf}"

    def snapshots(self, name: str) -> list[str]:
        """The names of the image's snapshots, oldest first, group snapshots' as their group's."""
        found = self.rbd_json("snap", "ls", "--all", f"{POOL}/{name}")
        return [
            s["namespace"].get("group snap", s["name"]) if "namespace" in s else s["name"]
            for s in sorted(found, key=lambda s: s["id"])
        ]

    def read(self, name: str) -> bytes:
        """The image's bytes, exported by ``rbd export`` (no isc code involved)."""
        return self._export(f"{POOL}/{name}")

    def _export(self, spec: str) -> bytes:
        done = subprocess.run(
            ["rbd", "-c", str(self.conf), "export", "--no-progress", spec, "-"],
            capture_output=True,
            timeout=TIMEOUT,
        )
        if done.returncode:
            raise RuntimeError(f"rbd export {spec} failed: {done.stderr.decode().strip()}")
        return done.stdout

    def stop(self) -> None:
        """Stop the daemons (SIGKILL: their state is thrown away) and remove the directory."""
        for proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.kill()
            proc.wait(TIMEOUT)
        self._daemons.clear()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def qemu_nbd_pids(image: str) -> list[int]:
    """The ``qemu-nbd`` processes exporting the pool's image ``image`` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and argv[0].endswith(b"qemu-nbd")
            and any(
                f'"image":"{image}"'.encode() in arg or f'"image": "{image}"'.encode() in arg
                for arg in argv
            )
        ):
            pids.append(int(entry))
    return pids
