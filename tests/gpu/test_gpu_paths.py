"""The GPU paths of the recorder: allocator figures, NVML samples and a real CUDA out-of-memory.

Deselected by default (``-m 'not gpu'`` in pyproject); on a machine with an NVIDIA GPU run them with
``pytest tests/gpu -m gpu``. Nothing is mocked: a real ``blipmon run`` trains the tiny model on the
GPU, and the OOM is a real one (another process holds all but a little of the GPU's memory).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from blipmon.core.run import PHASES, RunData

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

GIB = 1024**3
CUDA_RUN = ("model.device_map=cuda", "train.batch_size=2", "train.accumulate_grad_batches=2",
            "train.num_train_samples=8", "train.max_epochs=1", "runtime.sample_hz=20")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def needs_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU visible to torch")


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


def test_environment_names_the_gpu(train: RunData) -> None:
    env = train.environment
    assert env["device"] == "cuda"
    assert isinstance(env["gpu_name"], str) and env["gpu_name"]
    assert is_int(env["gpu_total_bytes"]) and env["gpu_total_bytes"] > 0


def test_every_phase_has_allocated_peak_reserved_and_other(train: RunData, tiny_facts: dict[str, Any]) -> None:
    facts = tiny_facts["tiny/blip2-opt"]
    assert train.phases
    prev = None
    for p in train.phases:
        where = (p["step"], p["micro_step"], p["phase"])
        for k in ("allocated", "peak", "reserved", "other"):
            assert is_int(p[k]), (where, k, p[k])
        assert p["params"] == facts.params_bytes, where
        # Everything the categories count lives on the GPU, so "other" is exactly the rest.
        assert p["other"] == p["allocated"] - (p["params"] + p["grads"] + p["optim"] + p["acts"]), where
        assert p["other"] >= 0, where
        assert p["reserved"] >= p["allocated"], where
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
    used = [v for v in train.samples.device_used if v is not None]
    assert used and all(v > 0 for v in used)
    assert all(is_int(v) for v in train.samples.allocated)
    assert not any(n.startswith("NVML unavailable") for n in train.notes), train.notes


def test_summary_peaks_are_integers_on_cuda(train: RunData, run_cli: Any) -> None:
    import json

    res = run_cli("show", train.path, "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    for k in ("allocated", "reserved", "device_used", "host_rss"):
        assert is_int(s["peaks"][k]) and s["peaks"][k] > 0, k
    assert s["peaks"]["allocated"] >= max(p["peak"] for p in s["phases"])
    assert s["peaks"]["reserved"] >= s["peaks"]["allocated"]
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
    start_run: Any, run_cli: Any, gpu_mostly_full: None
) -> None:
    rp = start_run("tiny/blip2-opt", *OOM_RUN, fast=False, gpu=True)
    fin = rp.finish()
    assert "Traceback" not in fin.stderr
    run = fin.run()
    assert run.status == "oom", (run.error, rp.describe())
    assert fin.returncode == 3
    oom = run.oom
    assert oom is not None
    assert oom["step"] == 0 and oom["micro_step"] == 0 and oom["phase"] in ("forward", "backward")
    assert is_int(oom["requested_bytes"]) and oom["requested_bytes"] > 0
    assert "out of memory" in oom["message"].lower()
    for k in ("allocated", "reserved", "peak"):  # the memory state at that moment
        assert is_int(oom[k]), k
    assert run.end is not None and run.end["status"] == "oom"
    s = run.summary()
    assert s["oom"]["requested_bytes"] == oom["requested_bytes"] and s["status"] == "oom"
    show = run_cli("show", fin.run_dir)
    assert "OUT OF MEMORY at step 0" in show.stdout and "trying to allocate" in show.stdout
