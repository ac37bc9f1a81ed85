"""Per-module memory measured by the real child (issue 12): every tiny model and strategy, through ``blipmon run``.

Three runs, started together and read once: each tiny model, with LoRA, QLoRA and activation checkpointing spread
over them. In every one, at every boundary recorded in full, the root's four figures equal the ``phase`` record's
to the byte and every module's are at most its parent's (``module_checks.check_root_and_children``). DDP over two
ranks and DeepSpeed ZeRO-2 with the optimizer offloaded are held to the same rules, and to exact per-module
parameters, gradients and optimizer state, on the runs ``test_ddp.py`` and ``test_deepspeed_offload.py`` already
make (they record modules by default): no child is run twice for the suite.
"""

from __future__ import annotations

from typing import Any

import pytest
from module_checks import OPT_DEPTH2, check_root_and_children

from blipmon.core.run import RunData

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = ("train.num_train_samples=8", "train.batch_size=4", "train.max_epochs=1")
RUNS: dict[str, tuple[str, ...]] = {
    "opt-ckpt": ("tiny/blip2-opt", "train.act_ckpt=true"),
    "t5-lora": ("tiny/blip2-t5", "train.lora.enabled=true"),
    "vqa-qlora": ("tiny/blip-vqa", "train.qlora=true"),
}


@pytest.fixture(scope="module")
def runs(start_run: Any) -> dict[str, RunData]:
    started = {key: start_run(cfg, *STEPS, *sets) for key, (cfg, *sets) in RUNS.items()}
    out = {}
    for key, rp in started.items():
        done = rp.finish(timeout=880)
        assert done.returncode == 0, rp.describe()
        out[key] = done.run()
    return out


@pytest.mark.parametrize("key", list(RUNS))
def test_root_equals_the_phase_and_children_fit_their_parents(runs: dict[str, RunData], key: str) -> None:
    check_root_and_children(runs[key], key)


def test_tree_is_the_models_modules_without_wrapper_prefixes(runs: dict[str, RunData]) -> None:
    assert runs["opt-ckpt"].modules.trees[0] == OPT_DEPTH2  # DDP's ``module.``, DeepSpeed's engine: test_ddp.py,
    # test_deepspeed_offload.py
    t5 = runs["t5-lora"].modules.trees[0]  # PEFT's ``base_model.model.`` dropped
    assert t5[:13] == OPT_DEPTH2[:13] and t5[13:] == (
        "language_model",
        "language_model.shared",
        "language_model.encoder",
        "language_model.decoder",
        "language_model.lm_head",
    )
