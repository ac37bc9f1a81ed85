"""The optimizer step's temporaries on CUDA, against the real caching allocator (issue 19, item 3).

Deselected by default (``-m 'not gpu'``); on a lent GPU: ``pytest tests/gpu/test_gpu_optimizer_step.py -m gpu``.
Each check runs in a fresh interpreter (default allocator settings, nothing cached) and measures
``max_memory_allocated`` around ``optimizer.step()`` only. Every tensor is under 1 MiB, so each allocation is its
size rounded up to 512 bytes (small pool blocks are split exactly): the expected figures are exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from blipmon.estimate import static

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

# Two fp32 parameters and one bf16 one: foreach makes one group per dtype.
SHAPES = [((256, 512), "float32"), ((128, 96), "float32"), ((200, 300), "bfloat16")]


@pytest.fixture(scope="module", autouse=True)
def needs_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.fail("a gpu test needs an NVIDIA GPU visible to torch (a CUDA build of torch and a driver)")


def _round(n: int) -> int:
    return -(-n // 512) * 512


def fresh(code: str, optim: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), json.dumps(SHAPES), optim],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


STEP = """
import json, sys, torch
shapes, optim = json.loads(sys.argv[1]), sys.argv[2]
params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(getattr(torch, d))) for s, d in shapes]
if optim == "adamw":
    opt = torch.optim.AdamW(params, lr=1e-3)
else:
    import bitsandbytes as bnb
    opt = bnb.optim.Adam8bit(params, lr=1e-3)
out = []
for step in range(2):
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    out.append({"extra": torch.cuda.max_memory_allocated() - before, "after": torch.cuda.memory_allocated() - before})
    for p in params:
        p.grad = None
print(json.dumps(out))
"""


def _sizes() -> list[tuple[int, int, object]]:
    import torch

    out = []
    for shape, dtype in SHAPES:
        n = shape[0] * shape[1]
        d = getattr(torch, dtype)
        out.append((n, n * torch.empty((), dtype=d).element_size(), d))
    return out


def test_foreach_adamw_holds_one_sqrt_per_parameter_of_both_dtype_groups() -> None:
    got = fresh(STEP, "adamw")
    step = static.optimizer_step("adamw", _sizes(), "cuda")
    assert step.implementation == "foreach"
    temps = sum(_round(b) for b in step.tensors)
    state = sum(2 * _round(b) for _n, b, _d in _sizes())  # exp_avg, exp_avg_sq; ``step`` stays on the host
    assert got[0]["after"] == state
    assert got[0]["extra"] == state + temps
    assert got[1]["extra"] == temps and got[1]["after"] == 0


def test_bitsandbytes_8bit_adam_updates_in_place_on_cuda() -> None:
    got = fresh(STEP, "adam_8bit")
    step = static.optimizer_step("adam_8bit", _sizes(), "cuda")
    assert step.implementation == "bitsandbytes-cuda" and step.temp == 0
    # the state, tensor by tensor as the allocator holds it (uint8 states, fp32 absmax, the two maps' device copies)
    state = sum(_round(b) for b in static._optimizer_device_tensors("adam_8bit", _sizes(), "cuda"))
    assert got[0]["after"] == state
    assert got[0]["extra"] == state  # made parameter by parameter, nothing besides
    assert got[1]["extra"] == 0
