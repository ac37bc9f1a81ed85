"""``blipmon models [--json]``: the architectures blipmon knows, their parameter counts and bytes per dtype.

Numbers come from ``blipmon.architectures.catalog`` (computed from the shipped configs on the meta device), so the
table is what a ``weights = "random"`` run of the same id will allocate.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

GIB = 1024**3

# Unquantized parts of 8-bit / 4-bit loads are shown in this dtype (the QLoRA recipe of seed 002); --json has all.
QUANT_REST_DTYPE = "bfloat16"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def render_table(items: list[dict[str, Any]]) -> str:
    """A plain-text table, one row per architecture (sizes in GiB)."""
    header = ("id", "family", "params", "fp32", "bf16", "fp16", "8-bit*", "4-bit*")
    rows = [
        (
            d["id"],
            d["family"],
            _params(d["params"]),
            _gib(d["bytes"]["float32"]),
            _gib(d["bytes"]["bfloat16"]),
            _gib(d["bytes"]["float16"]),
            _gib(d["quantized"]["8bit"][QUANT_REST_DTYPE]),
            _gib(d["quantized"]["4bit-nf4"][QUANT_REST_DTYPE]),
        )
        for d in items
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(left + right).rstrip()

    out = [line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)]
    out.append("")
    out.append("Parameter memory in GiB, as from_pretrained allocates it (fp16 keeps _keep_in_fp32_modules in fp32).")
    out.append(
        "* bitsandbytes through transformers, no double quantization, unquantized parts in bf16; "
        "includes the quantization state. `--json` has every dtype."
    )
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> int:
    """Print the known architectures; ``args.json`` switches to a JSON list of ``describe()`` objects."""
    from blipmon.architectures import catalog

    items = [catalog.describe(mid) for mid in catalog.known_ids()]
    if getattr(args, "json", False):
        print(json.dumps(items, indent=2))
    else:
        sys.stdout.write(render_table(items))
    return 0
