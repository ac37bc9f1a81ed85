"""Matching torch's out-of-memory observer to the error being recorded, for the child and the callbacks alike.

The observer (``runner.child.OOM_OBSERVER``) keeps the allocator's figures of the last failed allocation. A
training script may have caught an earlier OOM (Lightning's batch-size finder does), so a figure is only used
when it belongs to the error at hand.
"""

from __future__ import annotations

from typing import Any


def observation_fits(observed: dict[str, int], parsed: int | None, allocator_oom: bool) -> bool:
    """With a size in the message, the exact figure must round to it (two decimals of its unit: within 0.5 %).
    Without one, only the allocator's own ``OutOfMemoryError`` can have fired the observer (cuBLAS allocates its
    handle's memory outside the caching allocator)."""
    if parsed is None:
        return allocator_oom
    return abs(observed["requested_bytes"] - parsed) <= parsed * 0.005 + 1


def oom_fields(exc: BaseException, observer: Any) -> dict[str, Any]:
    """``requested_bytes`` (exact where the observer saw this failure), its source, and the device's state."""
    import torch

    from blipmon.core.units import requested_bytes_from_message

    parsed = requested_bytes_from_message(str(exc))
    observed = observer.take() if observer is not None else None
    return observed_fields(observed, parsed, isinstance(exc, torch.OutOfMemoryError))


def observed_fields(observed: dict[str, int] | None, parsed: int | None, allocator_oom: bool) -> dict[str, Any]:
    """The message's size, replaced by the observer's exact one (and the device's state) where it fits."""
    fields: dict[str, Any] = {"requested_bytes": parsed, "requested_source": "message" if parsed is not None else None}
    if observed and observation_fits(observed, parsed, allocator_oom):
        fields.update(
            requested_bytes=observed["requested_bytes"],
            requested_source="allocator",
            device=f"cuda:{observed['device']}",
            device_free=observed["device_free"],
            device_limit=observed["device_limit"],
        )
    return fields
