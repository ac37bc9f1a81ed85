"""Byte sizes for people: GiB in tables, and sizes like ``80GiB`` or ``24GB`` on the command line."""

from __future__ import annotations

import re
from decimal import Decimal

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")
GIB = 1024**3
MIB = 1024**2


def parse_size(text: str) -> int:
    """``"80GiB"`` -> bytes. Raises ValueError with the accepted forms in the message."""
    m = _SIZE_RE.fullmatch(text)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: use e.g. 80GiB, 24GB, 512MiB or a number of bytes")
    # Decimal, not float: "2.01KB" is 2010 bytes, where 2.01 * 1000 in binary floating point is 2009.99...
    return int(Decimal(m.group(1)) * _UNITS[unit])


def fmt_bytes(n: int | float | None, *, unit: str | None = None, digits: int = 2) -> str:
    """Human-readable bytes; ``None`` (a figure that does not exist on this device) reads as a dash."""
    if n is None:
        return "—"
    if unit is None:
        a = abs(n)
        unit = "GiB" if a >= GIB else "MiB" if a >= MIB else "KiB" if a >= 1024 else "B"
    div = {"B": 1, "KiB": 1024, "MiB": MIB, "GiB": GIB}[unit]
    if unit == "B":
        return f"{int(n)} B"
    return f"{n / div:.{digits}f} {unit}"


def fmt_gib(n: int | float | None, digits: int = 2) -> str:
    return "—" if n is None else f"{n / GIB:.{digits}f}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.2f} s"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


_OOM_RE = re.compile(r"[Tt]ried to allocate\s+([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|bytes)\b", re.I)
_CPU_OOM_RE = re.compile(r"you tried to allocate\s+([0-9]+)\s+bytes", re.I)


def requested_bytes_from_message(message: str) -> int | None:
    """The size an allocation failed for, read from torch's OOM messages (CUDA and CPU forms)."""
    m = _CPU_OOM_RE.search(message)
    if m:
        return int(m.group(1))
    m = _OOM_RE.search(message)
    if m:
        unit = m.group(2).lower()
        return int(Decimal(m.group(1)) * (1 if unit == "bytes" else _UNITS[unit]))
    return None
