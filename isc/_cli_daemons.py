"""``isc serve`` and ``isc agent``: the long-running commands.

Each prints one line per address it listens on, then ``ready`` (with
``--json``: one JSON line saying all that), and runs until SIGINT or SIGTERM,
when it stops cleanly (a persistent session is checkpointed and closed).
``serve --every`` prints one timestamped line per update, as ``isc update
--every`` does (:func:`isc.commands.report`).

``isc release ADDRESS EXPORT`` is the agent operator's: it lets an export go from the
session that holds it (:mod:`isc.agent`) once that session is gone.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
from pathlib import Path

from isc import _cli_auth, store
from isc._cli_auth import _at_least_one
from isc._cli_tools import _positive, _size
from isc._units import format_bytes, parse_size
from isc.commands import _site as host_port
from isc.commands import (
    _timeout_argument,
    agent_site,
    check_sites,
    print_json,
    print_lines,
    report,
    site_address,
    timestamp,
    unix_path,
)
from isc.copy import Destination
from isc.errors import StateError
from isc.nbd.proto import MAX_BLOCK
from isc.nbd.server import MAX_DATA, MAX_REQUESTS
from isc.remote import holder_text, is_holder


def listen_address(text: str) -> tuple[str, int]:
    """HOST:PORT to listen on; port 0 picks a free port."""
    if text.endswith(":0"):
        return host_port(text[:-1] + "1")[0], 0
    return host_port(text)


def control_address(text: str) -> tuple[str, int] | str:
    """HOST:PORT as :func:`listen_address`, or unix:PATH (the socket's path)."""
    return unix_path(text) if text.startswith("unix:") else listen_address(text)


def add_commands(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="export a source over NBD with an isc session on its write path",
        description="Export SOURCE (a session directory, or a LUN path or URI) over NBD: "
        "every write an NBD client makes is a tracked host write.",
    )
    serve.add_argument("source", help="a session directory, or a LUN file, device or NBD URI")
    serve.add_argument(
        "--listen",
        type=control_address,
        default=("127.0.0.1", 10809),
        metavar="HOST:PORT|unix:PATH",
        help="NBD address (default 127.0.0.1:10809); a Unix socket is made mode 0600, in a "
        "directory that must be yours alone",
    )
    serve.add_argument(
        "--granularity",
        type=parse_size,
        default=65536,
        help="chunk size of an ephemeral session (default 64K)",
    )
    serve.add_argument(
        "--every",
        type=_positive,
        metavar="SECONDS",
        help="run periodic updates of a session directory's destinations (each recorded "
        "in it and printed on a timestamped line, as isc update does; an NBD destination "
        "that is down is retried later)",
    )
    serve.add_argument(
        "--site",
        type=site_address,
        metavar="HOST:PORT|unix:PATH",
        help="the destinations' isc agent, its control port or Unix socket (default: protect "
        "in this process)",
    )
    serve.add_argument(
        "--control",
        type=control_address,
        metavar="HOST:PORT|unix:PATH",
        help="answer status/mark/unmark/copy requests (newline-delimited JSON) here; a Unix "
        "socket is made mode 0600, in a directory that must be yours alone",
    )
    _json_option(serve)
    _switch_option(serve)
    _cli_auth.add_server_options(serve)
    _limit_options(serve)
    serve.set_defaults(daemon="serve")
    agent = commands.add_parser(
        "agent",
        help="a remote array: export the LUN files of a directory, protect them on request",
        description="Export every regular file of DIR over NBD (ports from the control port "
        "+ 1, in name order; no symlinks, subdirectories or dotfiles) and answer "
        "protect/unprotect/rollback/status requests (newline-delimited JSON) on the control "
        "port. Protections are kept in DIR/.isc-agent and survive a restart.",
    )
    agent.add_argument(
        "--listen",
        type=control_address,
        required=True,
        metavar="HOST:PORT|unix:PATH",
        help="control address; a Unix socket is made mode 0600, in a directory that must be "
        "yours alone, and the exports listen on 127.0.0.1",
    )
    agent.add_argument("--dir", required=True, help="directory of LUN files to export")
    agent.add_argument(
        "--nbd-port",
        type=int,
        help="first NBD port (default: control port + 1; beside unix:PATH, 10809)",
    )
    _json_option(agent)
    _switch_option(agent)
    _cli_auth.add_server_options(agent)
    _limit_options(agent)
    agent.set_defaults(daemon="agent")
    release = commands.add_parser(
        "release",
        help="let an isc agent's export go from the session that holds it",
        description="An agent's export is the destination of one session at a time: the "
        "session that added it (isc add-dest --site) holds it until isc remove-dest. When "
        "that session is gone (its state directory lost), this lets the export go, "
        "whichever session held it, so another may add it. Ask only when no session "
        "copies into it any more. It says which session held it, that none did, or that "
        "its holder record was damaged (--json: released, the holder or null, and "
        "damaged). The agent answers authenticated clients only when it has credentials "
        "(--tls-creds, --secret-file).",
    )
    release.add_argument(
        "site", type=site_address, metavar="HOST:PORT|unix:PATH", help="the agent's --listen"
    )
    release.add_argument("export", metavar="EXPORT", help="the export's name")
    _timeout_argument(release, "of the agent")
    release.add_argument("--json", action="store_true", help="print the report as JSON")
    _cli_auth.add_client_options(release)
    release.set_defaults(daemon="release")


SWITCH_INTERVAL_MS = 0.5
"""The interpreter's switch interval in ``isc serve`` and ``isc agent``, in milliseconds
(Python's own is 5): benchmarks/README.md, "Host write stalls during a copy"."""


def _switch_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--switch-interval",
        type=_positive,
        default=SWITCH_INTERVAL_MS,
        metavar="MS",
        help="how long a thread waits for Python's interpreter lock before it asks the "
        "thread holding it to hand it over, in milliseconds; shorter, the host's writes "
        f"wait less behind a running copy (default {SWITCH_INTERVAL_MS:g}; Python's own is 5)",
    )


def _limit_options(parser: argparse.ArgumentParser) -> None:
    """``--max-data`` and ``--max-requests``, the NBD limits beside ``--max-clients``."""
    group = parser.add_argument_group("limits on NBD clients, per export (README: Securing isc)")
    group.add_argument(
        "--max-data",
        type=_max_data,
        default=MAX_DATA,
        metavar="SIZE",
        help="WRITE payloads and READ replies held at once, all clients together; a request "
        f"beyond it waits (at least 32M; default {format_bytes(MAX_DATA)})",
    )
    group.add_argument(
        "--max-requests",
        type=_at_least_one,
        default=MAX_REQUESTS,
        metavar="N",
        help=f"requests in flight at once, all clients together (default {MAX_REQUESTS})",
    )


def _max_data(text: str) -> int:
    value = _size(text)
    if value < MAX_BLOCK:
        raise argparse.ArgumentTypeError(
            f"{text!r} is too small: give at least 32M, the largest NBD WRITE"
        )
    return value


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print what it says as JSON lines: one when ready "
        '({"ready": true, "exports": {NAME: URI}, "control": ADDRESS}), one per update',
    )


def _ready(args: argparse.Namespace, exports: dict[str, str], control: str | None) -> None:
    """Say that the exports and the control port listen: as JSON, or as one line each
    (``export NAME URI``, ``control ADDRESS``) and then ``ready``."""
    if args.json:
        print_json({"ready": True, "exports": exports, "control": control})
        sys.stdout.flush()
    else:
        lines = [f"export {name} {uri}" for name, uri in exports.items()]
        print_lines(*lines, *([f"control {control}"] if control is not None else []), "ready")


def _release(args: argparse.Namespace) -> int:
    """``isc release``: the agent lets the export go, whoever held it."""
    site = agent_site(args.site, _cli_auth.client_credentials(args))
    ack = site.release(Destination(None, args.export), args.timeout, force=True)
    if not ack.ok:
        done = "it may have been done: ask again" if ack.outcome_unknown else "nothing changed"
        raise StateError(f"release of {args.export} at {site.where} failed: {ack.reason}; {done}")
    # The agent's reply names the holder it let go; null when its record was damaged (which
    # session held it could not be told), and no holder at all when none held the export.
    was = ack.info["holder"] if is_holder(ack.info.get("holder")) else None
    damaged = "holder" in ack.info and was is None
    if args.json:
        record = {"site": site.where, "export": args.export, "released": was, "damaged": damaged}
        print_json(record)
        return 0
    if damaged:
        held = " (its holder record was damaged: which session held it could not be told)"
    else:
        held = f" from {holder_text(was)}" if was is not None else " (no session held it)"
    print(f"released {args.export} at {site.where}{held}: the next session to add it holds it")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.daemon == "release":
        return _release(args)
    # Set here, not in run_serve or run_agent: a library leaves the settings
    # of its embedder's whole process alone.
    sys.setswitchinterval(args.switch_interval / 1000)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if args.daemon == "serve":
        from isc.serve import run_serve

        def served(session, uri: str, control_port: int | None) -> None:
            # What exists now lives as long as the server: out of the collector's
            # way, a full collection no longer pauses the host's writes for 5-9 ms.
            gc.collect()
            gc.freeze()
            control = None
            if isinstance(args.control, str):
                control = f"unix:{args.control}"
            elif control_port is not None:
                control = f"{args.control[0]}:{control_port}"
            _ready(args, {session.name: uri}, control)

        def updated(stored, result, failure: str | None) -> None:
            report(stored, result, args.json, timestamp(), failure)

        unix = args.listen if isinstance(args.listen, str) else None
        host, port = (None, 0) if unix is not None else args.listen
        control_host = args.control[0] if isinstance(args.control, tuple) else None
        tls, credentials = _cli_auth.server_security(args, "isc serve", host, control_host)
        # Every agent (--site, and the destinations' own) is reached with the
        # client's end of the same credentials.
        site_credentials = _cli_auth.client_credentials(args)
        site = agent_site(args.site, site_credentials) if args.site else None
        if args.every and (Path(args.source) / store.METADATA).exists():
            # As isc update: refused, before serving, when --site is not a destination's own.
            check_sites(args.site, store.read_state(args.source).meta["destinations"])
        run_serve(
            args.source,
            host,
            port,
            unix=unix,
            granularity=args.granularity,
            every=args.every,
            site=site,
            site_credentials=site_credentials,
            control=args.control,
            ready=served,
            stop=stop,
            tls=tls,
            credentials=credentials,
            insecure=args.insecure,
            limits=_limits(args),
            updated=updated,
        )
        return 0
    from isc.agent import run_agent

    def listening(agent, control_port: int | None, uris: dict) -> None:
        control = f"unix:{args.listen}" if control_port is None else None
        _ready(args, uris, control or f"{args.listen[0]}:{control_port}")

    unix = isinstance(args.listen, str)  # the exports then listen on loopback
    host = "127.0.0.1" if unix else args.listen[0]
    tls, credentials = _cli_auth.server_security(args, "isc agent", host, None if unix else host)
    run_agent(
        args.dir,
        args.listen,
        nbd_port=args.nbd_port,
        ready=listening,
        stop=stop,
        tls=tls,
        credentials=credentials,
        limits=_limits(args),
        insecure=args.insecure,
    )
    return 0


def _limits(args: argparse.Namespace) -> dict[str, int]:
    """The NBD exports' limits given on the command line, as NBDServer's keyword arguments."""
    return {name: getattr(args, name) for name in ("max_clients", "max_data", "max_requests")}
