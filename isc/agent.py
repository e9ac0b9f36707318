"""``isc agent``: a remote array that holds destinations and protects them on request.

A protection's snapshot data lives beside the export, in ``.NAME.snapshot``.

The agent exports every regular file in its directory over NBD (export name
= file name) and answers administrative requests on a control port. Writes
arriving over NBD to a protected export go through its protection snapshot
(:class:`isc.remote.Protection`), so a rollback can restore the image the
export had when it was protected.

Control protocol (:mod:`isc.control`: newline-delimited JSON over TCP). A
request is ``{"id": N, "op": OP, "export": NAME}`` with OP one of
``protect``, ``unprotect``, ``rollback``, ``status`` (and ``list``, which
needs no export). Every reply is ``{"id": N, "ok": true|false, "reason":
TEXT|null, "extents": [[offset, length], ...], "info": {...}}``
(``extents``: the byte ranges a rollback rewrote). An unknown export gets
``ok: false`` with the reason, like any bad request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from pathlib import Path

from isc.control import ControlServer, Op
from isc.lun import FileLUN, ForwardingLUN
from isc.remote import Protection

log = logging.getLogger(__name__)

EXPORT_OPS = ("protect", "unprotect", "rollback", "status")
"""The requests about one export (they name it in ``export``)."""


class Export(ForwardingLUN):
    """One exported LUN; its writes go through the protection while there is one."""

    def __init__(self, name: str, lun, snapshot_path: Path) -> None:
        super().__init__(lun)
        self.name = name
        self.snapshot_path = snapshot_path
        self.protection: Protection | None = None
        self._lock = threading.Lock()

    def write(self, offset: int, data) -> None:
        protection = self.protection
        (protection.front if protection else self.lun).write(offset, data)

    # -- requests ------------------------------------------------------------------
    def protect(self) -> dict:
        with self._lock:
            if self.protection is not None:
                return {"ok": True, "reason": "already protected"}
            self.protection = Protection(self.lun, path=str(self.snapshot_path))
            return {"ok": True}

    def unprotect(self) -> dict:
        with self._lock:
            if self.protection is None:
                return {"ok": True, "reason": "not protected"}
            protection, self.protection = self.protection, None
            protection.drop()
            return {"ok": True}

    def rollback(self) -> dict:
        with self._lock:
            if self.protection is None:
                return {"ok": False, "reason": f"{self.name} is not protected: no image to restore"}
            extents = self.protection.rollback()
            return {"ok": True, "extents": [list(e) for e in extents]}

    def status(self) -> dict:
        with self._lock:
            info = self.protection.info() if self.protection else {"protected": False}
            return {"ok": True, "info": {"size": self.size, **info}}


class Agent:
    """Serves the files of ``directory``: NBD exports plus the control protocol."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.exports = {
            path.name: Export(path.name, FileLUN(path), self.directory / f".{path.name}.snapshot")
            for path in sorted(self.directory.iterdir())
            if path.is_file() and not path.name.startswith(".")
        }
        ops: dict[str, Op] = {op: functools.partial(self._on_export, op) for op in EXPORT_OPS}
        ops["list"] = lambda _: {"ok": True, "info": {n: e.size for n, e in self.exports.items()}}
        self.control = ControlServer(ops, defaults={"extents": []})
        """Answers the control protocol (the module docstring)."""

    def _on_export(self, op: str, request: dict) -> dict:
        export = self.exports.get(request.get("export"))  # type: ignore[arg-type]
        if export is None:
            return {"ok": False, "reason": f"no export named {request.get('export')!r}"}
        reply = getattr(export, op)()
        log.info("%s %s: %s", op, export.name, reply.get("reason") or "ok")
        return reply

    def close(self) -> None:
        for export in self.exports.values():
            if export.protection is not None:
                export.protection.drop()
            export.close()


def run_agent(
    directory: str | Path,
    host: str,
    port: int,
    *,
    nbd_port: int | None = None,
    ready=None,
    stop: threading.Event | None = None,
) -> None:
    """Serve ``directory`` until ``stop`` is set (or the process is interrupted).

    Control requests on ``host:port``; the exports on NBD ports from
    ``nbd_port`` (default ``port + 1``) in file-name order, each at
    ``nbd://host:PORT/NAME`` (port 0: any free ports). ``ready(agent,
    control_port, uris)`` is called once everything listens.
    """
    from isc.nbd import NBDServer

    agent = Agent(directory)
    servers = []
    stop = stop or threading.Event()
    try:
        base = nbd_port if nbd_port is not None else port + 1
        uris = {}
        for offset, (name, export) in enumerate(agent.exports.items()):
            server = NBDServer(export, name=name)
            server.start(host, base + offset if base else 0)
            servers.append(server)
            uris[name] = server.uri
            log.info("export %s at %s", name, server.uri)

        async def main() -> None:
            control = await agent.control.listen(host, port)
            bound = control.sockets[0].getsockname()[1]
            log.info("control requests on %s:%d", host, bound)
            if ready is not None:
                ready(agent, bound, uris)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, stop.wait)
            await agent.control.shut(control)

        asyncio.run(main())
    finally:
        for server in servers:
            server.close()
        agent.close()
