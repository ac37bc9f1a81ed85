"""Random-weight snapshots hold the heads the real checkpoint keeps untied (issue 13 follow-up 1).

mT0-XL's checkpoint stores its own ``lm_head`` (``tie_word_embeddings`` false), so the estimate counts
4,835,309,056 parameters (``catalog.param_count``). A random snapshot saved from a model built from its config kept
the head tied, and a load through it held 250,112 x 2,048 fewer. ``from_pretrained`` re-ties a stored head whose
values equal the input embedding's whatever the config says (T5's config forces ``tie_word_embeddings`` true), so
the snapshot's head needs values of its own.

The snapshot is made by the runner's own ``random_snapshot`` for the real id (so the real checkpoint's config
decides the untying) from the tiny BLIP-2 T5 architecture (so it is small), into a cache of the test's own; then
``load_model`` loads it exactly as a random-weight run of ``Gregor/mblip-mt0-xl`` with a device-map table does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blipmon.architectures import catalog
from blipmon.core.config import resolve
from blipmon.estimate import load
from blipmon.runner import models

MT0 = "Gregor/mblip-mt0-xl"
VOCAB, D_MODEL = 1024, 64  # the tiny T5 language model's vocabulary and width (runner.models.tiny_config)


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own: the session's must not gain a (tiny) snapshot under a real model's name."""
    monkeypatch.setenv("BLIPMON_CACHE", str(tmp_path))
    return tmp_path


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # unique parameters: a tied pair counts once


def _tiny_untied_raw() -> dict:
    raw = models.tiny_config("tiny/blip2-t5").to_dict()
    raw["text_config"]["tie_word_embeddings"] = False  # as mT0-XL's config.json says
    return raw


def test_the_checkpoints_untied_head_is_what_the_estimate_counts() -> None:
    # The premise, from the shipped config and catalog: what a random run must load.
    assert catalog.raw_config(MT0)["text_config"]["tie_word_embeddings"] is False
    assert catalog.param_count(MT0) == 4_323_079_680 + 250_112 * 2_048 == 4_835_309_056
    assert load.estimate_load(resolve("load/mblip-bf16"), gpus=1).total_params == catalog.param_count(MT0)


def test_a_random_snapshot_loads_with_the_checkpoints_untied_head(own_cache: Path) -> None:
    tiny = models.tiny_config("tiny/blip2-t5")
    tied = _count(models.model_class(tiny)(tiny))  # built from its config: head tied to the input embedding
    assert tied == 504_960
    expected = tied + VOCAB * D_MODEL  # the head as a parameter of its own
    assert expected == _count(catalog.meta_model(_tiny_untied_raw())) == 570_496  # the catalog's count of it

    folder = models.random_snapshot(MT0, tiny)
    assert folder == load.snapshot_dir(MT0) == own_cache / "random" / "Gregor--mblip-mt0-xl-v2"
    saved = json.loads((folder / "config.json").read_text())
    assert saved["text_config"]["vocab_size"] == VOCAB and saved["text_config"]["d_model"] == D_MODEL

    # A random-weight run with a device-map table goes through the snapshot and from_pretrained.
    cfg = resolve("load/mblip-bf16", ["job.kind=load", "model.weights=random",
                        'model.device_map={"" = "cpu"}'])  # fmt: skip
    loaded = models.load_model(cfg, cuda=False)
    assert loaded.source == str(folder)
    lm = loaded.model.language_model
    assert (lm.lm_head.weight is lm.shared.weight) is False
    assert _count(loaded.model) == expected
    assert models.placement(loaded.model) == {"cpu": expected * 2}  # bfloat16


def test_a_checkpoint_with_a_tied_head_stays_tied(own_cache: Path) -> None:
    """BLIP-2 OPT-2.7b ties its head (no ``tie_word_embeddings: false``): nothing is added."""
    assert catalog.raw_config("Salesforce/blip2-opt-2.7b")["text_config"].get("tie_word_embeddings") is not False
    tiny = models.tiny_config("tiny/blip2-opt")
    tied = _count(models.model_class(tiny)(tiny))
    folder = models.random_snapshot("Salesforce/blip2-opt-2.7b", tiny)
    reloaded = models.model_class(tiny).from_pretrained(folder, dtype=torch.bfloat16)
    assert _count(reloaded) == tied


def test_blipmon_run_of_a_random_load_records_the_untied_heads_bytes(
    own_cache: Path, tmp_path: Path, run_cli, load_run
) -> None:
    """The same through ``blipmon run``: the child's load record holds the untied model's bfloat16 bytes."""
    models.random_snapshot(MT0, models.tiny_config("tiny/blip2-t5"))
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli("run", "load/mblip-bf16", "--set", "job.kind=load", "--set", "model.weights=random",
                   "--set", 'model.device_map={"" = "cpu"}', cwd=work, env={"BLIPMON_CACHE": str(own_cache)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (work / "profiles").iterdir()
    loaded = load_run(run_dir).load
    assert loaded["params_bytes"] == (504_960 + VOCAB * D_MODEL) * 2 == 1_140_992
    assert loaded["placement"] == {"cpu": 1_140_992}
