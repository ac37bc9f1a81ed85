"""The real NVML path: torch's device found in NVML by UUID, device-used at least torch's reserved memory.

Deselected by default; on a machine with an NVIDIA GPU: ``pytest -m gpu tests/gpu/test_gpu_nvml.py``.
Nothing is mocked. Each check runs in a fresh Python process so ``CUDA_VISIBLE_DEVICES`` can be set
before CUDA starts: by index, and by UUID (the form schedulers and MIG set-ups use).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support import PATIENCE_S, subprocess_env

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

MIB = 1024**2

# Holds 256 MiB on cuda:0, samples once with the real sampler (real pynvml, real torch), prints what it saw.
PROBE = textwrap.dedent(
    """
    import json, os, torch
    from blipmon.runner.nvml import normalize_uuid
    from blipmon.runner.sampler import Sampler

    records = []
    held = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    s = Sampler(lambda kind, **f: records.append({"type": kind, **f}), 10, cuda=True, cuda_device=0)
    s.start_nvml()
    rec = s.sample()
    mapping = next(r for r in records if r["type"] == "nvml")["devices"]["cuda:0"]
    print(json.dumps({
        "sample": rec,
        "mapping": mapping,
        "reserved": torch.cuda.memory_reserved(0),
        "torch_uuid": normalize_uuid(str(torch.cuda.get_device_properties(0).uuid)),
        "torch_total": torch.cuda.get_device_properties(0).total_memory,
        "notes": [r["message"] for r in records if r["type"] == "note"],
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }))
    """
)


@pytest.fixture(scope="module", autouse=True)
def needs_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU visible to torch")


def probe(cache: Path, visible: str | None) -> dict[str, Any]:
    env = subprocess_env(cache, gpu=True)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=PATIENCE_S, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def nvml_uuids() -> list[str]:
    import pynvml

    pynvml.nvmlInit()
    try:
        return [
            str(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)))
            for i in range(pynvml.nvmlDeviceGetCount())
        ]
    finally:
        pynvml.nvmlShutdown()


def check(seen: dict[str, Any]) -> None:
    from blipmon.runner.nvml import normalize_uuid

    m = seen["mapping"]
    assert m is not None, seen["notes"]
    assert normalize_uuid(m["uuid"]) == seen["torch_uuid"], seen  # the handle is torch's device
    assert m["matched_by"].startswith("uuid"), seen
    rec = seen["sample"]
    assert rec["res"] == seen["reserved"] >= 256 * MIB
    assert rec["dev"] >= seen["reserved"], seen  # NVML's used includes every byte the allocator reserved
    assert m["total"] >= seen["torch_total"], seen  # NVML's total includes what the driver keeps back
    if "proc_gpu" in rec:  # on the host NVML lists this process by its PID
        assert rec["proc_gpu"] >= seen["reserved"], seen
    else:  # in a container: host PIDs; unknown, with the note that says why
        assert any("does not list this process" in n for n in seen["notes"]), seen


def test_nvml_reads_torchs_device(blipmon_cache: Path) -> None:
    check(probe(blipmon_cache, None))


def test_the_last_gpu_by_index_is_read_as_cuda_0(blipmon_cache: Path) -> None:
    uuids = nvml_uuids()
    seen = probe(blipmon_cache, str(len(uuids) - 1))
    check(seen)
    if seen["mapping"]["mig"] is False:
        assert seen["mapping"]["nvml_index"] == len(uuids) - 1


def test_cuda_visible_devices_by_uuid(blipmon_cache: Path) -> None:
    uuids = nvml_uuids()
    seen = probe(blipmon_cache, uuids[-1])
    check(seen)
    if seen["mapping"]["mig"] is False:
        assert seen["mapping"]["uuid"] == uuids[-1]


def test_watch_sums_only_the_commands_gpu(blipmon_cache: Path, tmp_path: Path) -> None:
    """``blipmon watch`` around a process holding 256 MiB: its GPU only, with that GPU's capacity."""
    from blipmon.core.run import load_run

    env = subprocess_env(blipmon_cache, gpu=True)
    hold = "import torch, time; x = torch.empty(256 << 20, dtype=torch.uint8, device='cuda'); time.sleep(3)"
    done = subprocess.run(
        [sys.executable, "-m", "blipmon", "watch", "--out", str(tmp_path), "--", sys.executable, "-c", hold],
        capture_output=True, text=True, timeout=PATIENCE_S, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if (p / "events.jsonl").is_file()]
    run = load_run(run_dir)
    env_rec = run.environment
    if "PID namespace of its own" in " ".join(run.notes):
        pytest.skip("in a container the command's GPU cannot be told from NVML's host PIDs (noted in the run)")
    assert len(env_rec["command_gpus"]) == 1, env_rec
    assert run.peaks()["device_used"] >= 256 * MIB
    assert env_rec["gpu_total_bytes"] >= run.peaks()["device_used"]
    assert "peak GPU" in done.stderr and "unknown" not in done.stderr
