"""The estimate's GPU terms against the real CUDA caching allocator, cuBLAS and NVML (issue 15, item 9).

Deselected by default (``-m 'not gpu'``); on a machine with an NVIDIA GPU: ``pytest tests/gpu -m gpu``. Each check
runs in a fresh Python process, so the allocator starts with no segments and nothing else holds a context.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from blipmon.estimate import gpu

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

MIB = 1024**2


@pytest.fixture(scope="module", autouse=True)
def needs_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")


def fresh(code: str, *args: str) -> dict:
    """Run ``code`` in a new interpreter (default allocator settings); it prints one JSON object."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))}
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# small ones first, then 1-10 MiB, then large ones: the order the model's packing assumes (no reuse across pools)
SIZES = [100, *[1000] * 5, *[3 * MIB] * 7, 11 * MIB, 10 * MIB + 1, 64 * MIB, 22 * MIB + 12345]


def test_pack_is_what_the_caching_allocator_holds_for_fresh_tensors() -> None:
    got = fresh(
        """
        import json, sys, torch
        keep = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in json.loads(sys.argv[1])]
        print(json.dumps({"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}))
        """,
        json.dumps(SIZES),
    )
    want = gpu.pack(SIZES)
    assert (got["allocated"], got["reserved"]) == (want.allocated, want.reserved)


def test_a_training_step_holds_two_cublas_workspaces_of_the_default_size() -> None:
    """One workspace for the forward's thread, one for autograd's device thread (torch's thread-local map)."""
    got = fresh(
        """
        import json, torch
        a = torch.randn(256, 256, device="cuda", requires_grad=True)
        w = torch.randn(256, 256, device="cuda", requires_grad=True)
        (a @ w).sum().backward()
        torch.cuda.synchronize()
        live = sum(t.untyped_storage().nbytes() for t in (a, w, a.grad, w.grad))
        major, minor = torch.cuda.get_device_capability(0)
        print(json.dumps({"allocated": torch.cuda.memory_allocated(), "live": live, "cap": [major, minor]}))
        """
    )
    workspaces = got["allocated"] - got["live"]
    expected = gpu.CUBLAS_THREADS * gpu.cublas_workspace_bytes(tuple(got["cap"]))
    assert abs(workspaces - expected) < 512 * 1024  # torch's own test allows 512 KiB (other small buffers)


def test_the_local_gpus_free_memory_is_read_without_creating_a_context() -> None:
    got = fresh(
        """
        import json, torch
        from blipmon.estimate.gpu import local_gpu
        g = local_gpu(0)
        print(json.dumps({"free": g.free, "total": g.total, "own": g.own_context, "how": g.how,
                          "context": bool(torch._C._cuda_hasPrimaryContext(0))}))
        """
    )
    assert got["context"] is False and got["own"] is False
    assert got["free"] is not None and 0 < got["free"] <= got["total"], got["how"]
