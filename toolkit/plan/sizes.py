"""Memory sizes as people write them (11GiB, 11GB, 11000MiB) and back."""

from __future__ import annotations

import re

# Decimal units are powers of 1000 and binary units powers of 1024, as in IEC 80000-13.
UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


class SizeError(ValueError):
    """A memory size that cannot be read; the message names the value and the accepted forms."""


def parse_size(text: str) -> int:
    """Return the bytes in a size such as "11GiB", "11GB", "11000MiB", "10.5 GiB" or "4096".

    A number without a unit is bytes. Units are case-insensitive, so "11gb" is 11 GB.
    """
    match = _SIZE.match(text)
    if match is None:
        raise SizeError(f"invalid memory size {text!r}; expected a number and a unit such as 11GiB, 11GB or 11000MiB")
    number, unit = match.groups()
    factor = UNITS.get(unit.lower() or "b")
    if factor is None:
        units = ", ".join(name for name in ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"))
        raise SizeError(f"invalid unit {unit!r} in memory size {text!r}; expected one of {units}")
    size = int(float(number) * factor)
    if size <= 0:
        raise SizeError(f"invalid memory size {text!r}; expected more than 0 bytes")
    return size


def format_size(size: int) -> str:
    """Return bytes in binary units with about three significant digits, such as "10.2 GiB"."""
    value = float(size)
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{size} B"
    digits = 0
    if abs(value) < 10:
        digits = 2
    elif abs(value) < 100:
        digits = 1
    return f"{value:.{digits}f} {unit}"


__all__ = ["SizeError", "format_size", "parse_size"]
