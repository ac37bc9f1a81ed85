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


# Bounds of a memory size given on the command line (--gpu-memory, --host-memory). Below 1 MiB nothing runs (a
# CUDA context alone is hundreds of MiB); above 64 TiB is no single machine (the largest shared-memory servers
# hold 32 TB, the largest GPU 0.3 TB): such a number is a typo, and would make every verdict "fits".
MIN_MEMORY = MIB
MAX_MEMORY = 64 * 1024**4
_NUMBER_RE = re.compile(r"\+?([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)")
_EXPONENT_RE = re.compile(r"[-+]?[0-9.]+[eE][-+]?[0-9]+\s*[a-zA-Z]*")


def parse_memory(text: str) -> int:
    """A machine's memory as a user types it (``80GiB``, ``24GB``, ``512MiB``, ``85899345920B``) -> bytes.

    Stricter than :func:`parse_size`: a bare number is refused, because ``--gpu-memory 80`` meant 80 GiB to its
    user and 80 bytes to blipmon (a confident OOM verdict); bytes are still one letter away (``80B``). Negative,
    zero, infinite and absurd sizes each get a message that says which of those it is. Raises ValueError.
    """
    s = text.strip()
    low = s.lower().lstrip("+-")
    if low.startswith(("inf", "nan")):
        raise ValueError(f"{s!r} is not a size: expected a finite amount, e.g. 80GiB")
    if s.startswith("-") and any(c.isdigit() for c in s):
        raise ValueError(f"{s!r} is negative: a memory size is above zero, e.g. 80GiB")
    if _EXPONENT_RE.fullmatch(s):
        raise ValueError(f"{s!r}: write the number without an exponent, e.g. 80GiB or 24GB")
    m = _NUMBER_RE.fullmatch(s)
    if m and not m.group(2):
        num = m.group(1)
        raise ValueError(f"{s!r} has no unit: add a unit ({num}GiB, {num}GB, or {num}B for bytes)")
    try:
        n = parse_size(s.lstrip("+"))
    except ValueError:
        raise ValueError(f"{s!r} is not a size: use e.g. 80GiB, 24GB or 512MiB") from None
    if n == 0:
        raise ValueError(f"{s!r} is zero: a memory size is above zero, e.g. 80GiB")
    if n < MIN_MEMORY:
        raise ValueError(f"{s!r} is less than 1MiB, too little to run anything: expected at least 1MiB")
    if n > MAX_MEMORY:
        raise ValueError(f"{s!r} is more memory than any one machine has: expected at most 64TiB")
    return n


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
