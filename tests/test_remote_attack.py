"""Attacks across processes and networks that earlier rounds left unforced.

Each test forces one window no other test forces, with real peers (isc's NBD
server spoken to by hand, ``isc agent``, ``isc update``) and hooks that run
the racing step at the exact point (no sleeps):

* a pull client of the frozen export ``NAME@frozen`` whose mark ends (an
  unmark) before or while the server works out which parts of a READ are
  holes, or which chunks ``base:allocation`` calls holes: the reply must be
  an error, never zeros acknowledged as the image at the mark.

A test that found a hole in the current code is marked ``xfail(strict=True)``
with the reason, naming the code: it passes once the hole is mended.
"""

from __future__ import annotations

import pytest
import test_nbd
from test_nbd import CMD_READ, KIB, MIB
from test_nbd_protocol import CMD_BLOCK_STATUS, client
from test_pull import EIO, failure, frozen

from isc import Session
from isc.lun import FileLUN
from isc.nbd import SessionLUN

serve = test_nbd.serve  # the fixture: isc servers on Unix sockets in tmp_path
G = 64 * KIB


class HookedFile(FileLUN):
    """A file LUN whose next ``data_extents`` lets ``hook`` run once it has answered."""

    hook = None

    def data_extents(self, offset, length):
        found = super().data_extents(offset, length)
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return found


@pytest.mark.parametrize("when", ["after", "during"])
def test_a_frozen_read_or_status_of_holes_once_its_mark_ended_fails(serve, tmp_path, when):
    lun = HookedFile.create(tmp_path / "src.img", MIB)
    session = Session(lun, granularity=G, name="disk")
    server = serve(SessionLUN(session))
    try:
        for command in (CMD_READ, CMD_BLOCK_STATUS):
            session.write(0, b"\1" * G)
            session.mark()
            with client(server) as c:
                allocation = frozen(c)["base:allocation"]
                session.write_zeroes(0, G, True)  # saved first (COFW), then a hole in the file
                # The mark's image: the saved copy, data.
                assert c.read_chunks(0, G)[0] == b"\1" * G
                assert c.status(0, G)[allocation] == [(G, 0)]
                if when == "after":
                    session.unmark()  # the saved copy goes; the file reads as a hole
                else:
                    lun.hook = session.unmark  # once the file said "a hole" at 0
                c.request(command, 0, G)
                error, message = failure(c)
                assert error == EIO and "ended by an unmark" in message, (command, message)
    finally:
        lun.close()
