"""The callbacks record a CUDA OOM's exact size and device as `blipmon run` does (review of issue 15.7).

``oom_fields`` is what both use: the observer's figures where they belong to this error, else the message's.
"""

from __future__ import annotations

import torch

from blipmon.runner.child import OomObserver
from blipmon.runner.oom import oom_fields

MIB = 1024**2
GIB = 1024**3


def _observer(alloc: int, device: int = 1) -> OomObserver:
    obs = OomObserver()
    obs(device, alloc, 80 * GIB, 300 * MIB)  # what the allocator calls it with
    return obs


def test_the_exact_size_and_device_where_the_observer_saw_this_error() -> None:
    exact = 2 * GIB + 3 * MIB + 512  # the message rounds it to "2.00 GiB"
    e = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of 79.11 GiB"
    )
    assert oom_fields(e, _observer(exact)) == {
        "requested_bytes": exact,
        "requested_source": "allocator",
        "device": "cuda:1",
        "device_free": 300 * MIB,
        "device_limit": 80 * GIB,
    }


def test_a_stale_observation_of_another_size_is_not_used() -> None:
    e = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.")
    assert oom_fields(e, _observer(4 * GIB)) == {"requested_bytes": 20 * MIB, "requested_source": "message"}


def test_without_an_observer_the_message_decides() -> None:
    e = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert oom_fields(e, None) == {"requested_bytes": None, "requested_source": None}
