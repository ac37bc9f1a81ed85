"""The autocast context a training precision runs the forward pass under: one rule for the child and the estimator.

``bf16-mixed`` and ``16-mixed`` (Lightning's names) run the forward in bfloat16 / float16 under
``torch.autocast``; ``32-true`` and ``bf16-true`` need none (the weights already have their dtype).
The estimator's forward on fake tensors must autocast exactly as the real step does, or its saved
activations would have another dtype: so both import this function.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for a mixed precision on ``device``'s type, else a context that does nothing."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


__all__ = ["autocast_for"]
