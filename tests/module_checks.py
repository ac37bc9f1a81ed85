"""Checks of a real run's per-module records (issue 12), shared by the tests that already make those runs.

``tests/integration/test_module_attribution.py`` runs the tiny models with LoRA, QLoRA and activation
checkpointing; the DDP and DeepSpeed runs of ``test_ddp.py`` and ``test_deepspeed_offload.py`` (which record modules
by default) are checked there with the same rules instead of being run a second time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blipmon.core.modules import MODULE_CATEGORIES, tree_parents
from blipmon.core.run import RunData

# ``tiny/blip2-opt``'s tree at the default depth, as ``named_modules()`` names it without any wrapper's prefix.
# A module with a single child module is no level of its own (``core.modules.tree_levels``): its child is listed at
# its level (``vision_model.encoder.layers``, ``language_model.model.decoder``).
OPT_DEPTH2 = ("", "vision_model", "vision_model.embeddings", "vision_model.embeddings.patch_embedding",
              "vision_model.encoder", "vision_model.encoder.layers", "vision_model.post_layernorm",
              "qformer", "qformer.layernorm", "qformer.dropout", "qformer.encoder", "qformer.encoder.layer",
              "language_projection", "language_model", "language_model.model", "language_model.model.decoder",
              "language_model.lm_head")  # fmt: skip


def own_param_bytes(model: Any, names: list[str]) -> list[int]:
    """Each tree module's parameter bytes, inclusive, counted from the model: a parameter at its first name."""
    out = [0] * len(names)
    for pname, p in model.named_parameters():  # shared parameters once, at their first name
        parts = pname.split(".")
        for i, n in enumerate(names):
            if n == "" or n.split(".") == parts[: n.count(".") + 1]:
                out[i] += p.numel() * p.element_size()
    return out


def param_tensors(model: Any, names: list[str]) -> list[int]:
    """Each tree module's number of parameter tensors, inclusive."""
    out = [0] * len(names)
    for pname, _p in model.named_parameters():
        for i, n in enumerate(names):
            if n == "" or pname.startswith(n + "."):
                out[i] += 1
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


def check_root_and_children(run: RunData, key: str) -> None:
    """The issue's bar at every boundary recorded in full, on every rank: the root's four figures equal the phase
    record's to the byte, every module's are at most its parent's, and some activation reached a module."""
    ranks = {p["rank"] for p in run.phases}
    assert set(run.modules.trees) == ranks, key  # every rank wrote its tree
    found = boundaries(run)
    # Every boundary of steps 0 and 1 (all the steps these runs have) is recorded in full, on every rank.
    assert found and len(found) == len(run.phases), key
    for ph, rows in found:
        names = run.modules.trees[ph["rank"]]
        assert [r.module for r in rows] == list(names), key
        parents = tree_parents(names)
        for cat in MODULE_CATEGORIES:
            figures = [getattr(r, cat) for r in rows]
            assert figures[0] == ph[cat], (key, ph["phase"], cat)
            for i, parent in enumerate(parents):
                if parent >= 0:
                    assert figures[i] <= figures[parent], (key, ph["phase"], cat, names[i])
    # Some activation sits below the root after forward: the attribution reached the modules.
    fwd = next(rows for ph, rows in found if ph["phase"] == "after_fwd")
    assert sum(r.acts for r in fwd[1:] if "." not in r.module) > 0, key
