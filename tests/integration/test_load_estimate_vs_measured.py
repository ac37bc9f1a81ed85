"""The host peak of a CPU load, predicted against measured (issue 13's bar: within 10 %).

Each load runs the runner's own ``load_model`` in a fresh interpreter and reports its peak resident size
(``VmHWM``: the kernel's high-water mark of its memory, which no sampling can miss; not ``ru_maxrss``, which a
process spawned from a large one (pytest) inherits from its parent); what the load needs first (the tiny
model's files, a random snapshot) is made beforehand in another process, as a second run would find it. The
real child is checked too: ``blipmon run`` of the tiny load and generate jobs, its recorded host RSS peak.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blipmon.core.config import resolve
from blipmon.estimate import timeline
from blipmon.estimate.judge import judge

REPO = Path(__file__).resolve().parents[2]
GIB = 1024**3

MEASURE = """
def hwm():  # this process's own peak RSS (VmHWM of its memory map): ru_maxrss would include the parent's
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
import json, resource, sys
from blipmon.core import config
from blipmon.runner.models import load_model, prepare_files
cfg = config.validate(json.loads(sys.argv[1]))
if sys.argv[2] == "prepare":
    prepare_files(cfg)
    raise SystemExit(0)
load_model(cfg, cuda=False)
print(json.dumps({"peak": hwm()}))
"""


# The process footprint behind the estimate's runtime constant (``load.LOAD_RUNTIME_BYTES``) was calibrated where
# importing the runner and transformers' BLIP-2 class took this much (VmHWM, the project's VM and venv). The same
# imports take more or less elsewhere -- 64 MB more in a fresh clone's venv on the same VM (the same packages: the
# shared libraries' pages come in from the page cache differently) -- which no estimate of a model's memory can know.
# So the footprint is measured here, the same way, and each prediction shifted by the difference: what is held to
# 10 % is the estimate, not the machine's import footprint.
CALIBRATION_IMPORTS_BYTES = 354_500_000
IMPORTS = """
def hwm():  # this process's own peak RSS (VmHWM of its memory map): ru_maxrss would include the parent's
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
import resource
import blipmon.runner.models
import transformers
from transformers import Blip2ForConditionalGeneration
print(hwm())
"""


@functools.lru_cache(maxsize=1)
def import_offset() -> int:
    """This machine's import footprint minus the calibration's (bytes; the median of three fresh processes)."""
    peaks = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=300,
                              cwd=REPO, env=_env())  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks.append(int(proc.stdout.strip().splitlines()[-1]))
    return sorted(peaks)[1] - CALIBRATION_IMPORTS_BYTES


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["BLIPMON_PREDICT"] = "0"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["HF_HUB_OFFLINE"] = "1"
    return env


def measured_peak(cfg: dict) -> int:
    return _measured(json.dumps(cfg))


@functools.lru_cache(maxsize=8)
def _measured(text: str) -> int:
    for step in ("prepare", "measure"):
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE, text, step],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
            env=_env(),
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak"])


CASES = {
    # the tiny checkpoint in its own dtype: its weights stay views of the mapped file
    "tiny fp32": ("tiny/blip2-opt", ["job.kind=load", "model.device_map=cpu"]),
    # converted to fp16 on the way: read (file pages) and copied
    "tiny fp16": ("tiny/blip2-opt", ["job.kind=load", "model.device_map=cpu", "model.dtype=float16"]),
    # real size, random weights built in place on the host (1.4 GB of fp32 parameters)
    "blip-vqa-base random fp32": (
        "tiny/blip-vqa",
        ["model.id=Salesforce/blip-vqa-base", "model.weights=random", "job.kind=load", "model.device_map=cpu"],
    ),
    # real size, through from_pretrained of the bf16 snapshot (a table places it), converted to fp32
    "blip-vqa-base snapshot fp32": (
        "tiny/blip-vqa",
        ["model.id=Salesforce/blip-vqa-base", "model.weights=random", "job.kind=load", 'model.device_map={"" = "cpu"}'],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_host_peak_of_a_cpu_load_within_10_percent(case: str) -> None:
    preset, sets = CASES[case]
    cfg = resolve(preset, sets)
    measured = measured_peak(cfg)
    predicted = judge(cfg, host_memory=64 * GIB).devices["cpu"] + import_offset()
    assert abs(predicted - measured) <= 0.10 * measured, (case, predicted, measured, import_offset())


@pytest.mark.parametrize("kind", ["load", "generate"])
def test_the_real_childs_host_peak_within_10_percent(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "blipmon", "run", "tiny/blip2-opt", "--set", f"job.kind={kind}",
           "--set", "model.device_map=cpu", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = next(p for p in out.iterdir() if p.is_dir())
    shown = subprocess.run(
        [sys.executable, "-m", "blipmon", "show", str(run_dir), "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=_env(),
    )  # fmt: skip
    measured = json.loads(shown.stdout)["peaks"]["host_rss"]
    cfg = resolve("tiny/blip2-opt", [f"job.kind={kind}", "model.device_map=cpu"])
    predicted = judge(cfg, host_memory=64 * GIB).devices["cpu"] + import_offset()
    assert abs(predicted - measured) <= 0.10 * measured, (kind, predicted, measured, import_offset())


# -- the weights-dependent part, which no constant can satisfy ------------------------------------------------------

VQA_BASE = ["model.id=Salesforce/blip-vqa-base", "model.weights=random", "model.device_map=cpu"]


def test_the_weights_dependent_part_fp32_minus_fp16_within_10_percent() -> None:
    """The same real-size model built in place in fp32 and in fp16: the difference of the host peaks is the weights'
    (385M parameters x 2 bytes), the process's constant cancels. Predicted vs measured difference within 10 %."""
    fp32 = resolve("tiny/blip-vqa", [*VQA_BASE, "job.kind=load"])
    fp16 = resolve("tiny/blip-vqa", [*VQA_BASE, "job.kind=load", "model.dtype=float16"])
    measured = measured_peak(fp32) - measured_peak(fp16)
    predicted = judge(fp32, host_memory=64 * GIB).devices["cpu"] - judge(fp16, host_memory=64 * GIB).devices["cpu"]
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)
    assert measured > 0.5 * GIB  # the weights' share, not noise: 2 bytes x 385M parameters ~ 0.72 GiB


GENERATE = """
def status(key):  # VmHWM: this process's own peak RSS (ru_maxrss would include the parent's); VmRSS: now
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
import json, resource, sys, torch
from blipmon.core import config
from blipmon.runner.data import SyntheticCaptions
from blipmon.runner.models import load_model
cfg = config.validate(json.loads(sys.argv[1]))
loaded = load_model(cfg, cuda=False)
model = loaded.model.eval()
b = cfg["train"]["batch_size"]
ds = SyntheticCaptions(model.config, loaded.family, b, max_length=8, seed=0)
items = [ds[i] for i in range(b)]
kw = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
      "input_ids": torch.stack([it["input_ids"] for it in items]),
      "max_new_tokens": min(cfg["data"]["max_length"], 30)}  # as runner.generate calls it for BLIP VQA
# A first, small generate outside the window: what the first call imports (and, in a fresh environment, compiles
# to bytecode) and allocates once would otherwise count as working memory, in whichever batch ran first.
with torch.inference_mode():
    model.generate(pixel_values=kw["pixel_values"][:1], input_ids=kw["input_ids"][:1], max_new_tokens=2)
# The peak from here on, over what is resident now: Linux resets VmHWM to the current RSS on "5" to clear_refs.
# Without it the loading's own peak (freed since, by an amount malloc decides) hid part of generate's growth.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
with torch.inference_mode():
    model.generate(**kw)
print(json.dumps({"growth": status("VmHWM") - before}))
"""


def _generate_growth(cfg: dict) -> int:
    # glibc returns every block of 64 KiB or more to the system when it is freed (a fixed mmap threshold also stops
    # the threshold from moving), so the peak RSS follows the tensors alive instead of what malloc kept cached.
    env = {**_env(), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", GENERATE, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["growth"])


def test_generate_working_memory_grows_with_the_batch_as_predicted() -> None:
    """A real generate call on the CPU (BLIP VQA base, random fp32): how much the host peak grows over the loaded
    model at batch 2 and at batch 8; the difference is the batch-dependent working memory (the vision tower's
    largest layer transient, its output, the key/value cache), predicted vs measured within 10 %.
    The peak is measured from the RSS at the start of generate (VmHWM reset there, after a first small generate
    that imports and compiles what the first call needs), with glibc returning blocks of 64 KiB and more when they
    are freed: measured from the loading's own peak with malloc's cache, the growth swung from 253 to 343 MB between
    runs and environments (a fresh one compiles transformers' generation code inside the window). Measured on the
    2-core VM at batch 2 and 8: +93.3 MB and +370.1 MB (276.8 MB apart; predicted 278.7 MB, +0.7 %), the same
    with a fresh bytecode cache."""
    small = resolve("tiny/blip-vqa", [*VQA_BASE, "job.kind=generate", "train.batch_size=2"])
    large = resolve("tiny/blip-vqa", [*VQA_BASE, "job.kind=generate", "train.batch_size=8"])
    measured = _generate_growth(large) - _generate_growth(small)
    est_small = judge(small, host_memory=64 * GIB).estimate.device("cpu")
    est_large = judge(large, host_memory=64 * GIB).estimate.device("cpu")
    predicted = est_large.acts - est_small.acts
    assert predicted == est_large.generate - est_small.generate  # the weights are the same: only the batch differs
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)
