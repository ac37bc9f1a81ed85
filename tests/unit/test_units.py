"""Sizes and times for people, and the allocation size read from torch's OOM messages."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blipmon.core.units import GIB, MIB, fmt_bytes, fmt_gib, fmt_seconds, parse_size, requested_bytes_from_message


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("80GiB", 80 * GIB),
        ("80 GiB", 80 * GIB),
        (" 24GB ", 24 * 10**9),
        ("512MiB", 512 * MIB),
        ("512mib", 512 * MIB),
        ("1.5GiB", 3 * GIB // 2),
        ("4k", 4096),
        ("2M", 2 * MIB),
        ("3G", 3 * GIB),
        ("1T", 1024**4),
        ("1TB", 10**12),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("123", 123),
        ("123B", 123),
        ("0", 0),
        ("2.01KB", 2010),  # not 2009: decimal, not binary floating point
        ("4.35KB", 4350),
        ("0.29KB", 290),
    ],
)
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "1e9", "1.2.3GB", "12 parsecs", "1,5GB", "1 G iB", "nan"])
def test_parse_size_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size: use e\.g\. 80GiB, 24GB, 512MiB or a number of bytes"):
        parse_size(text)


@given(
    whole=st.integers(0, 10**6), frac=st.integers(0, 99), unit=st.sampled_from(["KB", "MB", "GB", "KiB", "MiB", "GiB"])
)
def test_parse_size_is_exact_for_two_decimals(whole: int, frac: int, unit: str) -> None:
    text = f"{whole}.{frac:02d}{unit}"
    mult = {"KB": 1000, "MB": 10**6, "GB": 10**9, "KiB": 1024, "MiB": MIB, "GiB": GIB}[unit]
    assert parse_size(text) == int(Decimal(f"{whole}.{frac:02d}") * mult)


@given(st.integers(0, 2**60))
def test_parse_size_of_a_byte_count_is_itself(n: int) -> None:
    assert parse_size(str(n)) == n


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "—"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (MIB, "1.00 MiB"),
        (GIB, "1.00 GiB"),
        (80 * GIB, "80.00 GiB"),
        (-3 * GIB, "-3.00 GiB"),  # "other" can be negative
        (1.5 * GIB, "1.50 GiB"),
    ],
)
def test_fmt_bytes(n: float | None, text: str) -> None:
    assert fmt_bytes(n) == text


def test_fmt_bytes_with_a_fixed_unit_and_digits() -> None:
    assert fmt_bytes(GIB, unit="MiB") == "1024.00 MiB"
    assert fmt_bytes(GIB // 3, unit="GiB", digits=3) == "0.333 GiB"
    assert fmt_bytes(5, unit="B") == "5 B"
    assert fmt_gib(None) == "—" and fmt_gib(GIB + GIB // 2) == "1.50" and fmt_gib(GIB, digits=0) == "1"


@given(st.integers(0, 2**50))
def test_fmt_bytes_then_parse_size_is_within_rounding(n: int) -> None:
    text = fmt_bytes(n).replace(" ", "")
    back = parse_size(text)
    unit = 1 if n < 1024 else 1024 if n < MIB else MIB if n < GIB else GIB
    assert abs(back - n) <= unit * 0.005 + 1


@pytest.mark.parametrize(
    ("s", "text"),
    [(None, "—"), (0.0, "0 ms"), (0.5, "500 ms"), (1.0, "1.00 s"), (1.5, "1.50 s"), (119.0, "119.00 s"),
     (125.0, "2m05s"), (3725.0, "1h02m"), (86400.0, "24h00m")],
)  # fmt: skip
def test_fmt_seconds(s: float | None, text: str) -> None:
    assert fmt_seconds(s) == text


@pytest.mark.parametrize(
    ("message", "n"),
    [
        # torch's CUDA caching allocator, current and older wording
        (
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
            "1.31 GiB is free. Including non-PyTorch memory, this process has 77.78 GiB memory in use.",
            2 * GIB,
        ),
        (
            "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total capacity; 6.53 GiB already "
            "allocated; 11.31 MiB free; 6.69 GiB reserved in total by PyTorch)",
            20 * MIB,
        ),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB", 3 * GIB // 2),
        ("Tried to allocate 512.00 KiB", 512 * 1024),
        ("tried to allocate 128 bytes", 128),
        # torch's CPU allocator: the exact byte count, even though "Tried to allocate" also matches
        (
            "RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 14155776 bytes. Error code 12 (Cannot allocate memory)",
            14155776,
        ),
        ("DefaultCPUAllocator: not enough memory: you tried to allocate 1125899906842624 bytes.", 2**50),
        # not an allocation failure we can size
        ("CUDA error: an illegal memory access was encountered", None),
        ("MemoryError", None),
        ("", None),
        ("Tried to allocate 1.2.3 GiB", None),
    ],
)
def test_requested_bytes_from_oom_messages(message: str, n: int | None) -> None:
    assert requested_bytes_from_message(message) == n
