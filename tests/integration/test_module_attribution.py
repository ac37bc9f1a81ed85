"""Per-module memory measured by the real child (issue 12): every tiny model and strategy, through ``blipmon run``.

Five runs, started together and read once: each tiny model, with LoRA, QLoRA and activation checkpointing spread
over them, DDP over two ranks (gloo) and DeepSpeed ZeRO-2 with the optimizer offloaded. In every one, at every
boundary recorded in full, the root's four figures equal the ``phase`` record's to the byte and every module's
are at most its parent's. Where the expected figure can be counted independently (a model's own parameters,
in the test process, from the model itself) it is compared exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from blipmon.core.modules import MODULE_CATEGORIES, tree_parents
from blipmon.core.run import RunData

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = ("train.num_train_samples=8", "train.batch_size=4", "train.max_epochs=1")
RUNS: dict[str, tuple[str, ...]] = {
    "opt-ckpt": ("tiny/blip2-opt", "train.act_ckpt=true"),
    "t5-lora": ("tiny/blip2-t5", "train.lora.enabled=true"),
    "vqa-qlora": ("tiny/blip-vqa", "train.qlora=true"),
    "opt-ddp": ("tiny/blip2-opt", "train.devices=2", "train.strategy=ddp", "train.num_train_samples=16"),
    "opt-zero": (
        "tiny/blip2-opt",
        "train.optim=deepspeed_cpu",
        "train.strategy=deepspeed_stage_2_offload",
        "train.max_steps=2",
    ),
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


def own_param_bytes(model: Any, names: list[str]) -> list[int]:
    """Each tree module's parameter bytes, inclusive, counted from the model: a parameter at its first name."""
    out = [0] * len(names)
    for pname, p in model.named_parameters():  # shared parameters once, at their first name
        parts = pname.split(".")
        for i, n in enumerate(names):
            if n == "" or n.split(".") == parts[: n.count(".") + 1]:
                out[i] += p.numel() * p.element_size()
    return out


def tiny_model(path: Path) -> Any:
    from transformers import AutoConfig

    from blipmon.runner.models import model_class

    return model_class(AutoConfig.from_pretrained(path)).from_pretrained(path)


def boundaries(run: RunData) -> list[tuple[dict[str, Any], list[Any]]]:
    """Each phase record recorded in full, with its module rows (tree order)."""
    out = []
    for ph in run.phases:
        rows = [
            r
            for r in run.modules.rows
            if (r.rank, r.step, r.micro_step, r.phase) == (ph["rank"], ph["step"], ph["micro_step"], ph["phase"])
        ]
        if rows:
            out.append((ph, rows))
    return out


@pytest.mark.parametrize("key", list(RUNS))
def test_root_equals_the_phase_and_children_fit_their_parents(runs: dict[str, RunData], key: str) -> None:
    run = runs[key]
    ranks = {p["rank"] for p in run.phases}
    assert set(run.modules.trees) == ranks  # every rank wrote its tree
    found = boundaries(run)
    # Every boundary of steps 0 and 1 (all the steps these runs have) is recorded in full, on every rank.
    assert len(found) == len(run.phases) and found
    for ph, rows in found:
        names = run.modules.trees[ph["rank"]]
        assert [r.module for r in rows] == list(names)
        parents = tree_parents(names)
        for cat in MODULE_CATEGORIES:
            figures = [getattr(r, cat) for r in rows]
            assert figures[0] == ph[cat], (key, ph["phase"], cat)
            for i, parent in enumerate(parents):
                if parent >= 0:
                    assert figures[i] <= figures[parent], (key, ph["phase"], cat, names[i])
    # Some activation sits below the root after forward: the attribution reached the modules.
    fwd = next(rows for ph, rows in found if ph["phase"] == "after_fwd")
    assert sum(r.acts for r in fwd[1:] if "." not in r.module) > 0


def test_tree_is_the_models_modules_without_wrapper_prefixes(runs: dict[str, RunData]) -> None:
    depth2 = ["", "vision_model", "vision_model.embeddings", "vision_model.encoder", "vision_model.post_layernorm",
              "qformer", "qformer.layernorm", "qformer.dropout", "qformer.encoder", "language_projection",
              "language_model", "language_model.model", "language_model.lm_head"]  # fmt: skip
    for key in ("opt-ckpt", "opt-ddp", "opt-zero"):  # plain, DDP's ``module.``, DeepSpeed's engine
        assert runs[key].modules.trees[0] == tuple(depth2), key
    assert runs["opt-ddp"].modules.trees[1] == tuple(depth2)
    t5 = runs["t5-lora"].modules.trees[0]  # PEFT's ``base_model.model.`` dropped
    assert t5[:10] == tuple(depth2[:10]) and t5[10:] == (
        "language_model",
        "language_model.shared",
        "language_model.encoder",
        "language_model.decoder",
        "language_model.lm_head",
    )


def test_parameters_gradients_and_adamw_state_per_module_are_exact(
    runs: dict[str, RunData], tiny_models: dict[str, Path], tiny_facts: dict[str, Any]
) -> None:
    run = runs["opt-ddp"]  # a full fine-tune in fp32 with torch's AdamW, on two ranks
    names = list(run.modules.trees[0])
    model = tiny_model(tiny_models["tiny/blip2-opt"])
    expected = own_param_bytes(model, names)
    tensors = [0] * len(names)
    for pname, _p in model.named_parameters():
        for i, n in enumerate(names):
            if n == "" or pname.startswith(n + "."):
                tensors[i] += 1
    step_bytes = tiny_facts["tiny/blip2-opt"].adamw_step_bytes
    assert expected[0] == tiny_facts["tiny/blip2-opt"].params_bytes
    for rank in (0, 1):
        assert [r.params for r in run.modules.at(0, "before_fwd", rank=rank)] == expected
        # After the first backward every trainable parameter has an fp32 gradient of its own size.
        assert [r.grads for r in run.modules.at(0, "after_bwd", rank=rank)] == expected
        assert [r.optim for r in run.modules.at(0, "after_bwd", rank=rank)] == [0] * len(names)
        # AdamW: two moments of the parameter's size and one step counter per parameter tensor.
        assert [r.optim for r in run.modules.at(0, "after_opt_step", rank=rank)] == [
            2 * b + step_bytes * n for b, n in zip(expected, tensors, strict=True)
        ]
        assert [r.acts for r in run.modules.at(0, "after_bwd", rank=rank)] == [0] * len(names)


def test_deepspeed_flat_buffer_is_split_by_module(
    runs: dict[str, RunData], tiny_models: dict[str, Path], tiny_facts: dict[str, Any]
) -> None:
    """ZeRO-2 makes every fp32 weight a view of one flat buffer: each module still gets its own weights' bytes,
    the buffer's alignment padding the root; the strategy's gradient and optimizer partitions are the root's."""
    run = runs["opt-zero"]
    names = list(run.modules.trees[0])
    model = tiny_model(tiny_models["tiny/blip2-opt"])
    expected = own_param_bytes(model, names)
    n = tiny_facts["tiny/blip2-opt"].param_numel
    padded = 4 * (n + (-n) % 2)  # the flat group is aligned to an even count (test_deepspeed_offload.py)
    rows = run.modules.at(0, "after_opt_step")
    assert rows[0].params == padded
    assert [r.params for r in rows[1:]] == expected[1:]
    assert all(r.optim == 0 for r in rows[1:]) and rows[0].optim > 0
