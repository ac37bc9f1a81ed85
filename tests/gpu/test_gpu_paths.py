"""The GPU paths of the recorder: allocator figures, NVML samples and a real CUDA out-of-memory.

Deselected by default (``-m 'not gpu'`` in pyproject); on a machine with an NVIDIA GPU run them with
``pytest tests/gpu -m gpu``. Nothing is mocked: a real ``blipmon run`` trains the tiny model on the
GPU, and the OOM is a real one (another process holds all but a little of the GPU's memory).

Every figure is held to a value read another way: the device's name and size from torch's device properties
and NVML in this process, the allocator's first reading from the model's own storages (and the caching
allocator's 512-byte rounding), reserved memory from its 2 MiB segments, NVML's device-used from the
allocator's reserved, the OOM's requested size from torch's own message.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blipmon.core.run import PHASES, RunData

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

GIB = 1024**3
MIB = 1024**2
BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes (kMinBlockSize)
SEGMENT = 2 * MIB  # ... and reserves memory in segments of whole 2 MiB (small pool, and large rounded to 2 MiB)
CUDA_RUN = ("model.device_map=cuda", "train.batch_size=2", "train.accumulate_grad_batches=2",
            "train.num_train_samples=8", "train.max_epochs=1", "runtime.sample_hz=20")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def needs_cuda() -> None:
    """``-m gpu`` on a machine whose torch sees no GPU (a CPU build of torch, no driver) is a broken set-up: fail."""
    import torch

    if not torch.cuda.is_available():
        pytest.fail("a gpu test needs an NVIDIA GPU visible to torch (a CUDA build of torch and a driver)")


@pytest.fixture(scope="module")
def gpu_runs(start_run: Any) -> dict[str, Any]:
    return {
        "train": start_run("tiny/blip2-opt", *CUDA_RUN, fast=False, gpu=True),
        "load": start_run("tiny/blip2-opt", "model.device_map=cuda", "job.kind=load", gpu=True),
    }


@pytest.fixture(scope="module")
def train(gpu_runs: dict[str, Any]) -> RunData:
    fin = gpu_runs["train"].finish()
    assert fin.returncode == 0, f"{fin.stderr}\n{gpu_runs['train'].describe()}"
    return fin.run()


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def nvml_total_bytes() -> int:
    """GPU 0's memory as the driver reports it through NVML, read in this process (no CUDA context needed)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
    finally:
        pynvml.nvmlShutdown()


def model_storages(path: Path) -> list[int]:
    """Bytes of each distinct storage a tiny checkpoint puts on the device: parameters and buffers, loaded here."""
    from transformers import AutoConfig

    from blipmon.runner.models import model_class

    model = model_class(AutoConfig.from_pretrained(path)).from_pretrained(path)
    seen = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]
    }
    return list(seen.values())


def test_environment_names_the_gpu(train: RunData) -> None:
    import torch

    env = train.environment
    props = torch.cuda.get_device_properties(0)
    assert env["device"] == "cuda"
    assert env["gpu_name"] == props.name == torch.cuda.get_device_name(0)
    assert env["gpu_total_bytes"] == props.total_memory
    # NVML's total also counts what the driver keeps for itself (a few hundred MiB), never less than CUDA's.
    assert 0 <= nvml_total_bytes() - env["gpu_total_bytes"] < 2 * GIB


def test_every_phase_has_allocated_peak_reserved_and_other(
    train: RunData, tiny_facts: dict[str, Any], tiny_models: dict[str, Path]
) -> None:
    facts = tiny_facts["tiny/blip2-opt"]
    assert train.phases
    # Before the first forward only the model is on the GPU: the allocator holds exactly its storages, each
    # rounded up to the allocator's 512-byte blocks (bounds: unrounded, and every storage rounded).
    first = train.phases[0]
    assert (first["step"], first["micro_step"], first["phase"]) == (0, 0, "before_fwd")
    sizes = model_storages(tiny_models["tiny/blip2-opt"])
    assert sum(sizes) == facts.params_bytes + facts.buffers_bytes
    rounded = sum(-(-n // BLOCK) * BLOCK for n in sizes)
    assert sum(sizes) <= first["allocated"] <= rounded
    assert (first["grads"], first["optim"], first["acts"]) == (0, 0, 0)
    assert facts.buffers_bytes <= first["other"] <= rounded - facts.params_bytes  # buffers and rounding, nothing else
    # torch's AdamW on CUDA (foreach, not capturable or fused) keeps its per-tensor step counters on the host:
    # they are optimizer state, but not in the GPU's allocator.
    host_steps = facts.param_tensors * facts.adamw_step_bytes
    prev = None
    for p in train.phases:
        where = (p["step"], p["micro_step"], p["phase"])
        for k in ("allocated", "peak", "reserved", "other"):
            assert is_int(p[k]), (where, k, p[k])
        assert p["params"] == facts.params_bytes, where
        # The definition of "other" (docs/profile-format.md): the allocator's figure (anchored above) less what the categories hold on
        # the GPU.
        optim_on_gpu = p["optim"] - (host_steps if p["optim"] else 0)
        assert p["other"] == p["allocated"] - (p["params"] + p["grads"] + optim_on_gpu + p["acts"]), where
        assert p["other"] >= 0, where
        assert p["reserved"] >= p["allocated"], where
        assert p["reserved"] % SEGMENT == 0, where  # the allocator's reserved, not some other total
        # The peak is the allocator's since the previous boundary: at least what was allocated at either end.
        assert p["peak"] >= p["allocated"], where
        if prev is not None:
            assert p["peak"] >= prev["allocated"], where
        prev = p


def test_the_memory_story_holds_on_the_gpu(train: RunData, tiny_facts: dict[str, Any]) -> None:
    facts = tiny_facts["tiny/blip2-opt"]
    for p in train.phases:
        assert (p["acts"] > 0) == (p["phase"] == "after_fwd")
        if p["phase"] == "after_fwd":
            assert p["peak"] >= p["params"] + p["acts"]
    after_first_step = False
    for p in train.phases:
        if p["phase"] == "after_opt_step":
            after_first_step = True
        assert p["optim"] == (facts.adamw_state_bytes if after_first_step else 0)
    assert [p["phase"] for p in train.phases if p["step"] == 0] == [
        "before_fwd", "after_fwd", "after_bwd", "before_fwd", "after_fwd", "after_bwd", "after_opt_step"
    ]  # fmt: skip


def test_nvml_samples_record_device_memory(train: RunData) -> None:
    assert len(train.samples) >= 1
    assert not any(n.startswith("NVML unavailable") for n in train.notes), train.notes
    total = nvml_total_bytes()
    pairs = list(zip(train.samples.reserved, train.samples.device_used, strict=True))
    assert pairs and all(is_int(r) and is_int(u) for r, u in pairs), pairs[:5]
    # NVML's device-used counts every process's memory on the card, this one's reserved segments (read just
    # before it, in the same sample) and its CUDA context included: at least the reserved, at most the card.
    for reserved, used in pairs:
        assert reserved < used <= total, (reserved, used, total)
    assert all(is_int(v) for v in train.samples.allocated)


def test_summary_peaks_are_integers_on_cuda(train: RunData, run_cli: Any, tiny_facts: dict[str, Any]) -> None:
    import json

    res = run_cli("show", train.path, "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    peaks = s["peaks"]
    for k in ("allocated", "reserved", "device_used", "host_rss"):
        assert is_int(peaks[k]), k
    assert peaks["allocated"] >= max(p["peak"] for p in s["phases"])
    # At the first optimizer step the fp32 weights, their gradients and AdamW's two moments (each the size of the
    # weights) are all on the GPU at once.
    assert peaks["allocated"] >= 4 * tiny_facts["tiny/blip2-opt"].params_bytes
    assert peaks["reserved"] >= peaks["allocated"] and peaks["reserved"] % SEGMENT == 0
    assert max(r for r in train.samples.reserved) < peaks["device_used"] <= nvml_total_bytes()
    assert peaks["host_rss"] >= max(p["host_rss"] for p in s["phases"])
    assert all(p["phase"] in PHASES for p in s["phases"])


def test_load_job_places_the_parameters_on_the_gpu(gpu_runs: dict[str, Any], tiny_facts: dict[str, Any]) -> None:
    fin = gpu_runs["load"].finish()
    assert fin.returncode == 0, fin.stderr
    run = fin.run()
    expected = tiny_facts["tiny/blip2-opt"].params_bytes
    assert run.load is not None
    assert run.load["params_bytes"] == expected
    assert run.load["placement"] == {"cuda:0": expected}
    assert is_int(run.load["peak"]) and run.load["peak"] >= expected


# -- a real CUDA out-of-memory ------------------------------------------------------------------------

HEADROOM = 3 * GIB  # what the hog leaves free: a CUDA context and the tiny model fit, the big batch does not
# 4096 samples x (3x128x128 pixels + 108 tokens): ~8 GiB of activations in the first forward.
OOM_RUN = ("model.device_map=cuda", "train.batch_size=4096", "train.num_train_samples=4096",
           "data.max_length=100", "train.max_epochs=1")  # fmt: skip
HOG = """
import sys, torch
free, total = torch.cuda.mem_get_info(0)
hold = torch.empty(max(free - int(sys.argv[1]), 0), dtype=torch.uint8, device="cuda:0")
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def gpu_mostly_full() -> Iterator[None]:
    """Another process holds all but ``HEADROOM`` of the GPU's free memory until the test ends."""
    hog = subprocess.Popen(
        [sys.executable, "-c", HOG, str(HEADROOM)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert hog.stdout is not None and hog.stdout.readline().strip() == "ready"
        yield
    finally:
        if hog.stdin is not None:
            hog.stdin.close()
        try:
            hog.wait(timeout=30)
        except subprocess.TimeoutExpired:
            hog.kill()
            hog.wait()


def test_cuda_oom_is_recorded_with_step_phase_and_requested_bytes(
    start_run: Any, run_cli: Any, gpu_mostly_full: None, tiny_facts: dict[str, Any]
) -> None:
    rp = start_run("tiny/blip2-opt", *OOM_RUN, fast=False, gpu=True)
    fin = rp.finish()
    assert "Traceback" not in fin.stderr
    run = fin.run()
    assert run.status == "oom", (run.error, rp.describe())
    assert fin.returncode == 3
    oom = run.oom
    assert oom is not None
    # The batch goes to the GPU and the first forward keeps ~8 GiB of activations: it runs out there.
    assert (oom["step"], oom["micro_step"], oom["phase"]) == (0, 0, "forward")
    assert "out of memory" in oom["message"].lower()
    # The size torch says it tried to allocate ("Tried to allocate 2.00 GiB": two decimals, so within half a
    # hundredth of the unit), read here from the message with a pattern of this test's own.
    # (c10's format_size: "N bytes" up to 1 KiB, then KiB, MiB or GiB with two decimals.)
    said = re.search(r"Tried to allocate (\d+(?:\.\d+)?) (bytes|KiB|MiB|GiB)\b", oom["message"])
    assert said is not None, oom["message"]
    unit = {"bytes": 1, "KiB": 1024, "MiB": MIB, "GiB": GIB}[said.group(2)]
    assert is_int(oom["requested_bytes"])
    assert abs(oom["requested_bytes"] - float(said.group(1)) * unit) <= 0.005 * unit
    for k in ("allocated", "reserved", "peak"):  # the memory state at that moment
        assert is_int(oom[k]), k
    # That state is this process's allocator: the model is in it, and it never reserved more than the hog left.
    assert tiny_facts["tiny/blip2-opt"].params_bytes <= oom["allocated"] <= oom["peak"]
    assert oom["allocated"] <= oom["reserved"] < HEADROOM and oom["reserved"] % SEGMENT == 0
    assert run.end is not None and run.end["status"] == "oom"
    s = run.summary()
    assert s["oom"]["requested_bytes"] == oom["requested_bytes"] and s["status"] == "oom"
    show = run_cli("show", fin.run_dir)
    assert "OUT OF MEMORY at step 0" in show.stdout and "trying to allocate" in show.stdout
