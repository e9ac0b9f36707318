"""What an NBD export serves: :class:`SessionLUN`, a session's source with tracked writes.

Exporting a :class:`SessionLUN` through :class:`~isc.nbd.NBDServer` makes the
writes of any NBD client host writes of the session: they set tracking bits
and, while the session is marked, save COFW data first.
"""

from __future__ import annotations

from typing import Any

from isc.lun import BytesLike, _BaseLUN


class SessionLUN(_BaseLUN):
    """The LUN interface over a session: writes are the session's tracked host writes.

    Reads, ``readinto`` and ``flush`` go to ``session.source``; :meth:`write` is
    ``session.write``, so exporting a ``SessionLUN`` through :class:`NBDServer`
    makes every NBD WRITE a host write that sets tracking bits (and saves
    COFW data while the session is marked). :meth:`close` closes neither the
    session nor its source.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.size = session.source.size
        self._open = True

    def __repr__(self) -> str:
        state = "" if self._open else " closed"
        return f"<SessionLUN {self.session.name!r} size={self.size}{state}>"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return not self._open

    def _check(self) -> None:
        if not self._open:
            raise self._closed_error()

    def read(self, offset: int, length: int) -> bytes:
        """The source's bytes at ``[offset, offset + length)``; errors as the source's."""
        self._check()
        return self.session.source.read(offset, length)

    def readinto(self, offset: int, buffer: BytesLike) -> None:
        """Fill ``buffer`` from the source at ``offset``; errors as the source's."""
        self._check()
        self.session.source.readinto(offset, buffer)

    def write(self, offset: int, data: BytesLike) -> None:
        """A host write through the session (tracked); ``RangeError`` outside the source."""
        self._check()
        self.session.write(offset, data)

    def flush(self) -> None:
        """Flush the source; ``StateError`` when this adapter is closed."""
        self._check()
        self.session.source.flush()

    def close(self) -> None:
        """Close this adapter only; later I/O raises ``StateError``. Idempotent."""
        self._open = False
