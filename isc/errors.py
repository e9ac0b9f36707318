"""The exceptions isc raises.

Every error derives from :class:`IscError` and from the built-in exception a
caller would expect, so ``except ValueError`` keeps working for code that does
not know isc. Each message names the object, its state and the fix.
"""


class IscError(Exception):
    """Base class of every error isc raises on purpose."""


class StateError(IscError, RuntimeError):
    """An operation was asked for in a state that does not allow it."""


class RangeError(IscError, ValueError):
    """An offset, length or chunk index lies outside the LUN."""


class ParameterError(IscError, ValueError):
    """A parameter has a value isc does not accept (e.g. a granularity)."""


class CorruptMetadata(IscError, ValueError):
    """Serialized state is truncated, corrupt, foreign or of an unknown version."""


class SaveAreaFull(IscError, RuntimeError):
    """The save area has no room for another chunk; the mark that needed it is aborted."""


class AuthenticationError(IscError, PermissionError):
    """A peer could not be authenticated, or refused to authenticate this end.

    Raised before any request goes out; nothing was changed on either side.
    """


class CopyError(IscError, RuntimeError):
    """A copy job failed; ``result`` says what it had sent and how each destination fared.

    Every chunk not confirmed on every destination is back in the tracking
    bitmap, so the next copy sends it (rule 2).
    """

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result
