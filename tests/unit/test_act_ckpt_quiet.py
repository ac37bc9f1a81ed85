"""Estimates with activation checkpointing write nothing on stderr, and leave a real run's own warning alone.

Issue 13 follow-up 4: ``blipmon fit h100/baseline`` printed transformers' "`use_cache=True` is incompatible with
gradient checkpointing. Setting `use_cache=False`." while it estimated its act_ckpt knob: the estimator's traced
training step enables checkpointing on a model whose config says ``use_cache = True``. The estimator now sets
``use_cache`` false on its own model (``activations.caches_off_under_checkpointing``), which is what transformers
does in that forward anyway; a real run, even in the same process after an estimate, still gets transformers'
message (a ``warning_once`` the estimator no longer uses up).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import subprocess_env

from blipmon.estimate import activations
from blipmon.runner.models import tiny_config

USE_CACHE_LINE = "`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`."


def test_estimate_with_act_ckpt_writes_nothing_on_stderr(run_cli) -> None:
    proc = run_cli("estimate", "tiny/blip2-opt", "--set", "train.act_ckpt=true", "--gpu-memory", "80GiB")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    assert proc.stdout.count("\nverdict  FITS with ") == 1


def test_fit_of_the_lab_baseline_writes_nothing_on_stderr(run_cli) -> None:
    """The reported case: fit estimates the act_ckpt knob of BLIP-2 OPT-2.7b (use_cache true in its config)."""
    proc = run_cli("fit", "h100/baseline", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    assert "act_ckpt" in proc.stdout


def test_only_the_estimators_model_loses_its_cache_setting() -> None:
    from transformers import Blip2ForConditionalGeneration

    config = tiny_config("tiny/blip2-opt")
    assert config.text_config.use_cache is True  # OPT's default: what makes transformers speak
    model = Blip2ForConditionalGeneration(config)
    other = Blip2ForConditionalGeneration(tiny_config("tiny/blip2-opt"))
    # the language model's config (text_config) is the one config with use_cache in BLIP-2 OPT
    assert activations.caches_off_under_checkpointing(model) == 1
    assert model.config.text_config.use_cache is False and model.language_model.config.use_cache is False
    assert other.config.text_config.use_cache is True
    assert activations.caches_off_under_checkpointing(model) == 0


REAL_AFTER_ESTIMATE = r"""
import sys, torch
from blipmon.core.config import resolve
from blipmon.estimate.judge import judge
from blipmon.runner.models import load_model
from blipmon.runner.train import enable_activation_checkpointing

cfg = resolve("tiny/blip2-opt", ["train.act_ckpt=true", "model.device_map=cpu"])
judge(cfg, gpu_memory=80 * 1024**3)
print("ESTIMATED", file=sys.stderr, flush=True)
loaded = load_model(cfg, cuda=False)
model = loaded.model
enable_activation_checkpointing(model)
model.train()
ids = torch.randint(3, 1000, (1, 12))
pixels = torch.randn(1, 3, 128, 128)
model(pixel_values=pixels, input_ids=ids, labels=ids).loss.backward()
print("TRAINED", file=sys.stderr, flush=True)
"""


def test_a_real_run_after_an_estimate_still_gets_transformers_message(tmp_path: Path, blipmon_cache: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", REAL_AFTER_ESTIMATE], capture_output=True, text=True, timeout=300,
        env=subprocess_env(blipmon_cache),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    during_estimate, rest = proc.stderr.split("ESTIMATED\n")
    during_real_step = rest.split("TRAINED\n")[0]
    assert USE_CACHE_LINE not in during_estimate  # nothing from the estimate
    assert during_real_step.count(USE_CACHE_LINE) == 1  # the real forward's own warning, once
