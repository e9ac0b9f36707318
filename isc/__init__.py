"""isc: change tracking for incremental copy of live volumes.

The core object is :class:`DeltaBitmap`, the pair of tracking and transfer
bitmaps of an incremental session with its copy-on-first-write (COFW) flags.
See ``README.md`` for the concepts and ``../shared/MISSION.md`` style terms.
"""

from isc._core import DeltaBitmap
from isc.errors import CorruptMetadata, IscError, ParameterError, RangeError, StateError

__all__ = [
    "CorruptMetadata",
    "DeltaBitmap",
    "IscError",
    "ParameterError",
    "RangeError",
    "StateError",
]
__version__ = "0.1.0"
