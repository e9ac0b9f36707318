"""Byte sizes as people write them (``64K``, ``1.5G``) and as the reports print them."""

from __future__ import annotations

import math
import re

from isc.errors import ParameterError

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTP]?)(?:I?B)?\s*\Z", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional binary suffix, ``K`` = 1024 bytes.

    ``"4096"``, ``"64K"``, ``"64KiB"``, ``"1.5G"``, ``"2MB"`` (``B`` and
    ``iB`` are accepted and mean the same: powers of 1024). The result must be
    a whole number of bytes. Raises ``ParameterError`` (a ValueError)
    otherwise.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ParameterError(
            f"{text!r} is not a size; write a number of bytes with an optional "
            "K, M, G, T or P suffix (powers of 1024), e.g. 64K or 1.5G"
        )
    number, suffix = match.groups()
    scale = _SUFFIXES[suffix.upper()]
    if "." in number:
        value = float(number) * scale
        if not value.is_integer():
            raise ParameterError(f"{text!r} is not a whole number of bytes")
        return int(value)
    return int(number) * scale


def format_bytes(count: float, *, long: bool = False) -> str:
    """``count`` bytes in binary units, three significant digits.

    Short form for table cells: ``"12.3M"``, ``"640K"``, ``"512"``; ``long=True``
    for prose: ``"12.3 MiB"``, ``"512 B"``. Non-finite counts print as is.
    """
    if not math.isfinite(count):
        return str(count)
    value = float(count)
    unit = ""
    for unit in ("", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            break
        value /= 1024
    if unit == "" or abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    if long:
        return f"{text} {unit}iB" if unit else f"{text} B"
    return text + unit


def size_label(count: int) -> str:
    """A power-of-two size as a short label: ``2048`` -> ``"2K"``, ``1048576`` -> ``"1M"``."""
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if count >= scale and count % scale == 0:
            return f"{count // scale}{unit}"
    return str(count)
