"""The session commands of the ``isc`` command line, on persistent sessions (:mod:`isc.store`).

SESSION is a state directory. A command opens it, does one thing and closes
it (a clean close checkpoints the bitmaps exactly), so each command is one
process holding the session's lock; another command on the same session
meanwhile fails with "in use by another isc process". While ``isc serve``
holds it (:func:`isc.serve.served_by`), ``status``, ``mark``, ``unmark`` and
``copy`` send their request to its control port (an unauthenticated one: a
Unix socket, or loopback) and print its answer as their own, with live
figures; without a control port, or with one that needs credentials, they
and the other commands fail saying how to reach it.

Every command takes ``--json`` (its report as one JSON line); ``update
--every`` prints one timestamped line per update (:func:`report`).

Sites (:func:`_connect`): ``update`` and ``rollback`` ask each destination's
own agent (``add-dest --site``), the others' at ``--site``, else protect in
this process; a ``--site`` that is not the own site of a destination they
handle is refused before anything changes. ``update`` and ``copy`` first ask
each destination's own agent what file its export is (rule 12: another one
gets a full copy). ``--tls-creds`` and ``--secret-file`` go to every agent
they ask. A protect or rollback holds an agent's export for the session, so
the session file names each agent a ``--site`` asks before that request
(:meth:`~isc.store.PersistentSession.site`), and ``remove-dest`` releases
the export at each, as at a destination's own.

=========================================  ======================================
``isc create SESSION --source PATH|URI``   make the state directory (nothing else)
``isc add-dest SESSION PATH|URI``          add a destination (NEW: full copy first;
                                           ``--create`` makes the file; ``--site``
                                           the agent that protects it, remembered)
``isc mark SESSION`` / ``isc unmark``      freeze / release a point in time
``isc copy SESSION [--full [--unmarked]]`` incremental (marked) / marked full /
                                           unmarked full copy to every destination
``isc update SESSION [--every S]``         the periodic incremental update workflow
``isc status SESSION [--json]``            read-only: works while another process
                                           holds the session; says when its figures
                                           were taken
``isc remove-dest SESSION NAME``           take a destination out (its data stays;
                                           its agent or RBD image lets it go)
``isc destroy SESSION``                    delete the state directory (only isc's files;
                                           its agents and RBD images let it go first)
``isc rollback SESSION DEST [--site H:P]`` restore a destination's protected image at
                                           its own site, else --site's (an RBD image's,
                                           rbd:POOL/IMAGE, in its cluster)
``isc unprotect SESSION DEST``             drop that protection and its image, at the
                                           same site (the way out when it was lost)
``isc recover SESSION``                    with ``--reset-destinations``: start again
                                           after the bitmap was lost or damaged (every
                                           destination NEW, the next copy full)
=========================================  ======================================

A copy is recorded in the session file while it runs
(:meth:`~isc.store.PersistentSession.begin_copy`) and checkpointed every
:data:`~isc.store.CHECKPOINT_EVERY` bytes sent, so after a crash its destinations read
inconsistent and the next copy resends only what was not confirmed. Errors
(``IscError``, ``OSError``) reach :func:`isc.cli.main`, which prints them as
one line and exits 1; argparse exits 2 for usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, unquote_plus

from isc import _cli_auth, journal, store
from isc._cli_tools import _granularity, _positive, _size
from isc._layout import DEFAULT_GRANULARITY
from isc._units import format_bytes, size_label
from isc.auth import Credentials, connect
from isc.copy import CopyResult, DestState
from isc.errors import IscError, ParameterError, StateError
from isc.lun import FileLUN
from isc.remote import (
    HOLDER_TEXT,
    AgentSite,
    LocalSite,
    RemoteSite,
    address_text,
    agent_address,
    same_agent,
)
from isc.serve import MIN_THROTTLE, SERVED, bitmap_bytes, served_by
from isc.session import DEFAULT_SAVE_AREA
from isc.update import DEFAULT_TIMEOUT, PeriodicUpdate, rollback

# -- argument types ----------------------------------------------------------------------


_PATH_QUERY = ("socket", "tls-certificates")
"""The query parameters of an NBD URI that name a file or directory."""


def _target(text: str) -> str:
    """A LUN as stored in the session file: a path made absolute, and so are the paths an
    NBD URI's query names (:data:`_PATH_QUERY`), so that the session works from any
    directory; the rest of a URI stays as given (an invalid one fails when opened)."""
    if not store.is_uri(text):
        return os.path.abspath(text)
    if not text.startswith("nbd"):
        return text
    head, mark, query = text.partition("?")
    query, hash_mark, fragment = query.partition("#")
    pieces = []
    for piece in query.split("&") if mark else ():
        key, equals, value = piece.partition("=")
        path = unquote_plus(value)  # as the URI's reader decodes it
        if equals and unquote_plus(key) in _PATH_QUERY and path and not os.path.isabs(path):
            value = quote(os.path.abspath(path), safe="/")
        pieces.append(key + equals + value)
    return head + mark + "&".join(pieces) + hash_mark + fragment


def _throttle(text: str) -> int:
    """Bytes per second, a size of at least :data:`~isc.serve.MIN_THROTTLE`, as in a
    control request: a slower copy would wait longer than a timer can count."""
    try:
        number = float(text)  # a bare number, whole or not: 1, 0.0001, 1e-300
    except ValueError:
        number = None
    value = _size(text) if number is None or number >= MIN_THROTTLE else 0
    if value < MIN_THROTTLE:
        raise argparse.ArgumentTypeError(
            f"{text!r} bytes per second is too slow: give at least {size_label(MIN_THROTTLE)}"
        )
    return value


def _save_area(text: str) -> tuple[int, str | None]:
    size, _, path = text.partition(",")
    return _size(size), _target(path) if path else None


def _site(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets); a usage error otherwise."""
    address = site_address(text)
    if isinstance(address, str):
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (a port from 1 to 65535)")
    return address


def site_address(text: str) -> tuple[str, int] | str:
    """An isc agent's control port: HOST:PORT, or unix:PATH (the socket's path); a usage
    error (exit 2) saying what is wrong otherwise."""
    try:
        return agent_address(text)
    except ParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def unix_path(text: str) -> str:
    """The socket path of ``unix:PATH``, made absolute."""
    path = site_address(text)
    assert isinstance(path, str), f"{text} is no unix:PATH"
    return path


def agent_site(address: tuple[str, int] | str, credentials: Credentials | None) -> AgentSite:
    """The isc agent at ``address`` (from :func:`site_address`), reached with ``credentials``."""
    return AgentSite.at(address, credentials)


# -- registration ------------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add the session commands to the ``isc`` parser's ``commands``."""

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str, description=None):
        parser = commands.add_parser(name, help=help, description=description or help)
        parser.add_argument("session", metavar="SESSION", help="the session's state directory")
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
        parser.set_defaults(session_command=run, session_parser=parser)
        return parser

    create = command(
        "create",
        _create,
        "create a persistent session on a source LUN",
        description="Create a session's state directory for a source LUN (a file, a block "
        "device or an NBD URI). Every host write must then go through the session: from "
        "other programs, through its NBD export (isc serve).",
    )
    create.add_argument("--source", required=True, metavar="PATH|URI", help="the source LUN")
    create.add_argument(
        "--granularity",
        type=_granularity,
        default=DEFAULT_GRANULARITY,
        metavar="SIZE",
        help="chunk size, a power of two from 2K to 64K (default 64K)",
    )
    create.add_argument(
        "--save-area",
        type=_save_area,
        metavar="SIZE[,PATH]",
        help=f"COFW save area capacity, one chunk at least, in a file at PATH if given (default "
        f"{size_label(DEFAULT_SAVE_AREA)} or the source's size if smaller, in memory)",
    )
    create.add_argument(
        "--name",
        help=f"the session's name, at most {HOLDER_TEXT} characters (default: the directory's "
        "name)",
    )

    add_dest = command("add-dest", _add_dest, "add a destination LUN to a session")
    add_dest.add_argument(
        "target",
        metavar="PATH|URI",
        help="the destination LUN: a path, an NBD URI or an RBD image, rbd:POOL/IMAGE[?conf=PATH]",
    )
    add_dest.add_argument("--name", help="its name (default: the file or export name)")
    add_dest.add_argument(
        "--create",
        action="store_true",
        help="create PATH first, a sparse file of the source's size (as qemu-img create "
        "does); an existing file is refused, never truncated",
    )
    add_dest.add_argument(
        "--site",
        type=site_address,
        metavar="HOST:PORT|unix:PATH",
        help="the isc agent (its control port) that exports this destination (its NBD URI, "
        "named as the export) and protects it: update and rollback ask it, whatever "
        "their --site",
    )
    _cli_auth.add_client_options(add_dest)

    remove = command(
        "remove-dest",
        _remove_dest,
        "take a destination out of a session (its data stays)",
        description="Take destination NAME out of the session: it is no longer copied to, "
        "and its LUN is left as it is. Refused while a copy to it runs. An isc agent's export "
        "is released at each agent that may hold it for the session: its own (add-dest "
        "--site), and every agent an update --site or rollback --site asked to protect or roll "
        "it back (the session file names them before the request), so another session may "
        "add it; an agent that cannot be asked keeps it held, a warning names how to release "
        "it (isc release), and --json says released false. Released before it is taken out of the "
        "session file: a remove-dest killed between leaves it named, to remove again.",
    )
    remove.add_argument("destination", metavar="NAME", help="the destination's name")
    _timeout_argument(remove, "of each agent that may hold the destination")
    _cli_auth.add_client_options(remove)

    destroy = command(
        "destroy",
        _destroy,
        "delete a session's state directory (the source and destinations stay)",
        description="Delete the session's state directory and the files isc keeps in it. "
        "Refused while another isc process holds the session, for a directory that is not "
        "an isc session's, and for one that holds anything isc did not put there. The "
        "source, the destinations and a save area file are left alone. First each "
        "destination's export is released as remove-dest releases it (at each agent that "
        "may hold it, an RBD image in its metadata), so another session may add it: one "
        "that cannot be let go stays held, a warning names how to let it go, and --json "
        "says released false and lists it in still_held.",
    )
    _timeout_argument(destroy, "of each agent or cluster that may hold a destination")
    _cli_auth.add_client_options(destroy)

    command("mark", _mark, "freeze a point in time to copy (isc copy sends it)")
    command(
        "unmark",
        _unmark,
        "end the mark, if any: what was not sent goes back to tracking",
    )

    copy = command(
        "copy",
        _copy,
        "copy the source to every destination",
        description="Copy to every destination of the session. Default: the incremental "
        "copy of a marked session (isc mark first); --full: a marked full copy (of the "
        "current mark when the session is marked and nothing was written since it); --full "
        "--unmarked: an unmarked full copy (no COFW; destinations end inconsistent until "
        "the next incremental copy).",
    )
    copy.add_argument("--full", action="store_true", help="copy every chunk")
    copy.add_argument("--unmarked", action="store_true", help="with --full: copy unmarked")
    _copy_arguments(copy)
    _timeout_argument(
        copy,
        "of each destination's agent (add-dest --site) and NBD server (of the agents alone "
        "when isc serve holds SESSION: it keeps its own connections)",
    )
    _cli_auth.add_client_options(copy)

    update = command(
        "update",
        _update,
        "run the periodic incremental update workflow",
        description="Mark, protect every destination at its site, copy what changed, "
        "unprotect: once, or every SECONDS (the first at once) until SIGINT or SIGTERM, "
        "which stop it after the update in progress. A destination added with a site "
        "(add-dest --site) is protected by that agent, the others by the agent --site names "
        "(which then holds their exports for this session until remove-dest releases them); "
        "without one, in this process while it runs; RBD images (rbd:POOL/IMAGE) always by "
        "snapshots in their cluster. --tls-creds and --secret-file go to every agent.",
    )
    update.add_argument(
        "--every", type=_positive, metavar="SECONDS", help="repeat every SECONDS seconds"
    )
    _site_arguments(update)
    _copy_arguments(update)

    command("status", _status, "show a session's state and destinations (read-only)")

    recover = command(
        "recover",
        _recover,
        "start again after the session's bitmap was lost or damaged",
        description="When a session's checkpoint (its tracking bitmap) is missing or "
        "damaged, every command but status refuses it. This starts again: every chunk is "
        "tracked and every destination becomes NEW, so the next copy of each is full.",
    )
    recover.add_argument(
        "--reset-destinations",
        action="store_true",
        required=True,
        help="make every destination NEW (required: it says what recovering costs)",
    )

    undo = command(
        "rollback",
        _rollback,
        "restore a destination's protected image (at its site: add-dest's or --site)",
        description="Restore the image a destination's site protected before an update that "
        "failed, and track the rewritten ranges so the next update resends them. The site is "
        "the destination's own (add-dest --site), else --site: with local destinations the "
        "protection lived only in the process that ran the failed update. An RBD "
        "destination's snapshot lives in its cluster: no --site.",
    )
    undo.add_argument("destination", metavar="DEST", help="the destination's name")
    _site_arguments(undo)

    drop = command(
        "unprotect",
        _unprotect,
        "drop a destination's protection at its site (its image with it)",
        description="Drop the protection a destination's site keeps since an update that "
        "failed: the image it saved is discarded, the destination keeps what it holds and "
        "its next update brings it up to date. The way out when that image was lost (the "
        "export was replaced, the agent's journal damaged): every update refuses to protect "
        "such a destination, and a rollback cannot restore it. The site is found as for "
        "rollback.",
    )
    drop.add_argument("destination", metavar="DEST", help="the destination's name")
    _site_arguments(drop)


def _copy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--throttle",
        type=_throttle,
        metavar="SIZE",
        help=f"at most SIZE bytes per second (at least {size_label(MIN_THROTTLE)})",
    )


def _site_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--site",
        type=site_address,
        metavar="HOST:PORT|unix:PATH",
        help="the site of the destinations added without one: an isc agent's control port "
        "(unix:PATH: its Unix socket); refused when it is not a destination's own site. Its "
        "protect and rollback hold an export for this session: the session file names the "
        "agent first, and remove-dest releases it there",
    )
    _timeout_argument(parser, "of the site and of each NBD server")
    _cli_auth.add_client_options(parser)


def _timeout_argument(parser: argparse.ArgumentParser, of: str) -> None:
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"wait at most this long for each answer {of} (default {DEFAULT_TIMEOUT:g})",
    )


def run(args: argparse.Namespace) -> int:
    """Run the session command ``args`` names; return the exit status."""
    if not args.verbose:
        # Failures reach the user as one error line; the library's log would repeat them.
        logging.getLogger("isc").setLevel(logging.CRITICAL)
    return args.session_command(args)


# -- the library-level steps (the crash tests drive them too) ------------------------------


def _open(args: argparse.Namespace) -> store.PersistentSession:
    """Open SESSION; say on stderr what a recovery after a crash did."""
    _refuse_if_served(args)
    # --timeout bounds the waits for the session's NBD servers as for its site.
    stored, recovery = store.open_session(args.session, timeout=getattr(args, "timeout", None))
    with contextlib.suppress(FileNotFoundError):  # left by a server that was killed
        (stored.directory / SERVED).unlink()
    if recovery.crashed:
        ended = "; the copy it was running failed" if recovery.interrupted_copy else ""
        print(
            f"isc: {stored.meta['name']} was not closed cleanly (a crash): "
            f"{recovery.regions_resent} region(s), at most "
            f"{format_bytes(recovery.bytes_resent_bound, long=True)}, will be copied again{ended}",
            file=sys.stderr,
        )
    elif recovery.interrupted_copy:
        print(
            f"isc: the mark of {stored.meta['name']} ended: the chunks saved for it (COFW) "
            "were lost when the process that saved them closed; mark again",
            file=sys.stderr,
        )
    if recovery.source_changed:
        print(
            f"isc: {recovery.source_changed}: every chunk of {stored.meta['name']} will be "
            "copied again, and its destinations are inconsistent until then",
            file=sys.stderr,
        )
    return stored


def _refuse_if_served(args: argparse.Namespace) -> None:
    """``StateError`` saying how to reach the ``isc serve`` that holds SESSION, if one does."""
    served = _served(args)
    if served is None:
        return
    control = served["control"]
    ops = f"; its control port {control} takes status, mark, unmark and copy" if control else ""
    raise StateError(f"{served['held']}: stop it (SIGTERM) to {args.command} here{ops}")


def _served(args: argparse.Namespace) -> dict | None:
    """:func:`isc.serve.served_by` SESSION, with the session's ``name`` and ``held``, the
    words that say who holds it; None when no server does."""
    served = served_by(args.session)
    if served is None:
        return None
    name = next(iter(served.get("exports") or {}), args.session)
    held = f"{name} is held by isc serve (pid {served.get('pid')})"
    return {"control": None, **served, "name": name, "held": held}


def print_json(value: object) -> None:
    """One line of JSON: ``update --every`` prints one per update (JSON lines)."""
    sys.stdout.write(json.dumps(value) + "\n")


def print_lines(*lines: str) -> None:
    """``lines``, each ended, in one write, flushed: ``serve --every`` prints its updates'
    lines from another thread than its ready lines, and a ``print`` writes its text and
    its end apart, so one line could land inside another."""
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


def _say(args: argparse.Namespace, record: dict, text: str) -> None:
    """A verb's report: ``record`` as a line of JSON with ``--json``, else ``text``."""
    if args.json:
        print_json(record)
    else:
        print(text)


def timestamp(seconds: float | None = None) -> str:
    """``seconds`` since the epoch (default: now) as ISO 8601 UTC, to the second."""
    when = datetime.fromtimestamp(time.time() if seconds is None else seconds, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the commands ------------------------------------------------------------------------


def _create(args: argparse.Namespace) -> int:
    source = _target(args.source)
    store.create_session(
        args.session,
        source,
        granularity=args.granularity,
        name=args.name,
        save_area=args.save_area,
    )
    name = store.read_state(args.session).meta["name"]
    record = {
        "session": os.path.abspath(args.session),
        "name": name,
        "source": source,
        "granularity": args.granularity,
    }
    text = (
        f"created session {name} in {args.session}: source {source}, "
        f"granularity {size_label(args.granularity)}"
    )
    _say(args, record, text)
    return 0


def _recover(args: argparse.Namespace) -> int:
    stored, _ = store.open_session(args.session, reset=True)
    with stored:
        names = [d.name for d in stored.destinations]
        record = {"session": stored.meta["name"], "reset": True, "destinations_new": names}
        text = (
            f"reset {stored.meta['name']}: every chunk tracked, every destination NEW "
            f"({', '.join(names) or 'none yet'}): the next copy is full (isc copy --full)"
        )
        _say(args, record, text)
    return 0


def _add_dest(args: argparse.Namespace) -> int:
    target = _target(args.target)
    site = args.site and address_text(args.site)
    credentials = _cli_auth.client_credentials(args)
    if credentials is not None and site is None:
        raise ParameterError("--tls-creds and --secret-file are for a site: add --site")
    with _open(args) as stored:
        made = _create_file(target, stored.source.size) if args.create else None
        try:
            dest = stored.add_destination(target, args.name, site, credentials)
        except BaseException:
            if made is not None and _identity_of(target) == made:
                os.unlink(target)  # the empty file this command made, and nothing else
            raise
        record = {
            "session": stored.meta["name"],
            "destination": dest.name,
            "target": target,
            "site": site,
            "size": dest.lun.size,
            "created": made is not None,
            "state": dest.state.value,
        }
        made_text = " (created)" if made is not None else ""
        site_text = f" at site {site}" if site else ""
        text = (
            f"added destination {dest.name}{made_text}{site_text} "
            f"({format_bytes(dest.lun.size, long=True)}): its first copy is full"
        )
        _say(args, record, text)
    return 0


def _identity_of(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _create_file(target: str, size: int) -> tuple[int, int]:
    """Make ``target`` a new sparse file of ``size`` bytes; return its device and inode.

    Raises ``ParameterError``, creating nothing, for a URI or a path that exists.
    """
    if store.is_uri(target):
        raise ParameterError(
            f"--create makes a file, and {target} is a URI: create the LUN at its server"
        )
    try:
        FileLUN.create(target, size).close()
    except FileExistsError:
        held = os.stat(target).st_size
        fits = "" if held == size else f" (it holds {held} bytes, the source {size})"
        raise ParameterError(
            f"{target} exists{fits}: --create never overwrites a file; to copy to it as it "
            "is, run add-dest without --create"
        ) from None
    made = _identity_of(target)
    assert made is not None
    return made


def _remove_dest(args: argparse.Namespace) -> int:
    credentials = _cli_auth.client_credentials(args)
    with _open(args) as stored:
        stored.destination(args.destination)  # an unknown name is refused, nothing released
        (record_of,) = [d for d in stored.meta["destinations"] if d["name"] == args.destination]
        # Released before it is taken out: killed between, the session still names it (its
        # next update claims it again, a remove-dest again finds it released), never holds
        # an export it no longer names. Best effort: it goes whatever its site says.
        kept = stored.release(record_of, credentials)
        dest = stored.remove_destination(args.destination)
        name = stored.meta["name"]
        for line in kept:
            print(f"isc: warning: {line}", file=sys.stderr)
        protected = dest.protected_state is not None
        record = {
            "session": name,
            "removed": dest.name,
            "protected_at_site": protected,
            # None: held nowhere isc knows (a file; an export no agent was asked to protect).
            "released": not kept if stored.held(record_of) else None,
        }
        text = f"removed destination {dest.name} from {name}; its data stays as it is"
        if protected:
            text += (
                " (its site still protects it since a failed update: unprotect or roll it back"
                " there)"
            )
        _say(args, record, text)
    return 0


def _destroy(args: argparse.Namespace) -> int:
    _refuse_if_served(args)
    credentials = _cli_auth.client_credentials(args)
    removed, kept = store.destroy_session(args.session, credentials, args.timeout)
    for line in kept or []:
        print(f"isc: warning: {line}", file=sys.stderr)
    record = {
        "destroyed": os.path.abspath(args.session),
        "files": removed,
        # None: it held nothing isc knows; else whether every export and image was let go.
        "released": None if kept is None else not kept,
        "still_held": kept or [],
    }
    _say(args, record, f"destroyed {args.session}: {len(removed)} file(s) of isc removed")
    return 0


def _mark(args: argparse.Namespace) -> int:
    served = _ask_server(args, {"op": "mark"})
    if served is not None:
        name, info = served
        _marked(args, name, info["generation"], info["transfer_chunks"], info["granularity"])
        return 0
    with _open(args) as stored:
        session = stored.session
        if session.mark_blocker:
            raise StateError(
                f"{session.mark_blocker}; copy it (isc copy) or unmark it (isc unmark) first"
            )
        session.mark()
        count = session.bitmap.transfer_count
        _marked(args, session.name, session.generation, count, session.granularity)
    return 0


def _marked(args, name: str, generation: int, count: int, granularity: int) -> None:
    record = {
        "session": name,
        "generation": generation,
        "transfer_chunks": count,
        "transfer_bytes_bound": count * granularity,
    }
    text = (
        f"marked {name}: generation {generation}, {count} chunk(s) "
        f"(at most {format_bytes(count * granularity, long=True)}) to copy"
    )
    _say(args, record, text)


def _unmark(args: argparse.Namespace) -> int:
    # Unmarking an unmarked session changes nothing and succeeds, as Session.unmark().
    served = _ask_server(args, {"op": "status"})
    if served is not None:
        name, info = served
        count = None
        if info["state"] == "marked":
            unmarked = _ask_server(args, {"op": "unmark"})
            if unmarked is None:
                raise StateError(f"the isc serve of {name} stopped meanwhile; unmark it again")
            count = unmarked[1]["returned_chunks"]
        _unmarked(args, name, info["generation"], count)
        return 0
    with _open(args) as stored:
        session = stored.session
        marked = session.bitmap.marked
        count = session.unmark()
        _unmarked(args, session.name, session.generation, count if marked else None)
    return 0


def _unmarked(args, name: str, generation: int, count: int | None) -> None:
    """Report an unmark: ``count`` unsent chunks back in tracking, None when not marked."""
    record = {"session": name, "generation": generation, "returned_chunks": count or 0}
    if count is None:
        _say(args, record, f"{name} is not marked; there was nothing to unmark")
    else:
        _say(args, record, f"unmarked {name}: {count} unsent chunk(s) back in tracking")


def _copy(args: argparse.Namespace) -> int:
    if args.unmarked and not args.full:
        args.session_parser.error("--unmarked needs --full (an incremental copy is marked)")
    mode = ("full-unmarked" if args.unmarked else "full") if args.full else "incremental"
    # The server waits for the destinations' agents as long as this command would.
    request = {"op": "copy", "mode": mode, "timeout": args.timeout}
    if args.throttle is not None:
        request["throttle"] = args.throttle
    served = _ask_server(args, request, wait=None)  # a copy takes as long as it takes
    if served is not None:
        name, info = served
        _say_replaced(info.pop("replaced", []))  # none from a server of an earlier isc
        dests = info.pop("destinations")
        _report(name, dests, info, args.json)
        return 0
    site, credentials = _connect(args, store.read_state(args.session).meta["destinations"])
    with _open(args) as stored:
        _check_identities(stored, stored.site(site, credentials), args.timeout)
        progress = store.Progress(stored, bar=_bar(args))
        result = store.copy(stored, mode, progress=progress, throttle=args.throttle)
        report(stored, result, args.json)
    return 0


def _bar(args: argparse.Namespace) -> bool | None:
    """The progress bar: none with ``--quiet``, else on a terminal only."""
    return False if args.quiet else None


def report(
    stored: store.PersistentSession,
    result: CopyResult | None,
    as_json: bool,
    when: str | None = None,
    failure: str | None = None,
) -> None:
    """Print a copy's result, or with ``when`` one update's line (a result, or its
    ``failure``: to stderr too, as JSON lines need one record per update on stdout)."""
    dests = [
        {"name": d.name, "state": d.state.value, "epoch": d.epoch} for d in stored.destinations
    ]
    _report(stored.meta["name"], dests, result and asdict(result), as_json, when, failure)


def _report(
    name: str,
    dests: list[dict],
    result: dict | None,
    as_json: bool,
    when: str | None = None,
    failure: str | None = None,
) -> None:
    """:func:`report` of a result as a dict, with the destinations' states as dicts."""
    stamp = {} if when is None else {"time": when, "ok": failure is None}
    if failure is not None:
        print(f"isc: {when} update of {name} failed: {failure}", file=sys.stderr)
        if as_json:
            print_json({**stamp, "session": name, "reason": failure, "destinations": dests})
        return
    assert result is not None
    if as_json:
        print_json({**stamp, **result, "session": name, "destinations": dests})
        return
    sent, seconds = result["bytes_sent"], result["seconds"]
    rate = sent / seconds if seconds else 0.0
    states = ", ".join(f"{d['name']} {d['state']}" for d in dests)
    what = f"{when} update" if when is not None else f"{result['mode']} copy"
    lines = [
        f"{what} of {name}: "
        f"{format_bytes(sent, long=True)} sent in {result['extents']} run(s), "
        f"{seconds:.2f} s ({format_bytes(rate, long=True)}/s), "
        f"{result['cofw_chunks']} COFW chunk(s); {states}"
    ]
    if result["mode"] == "full-unmarked":
        lines.append(
            "the destinations are inconsistent until the next incremental copy (isc mark, isc copy)"
        )
    print_lines(*lines)


def _update(args: argparse.Namespace) -> int:
    site, credentials = _connect(args, store.read_state(args.session).meta["destinations"])
    with _open(args) as stored:
        dests = store.copy_destinations(stored)
        progress = store.Progress(stored, bar=_bar(args))
        update = PeriodicUpdate(
            stored.session,
            dests,
            stored.site(site, credentials),
            timeout=args.timeout,
            throttle=args.throttle,
            progress=progress,
        )

        def once() -> None:
            _check_identities(stored, update.site, args.timeout)
            (result,) = store.update(stored, update, progress)  # one session: one copy
            report(stored, result, args.json, timestamp())

        if args.every is None:
            once()
            return 0
        # Own loop rather than PeriodicUpdate.every: the outcome of each update is
        # saved to the session file, and a signal stops it between updates.
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        while not stop.is_set():
            try:
                once()
            except IscError as exc:
                report(stored, None, args.json, timestamp(), failure=str(exc))
            sys.stdout.flush()
            stop.wait(args.every)
    return 0


def _check_identities(stored: store.PersistentSession, site: RemoteSite, timeout: float) -> None:
    """Rule 12 at the agents before a copy (:func:`isc.store.check_agents`): a line on
    stderr for each destination whose agent now serves another file (it becomes NEW)."""
    _say_replaced(store.check_agents(stored, site, timeout))


def _say_replaced(found: list[str]) -> None:
    """A line on stderr for each destination :func:`isc.store.check_agents` found replaced."""
    for line in found:
        print(f"isc: {line}", file=sys.stderr)


def _connect(args: argparse.Namespace, dests: list[dict]) -> tuple[RemoteSite, Credentials | None]:
    """The site of the destinations ``dests`` (the session file's) that have none of their
    own: the agent ``--site`` names, else this process's; and the credentials
    (``--tls-creds``/``--secret-file``) for every agent. Raises ``ParameterError``, before
    anything changes, when ``--site`` is not the own site of one of ``dests`` (the user
    meant one of the two for it, and isc cannot tell which) and for credentials that no
    agent would get."""
    site = getattr(args, "site", None)  # isc copy has no --site: it protects nothing
    given, credentials = site and address_text(site), _cli_auth.client_credentials(args)
    check_sites(site, dests)
    if credentials is not None and not given and not any(d.get("site") for d in dests):
        add = "add --site, or " if hasattr(args, "site") else ""
        raise ParameterError(
            f"--tls-creds and --secret-file are for a site: {add}give the "
            "destinations their sites (add-dest --site)"
        )
    return (agent_site(site, credentials) if given else LocalSite()), credentials


def check_sites(site: tuple[str, int] | str | None, dests: list[dict]) -> None:
    """Raise ``ParameterError`` when ``site`` (``--site``) is not the own site of one of
    ``dests`` (the session file's): the user meant one of the two for it, and isc
    cannot tell which."""
    given = site and address_text(site)
    for dest in dests:
        own = dest.get("site")
        if given and own and not same_agent(own, given):
            raise ParameterError(
                f"--site {given} is not the site of destination {dest['name']}, {own} (its "
                f"own, from add-dest --site): leave --site out, and each destination goes to "
                f"its own site; to move {dest['name']} to another agent, remove-dest it and "
                "add-dest it with that --site"
            )


def _protection_site(args: argparse.Namespace) -> tuple[RemoteSite, Credentials | None]:
    """The site that keeps DEST's protection, for ``rollback`` and ``unprotect`` (as
    :func:`_connect` gives it); refuses, before anything is opened or asked for, a DEST
    the session lacks and one with no site to ask."""
    from isc import rbd

    meta = store.read_state(args.session).meta
    known = {d["name"]: d for d in meta["destinations"]}
    if args.destination not in known:  # refused before anything is opened or asked for
        raise ParameterError(
            f"{meta['name']} has no destination {args.destination!r} (it has "
            f"{', '.join(known) or 'none'})"
        )
    chosen = known[args.destination]
    if args.site is None and not chosen.get("site") and not rbd.is_rbd(chosen["target"]):
        args.session_parser.error(
            f"{args.command} needs --site HOST:PORT: the protected image lives at the "
            "destination's site, and it has none of its own (add-dest --site); with local "
            "destinations it lived only in the process of the failed update; an RBD "
            "destination's lives in its cluster and needs none"
        )
    return _connect(args, [chosen])


def _rollback(args: argparse.Namespace) -> int:
    site, credentials = _protection_site(args)
    with _open(args) as stored:
        dest = stored.destination(args.destination)
        site = stored.site(site, credentials)

        def record_intent() -> None:
            # Before the site acts: what it may rewrite is tracked and the
            # destination inconsistent on disk, whatever happens next.
            stored.checkpoint()
            stored.save()

        ack = rollback(stored.session, dest, site, args.timeout, persist=record_intent)
        stored.save()
        record = {
            "session": stored.meta["name"],
            "destination": dest.name,
            "ranges": [list(extent) for extent in ack.extents],
            "state": dest.state.value,
        }
        text = (
            f"rolled back {dest.name}: {len(ack.extents)} range(s) rewritten and tracked "
            f"again; {dest.name} is {dest.state.value}"
        )
        _say(args, record, text)
    return 0


def _unprotect(args: argparse.Namespace) -> int:
    site, credentials = _protection_site(args)
    with _open(args) as stored:
        dest = stored.destination(args.destination)
        ack = stored.site(site, credentials).unprotect(dest, args.timeout)
        if not ack.ok:
            done = (
                "it may have been done: isc unprotect again tells"
                if ack.outcome_unknown
                else "nothing was changed"
            )
            raise StateError(f"unprotect of {dest.name} failed: {ack.reason}; {done}")
        # Its image is gone: a rollback can no longer restore it, whatever it held.
        dest.protected_state = None
        stored.save()
        was = f" ({ack.reason})" if ack.reason else ""
        record = {"session": stored.meta["name"], "destination": dest.name, "reason": ack.reason}
        text = (
            f"unprotected {dest.name}{was}: it holds what it holds, {dest.state.value}; "
            "its next update brings it up to date"
        )
        _say(args, record, text)
    return 0


def _ask_server(
    args: argparse.Namespace, request: dict, wait: float | None = DEFAULT_TIMEOUT
) -> tuple[str, dict] | None:
    """When ``isc serve`` holds SESSION: send ``request`` to its control port; return the
    session's name and the reply's ``info``. None when no server holds it.

    Raises ``StateError`` saying how to reach the server when this command cannot
    (it has no control port, or one that answers authenticated clients only), and
    with the server's reason when it refuses; ``wait``: seconds for the reply.
    """
    served = _served(args)
    if served is None:
        return None
    name, held, control = served["name"], served["held"], served["control"]
    op, line = request["op"], json.dumps(request)
    if control is None:
        raise StateError(
            f"{held}, which has no control port: stop it to {args.command} here, or serve it "
            f"with --control unix:PATH and isc {args.command} asks it"
        )
    if served.get("authenticated"):
        raise StateError(
            f"{held}, whose control port {control} answers authenticated clients only: send "
            f"it {line} with its credentials"
        )
    try:
        with connect(site_address(control), DEFAULT_TIMEOUT) as sock:
            sock.settimeout(wait)
            sock.sendall(line.encode() + b"\n")
            with sock.makefile("rb") as replies:
                reply = json.loads(replies.readline() or b"null")
    except (OSError, ValueError) as exc:
        raise StateError(f"{held}; its control port {control} did not answer {op}: {exc}") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        reason = reply.get("reason") if isinstance(reply, dict) else "no reply"
        raise StateError(f"{held}, which refused {op}: {reason}")
    return name, reply.get("info") or {}


def _status(args: argparse.Namespace) -> int:
    state = store.read_state(args.session)
    served = served_by(args.session) if state.in_use else None
    live = None
    if served is not None and served.get("control") and not served.get("authenticated"):
        with contextlib.suppress(StateError):  # it stopped meanwhile: the files tell
            live = _ask_server(args, {"op": "status"})
    report = status_report(args.session, state, served, live and live[1])
    if args.json:
        print_json(report)
    else:
        sys.stdout.write(_status_text(report))
    return 0


def status_report(
    directory: str,
    state: store.StoredState,
    served: dict | None = None,
    live: dict | None = None,
) -> dict:
    """The facts ``isc status`` prints, as a JSON-ready dict: from the session's files,
    and the figures ``live`` gives (the control status of the ``isc serve`` that holds
    it, ``served``: :func:`isc.serve.served_by`) over theirs."""
    meta, bitmap = state.meta, state.bitmap
    area = meta["save_area"] or {}

    def bitmap_use(count: int, is_set: Callable[[int], bool]) -> dict:
        assert bitmap is not None
        return {"chunks": count, "bytes": bitmap_bytes(bitmap, count, is_set)}

    copy_record = meta.get("copy")
    report = {
        "as_of": timestamp(_last_checkpoint(Path(directory)) if state.in_use else None),
        "session": os.path.abspath(directory),
        "name": meta["name"],
        "source": meta["source"],
        "size": bitmap.size if bitmap else None,
        "granularity": meta["granularity"],
        "chunks": bitmap.chunks if bitmap else None,
        "state": "marked" if bitmap and bitmap.marked else "unmarked",
        "generation": bitmap.generation if bitmap else 0,
        "tracking": bitmap_use(bitmap.tracking_count, bitmap.tracking) if bitmap else None,
        "transfer": bitmap_use(bitmap.transfer_count, bitmap.transfer) if bitmap else None,
        "save_area": {
            "capacity": area.get("capacity"),
            "path": area.get("path"),
        },
        "epoch": meta["epoch"],
        "destinations": [
            {
                **d,
                "site": d.get("site"),
                "held_at": d.get("held_at", []),
                "in_step": d["epoch"] is not None and d["epoch"] == meta["epoch"],
                "reachable": d.get("problem") is None,
                "problem": d.get("problem"),
            }
            for d in meta["destinations"]
        ],
        "in_use": state.in_use,
        "served_by": served,
        "live": live is not None,
        "damage": state.damage,
        "source_changed": state.source_changed,
        "copy_running": copy_record if state.in_use else None,
        "recovery_pending": None
        if state.in_use or not (state.pending_regions or copy_record)
        else {
            "regions": state.pending_regions,
            "bytes_bound": state.pending_regions * meta["region_size"],
            "copy_failed": copy_record,
        },
    }
    if live is not None:
        _merge_live(report, live)
    return report


def _merge_live(report: dict, live: dict) -> None:
    """Put the figures of a server's control status (taken now) over the files' ones."""
    report["as_of"] = timestamp()
    report["state"], report["generation"] = live["state"], live["generation"]
    report["tracking"] = {"chunks": live["tracked_chunks"], "bytes": live["tracked_bytes"]}
    report["transfer"] = {"chunks": live["transfer_chunks"], "bytes": live["transfer_bytes"]}
    report["epoch"] = live["epoch"]
    now = {d["name"]: d for d in live["destinations"]}
    for dest in report["destinations"]:
        dest.update(now.get(dest["name"], {}))
        dest["in_step"] = dest["epoch"] is not None and dest["epoch"] == live["epoch"]


def _last_checkpoint(directory: Path) -> float | None:
    """When the figures of a session another process holds were saved: its journal's
    mtime (the session file's before the first checkpoint)."""
    for name in (journal.NAME, store.METADATA):
        try:
            return os.stat(directory / name).st_mtime
        except FileNotFoundError:
            continue
    return None


def _site_text(dest: dict) -> str:
    """Where a destination of ``isc status`` is protected, in words."""
    from isc import rbd

    if dest["site"] is not None:
        return f"{dest['site']} (its isc agent)"
    if rbd.is_rbd(dest["target"]):
        return "its Ceph cluster (RBD snapshots)"
    text = "none of its own: update's --site, else the process that runs the update"
    if dest["held_at"]:
        text += f"; its export may be held at {', '.join(dest['held_at'])} until remove-dest"
    return text


def _status_text(report: dict) -> str:
    def amount(use: dict | None) -> str:
        if use is None:
            return "0 chunks"
        return f"{use['chunks']} chunk(s), {format_bytes(use['bytes'], long=True)}"

    size = "size unknown" if report["damage"] else "size known at first open"
    if report["size"]:
        size = format_bytes(report["size"], long=True)
    area = report["save_area"]
    capacity = format_bytes(area["capacity"], long=True) if area["capacity"] else "default"
    lines = [
        f"session      {report['name']} ({report['session']})",
        f"as of        {report['as_of']}",
        f"source       {report['source']} ({size})",
        f"granularity  {size_label(report['granularity'])}",
        f"state        {report['state']}, generation {report['generation']}",
        f"tracking     {amount(report['tracking'])}",
        f"transfer     {amount(report['transfer'])}",
        f"save area    {capacity}, {area['path'] or 'in memory'}",
    ]
    served = report["served_by"]
    copying = " (a copy is running)" if report["copy_running"] else ""
    if served is not None:
        exports = ", ".join(served.get("exports", {}).values())
        control = served.get("control") or "none"
        lines.append(f"served       by isc serve (pid {served.get('pid')}){copying}: {exports}")
        how = (
            "figures taken live from it" if report["live"] else "figures as of its last checkpoint"
        )
        lines.append(f"             control port {control}; {how}")
    elif report["in_use"]:
        lines.append(f"in use       by another isc process{copying}: as of its last checkpoint")
    if report["damage"]:
        lines.append(f"damaged      {report['damage']}")
        lines.append(
            f"             to start again with full copies: isc recover {report['session']} "
            "--reset-destinations"
        )
    if report["source_changed"]:
        lines.append(
            f"changed      {report['source_changed']}: the next open tracks every chunk "
            "and makes the destinations inconsistent"
        )
    pending = report["recovery_pending"]
    if pending:
        failed = "; its interrupted copy failed" if pending["copy_failed"] else ""
        lines.append(
            f"crashed      the next open tracks {pending['regions']} region(s) again{failed}"
        )
    lines.append(f"destinations {len(report['destinations']) or 'none: isc add-dest'}")
    for dest in report["destinations"]:
        step = "in step" if dest["in_step"] else "not in step: next copy full or seeded"
        if dest["state"] == DestState.NEW.value:
            step = "first copy is full"
        epoch = "never copied" if dest["epoch"] is None else f"epoch {dest['epoch']}"
        lines.append(f"  {dest['name']}  {dest['state']}  {epoch}  {step}")
        lines.append(f"    {dest['target']}")
        lines.append(f"    site {_site_text(dest)}")
        if not dest["reachable"]:
            lines.append(f"    not reachable when last tried: {dest['problem']}")
    return "\n".join(lines) + "\n"
