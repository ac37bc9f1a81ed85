"""The real GPU side of issue 15 items 4 (child), 7, 8 and 10: exact OOM bytes, no CUDA context in the parent.

Deselected by default; on a machine with an NVIDIA GPU: ``pytest -m gpu tests/gpu/test_gpu_oom.py``.
Nothing is mocked: the out-of-memory is a real allocation larger than the card, seen by torch's real
out-of-memory observer; NVML is the driver's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

MIB, GIB = 1024**2, 1024**3


@pytest.fixture(scope="module", autouse=True)
def needs_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU visible to torch")


def test_the_oom_record_has_the_allocator_s_exact_bytes_and_device() -> None:
    import torch

    from blipmon.core.units import requested_bytes_from_message
    from blipmon.runner.child import OOM_OBSERVER, _record_failure
    from blipmon.runner.train import Cursor

    assert OOM_OBSERVER.attach(torch)
    total = torch.cuda.get_device_properties(0).total_memory
    # More than the card, a multiple of the allocator's 2 MiB rounding for large blocks (and of 512 B): the
    # allocator asks CUDA for exactly this many bytes, and tells its observers so.
    size = (total // (2 * MIB) + 1021) * 2 * MIB
    if size % (GIB // 4) == 0:  # a quarter GiB prints exactly: keep the message's rounding visible
        size += 2 * MIB
    out: list[dict[str, Any]] = []
    try:
        torch.empty(size, dtype=torch.uint8, device="cuda:0")
    except torch.OutOfMemoryError as e:
        status = _record_failure(e, Cursor(), lambda kind, **f: out.append(f), 0, devices=[0], observer=OOM_OBSERVER)
        message = str(e)
    else:
        pytest.fail(f"allocating {size} bytes on a {total}-byte GPU did not fail")
    assert status == ("oom", 3)
    rec = out[0]
    assert rec["requested_bytes"] == size and rec["requested_source"] == "allocator"
    assert requested_bytes_from_message(message) != size  # the message alone rounds it (two decimals of GiB)
    assert rec["device"] == "cuda:0"
    assert rec["device_limit"] == torch.cuda.mem_get_info(0)[1]
    assert rec["allocated"] == torch.cuda.memory_allocated(0)
    assert rec["reserved"] == torch.cuda.memory_reserved(0)


def test_the_bf16_check_reads_nvml_and_leaves_cuda_uninitialised_in_the_parent() -> None:
    code = (
        "import json, torch\n"
        "from blipmon.core.config import resolve\n"
        "from blipmon.runner.preflight import bf16_capability, preflight\n"
        "check = bf16_capability([0])\n"
        "refused = None\n"
        "try:\n"
        "    preflight(resolve('tiny/blip2-opt', ['train.precision=bf16-mixed', 'model.device_map=cuda']))\n"
        "except Exception as e:\n"
        "    refused = str(e)\n"
        "print(json.dumps({'supported': check.supported, 'reason': check.reason, 'refused': refused,\n"
        "                  'cuda_initialised': torch.cuda.is_initialized()}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(p.stdout.strip().splitlines()[-1])
    import torch

    expected = torch.cuda.get_device_capability(0) >= (8, 0)  # this process may touch CUDA: it is the test
    assert got["supported"] is expected, got
    assert (got["refused"] is None) is expected, got
    assert got["cuda_initialised"] is False  # the parent holds no CUDA context after its preflight


def test_a_gpu_load_records_its_peak_and_the_allocator_settings_in_effect(start_run: Any) -> None:
    rp = start_run("tiny/blip2-opt", "model.device_map=cuda", "job.kind=load", "runtime.alloc_conf=max_split_size_mb:128",
                   gpu=True)  # fmt: skip
    done = rp.finish()
    assert done.returncode == 0, rp.describe()
    run = done.run()
    assert run.environment["allocator_settings"] == {
        "PYTORCH_ALLOC_CONF": "max_split_size_mb:128",
        "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128",
        "torch": "max_split_size_mb:128",
    }
    load = run.load
    assert load is not None and "devices" not in load  # one GPU: its own figures are the sums
    assert load["peak"] >= load["placement"]["cuda:0"]  # the weights were on the GPU at the peak
    assert load["reserved"] >= load["allocated"]
