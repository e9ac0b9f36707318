"""isc: change tracking for incremental copy of live volumes.

:class:`DeltaBitmap` is the mechanism (tracking and transfer bitmaps with
copy-on-first-write flags); :class:`Session`, :class:`CopyJob` and the LUNs
are the data path built on it. ``README.md`` explains the concepts.
"""

from isc._core import DeltaBitmap
from isc.copy import CopyJob, CopyResult, Destination, DestState
from isc.errors import (
    AuthenticationError,
    CopyError,
    CorruptMetadata,
    IscError,
    ParameterError,
    RangeError,
    SaveAreaFull,
    StateError,
)
from isc.lun import FileLUN, MemoryLUN
from isc.savearea import SaveArea
from isc.session import Session, SessionStats, State

__all__ = [
    "AuthenticationError",
    "CopyError",
    "CopyJob",
    "CopyResult",
    "CorruptMetadata",
    "DeltaBitmap",
    "DestState",
    "Destination",
    "FileLUN",
    "IscError",
    "MemoryLUN",
    "ParameterError",
    "RangeError",
    "SaveArea",
    "SaveAreaFull",
    "Session",
    "SessionStats",
    "State",
    "StateError",
]
__version__ = "0.1.0"
