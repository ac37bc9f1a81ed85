"""Per-module memory predicted before a run: the measured breakdown's rules applied to the estimator's step (issue 12).

``predict_modules(cfg)`` gives the ``ModuleRow``s a recorded run writes at the boundaries the estimate models (the
four phases of step 0 and step 1, micro-step 0, rank 0), for the tree the run would record (``runtime.module_depth``,
paths of the model inside its wrappers; docs/modules.md). The root's figures are the estimate's phase figures,
exactly, for all four categories:

- **params, grads, optim** come from the full meta model parameter by parameter (``static.per_parameter``), each at
  its owning module, as the probe attributes them. A phase whose figure is not the parameters' own (DeepSpeed's
  offloaded partitions and moments, its fp32 gradient copies) is the strategy's, so the root's, as measured.
- **acts** come from the short model's traced step (``activations.trace(..., modules=True)``): each saved storage
  alive after the forward at the innermost module of the tree that was running when it was first saved (the
  probe's hooks at this depth, replayed from the chain of running modules), an activation-checkpointing input at
  its checkpointed layer. The layers the short model leaves out add what the estimate adds for them
  (``LayerCost.acts`` per layer): to the tree's module that holds the stack, or, where the tree reaches the layers
  themselves, as copies of the typical layer's subtree renamed to each missing layer.

The estimator's phase figures stay ``timeline.estimate``'s; this module only splits them, so ``blipmon estimate``
without ``--modules`` costs nothing more. Splitting the activations traces the short model once more with module
hooks (the estimate's own trace runs without them and its cache is timeline's), cached here like timeline's.
"""

from __future__ import annotations

import json
from typing import Any

from blipmon.core.config import ConfigError
from blipmon.core.modules import (
    MODULE_CATEGORIES,
    ModuleRow,
    below_tree,
    inclusive,
    owner_index,
    tree_names,
    tree_parents,
)
from blipmon.estimate.timeline import cache_put, profile_key

_TRACES: dict[str, Any] = {}  # (profile with saved_where, short stacks) by what decides them
_FULL: dict[str, Any] = {}  # full meta model by what decides its parameters


def _full_key(cfg: dict[str, Any]) -> str:
    m, t = cfg["model"], cfg["train"]
    return json.dumps([m["id"], m["quantization"], t["precision"], t["lora"], t["qlora"]], sort_keys=True)


def predict_modules(
    cfg: dict[str, Any], *, device: str | None = None, depth: int | None = None, est: Any = None
) -> list[ModuleRow]:
    """The predicted per-module rows of a training configuration: steps 0 and 1, every phase, inclusive figures.

    ``device`` is "cuda" or "cpu" as for ``timeline.estimate`` (default: decided from ``model.device_map`` and
    this machine); ``depth`` the tree's depth (default: ``runtime.module_depth``; 0 gives no rows); ``est`` an
    ``Estimate`` of the same configuration and device already made (else one is made). Raises ``ConfigError``
    for what the user must fix (a load or generate job: per-module prediction covers training steps).
    """
    from blipmon.core import config as config_mod
    from blipmon.estimate import build, timeline
    from blipmon.estimate.judge import ESTIMATE_LOCK

    cfg = config_mod.validate(cfg)
    depth = int(cfg["runtime"]["module_depth"]) if depth is None else int(depth)
    if depth < 0:
        raise ConfigError(f"module depth {depth}: expected 0 or more")
    if cfg["job"]["kind"] != "train":
        raise ConfigError(
            f"job.kind = {cfg['job']['kind']!r}: per-module prediction covers training steps "
            "(a load's placement per module is in the estimate's devices)"
        )
    if depth == 0:
        return []
    with ESTIMATE_LOCK:
        if est is None:
            dev = timeline.target_device(cfg, device, None)
            # Any capacity: the phases do not depend on it, and a GPU configuration needs one where no GPU is.
            est = timeline.estimate(cfg, capacity_bytes=1 << 60, device=dev)
        dev = est.device
        spec = build.resolve_spec(cfg)
        fkey = _full_key(cfg)
        full = _FULL.get(fkey)
        if full is None:
            full = build.build_meta(spec, spec.arch, cfg)
            cache_put(_FULL, fkey, full)
        prof, short_stacks = _traced(cfg, spec, dev)
    return split(full, cfg, est, prof, short_stacks, depth)


def _traced(cfg: dict[str, Any], spec: Any, device: str) -> tuple[Any, dict[str, list[str]]]:
    """The short model's step traced with module hooks (``Profile.saved_where``), and its stacks' layer kinds."""
    from blipmon.estimate import activations, build
    from blipmon.estimate.timeline import EstimateError

    key = profile_key(cfg, device)
    hit = _TRACES.get(key)
    if hit is not None:
        return hit
    short = build.build_meta(spec, build.short_config(spec.arch), cfg)
    short_stacks = activations.layer_signatures(short)
    from torch._subclasses.fake_tensor import FakeTensorMode

    activations.to_fake(short, FakeTensorMode(allow_non_fake_inputs=True))
    try:
        prof = activations.trace(short, cfg, spec, device, short_stacks, modules=True)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the estimate itself traced the same step: say so, no traceback
        raise EstimateError(f"{spec.model_id}: the per-module trace failed: {type(e).__name__}") from e
    cache_put(_TRACES, key, (prof, short_stacks))
    return prof, short_stacks


def split(
    full: Any, cfg: dict[str, Any], est: Any, prof: Any, short_stacks: dict[str, list[str]], depth: int
) -> list[ModuleRow]:
    """Rows from the pieces: the full meta model, the estimate, the traced short step (see the module docstring)."""
    from blipmon.estimate import activations, static

    names = tree_names(activations.module_paths(full), depth)
    index = {n: i for i, n in enumerate(names)}
    parents = tree_parents(names)
    own_static = {c: [0] * len(names) for c in ("params", "grads", "optim")}
    for pb in static.per_parameter(full, cfg, prof.no_grad_params):
        slot = owner_index(names, pb.name, index)
        own_static["params"][slot] += pb.params
        own_static["grads"][slot] += pb.grads
        own_static["optim"][slot] += pb.optim
    own_acts = _acts_own(names, index, depth, prof, activations.layer_signatures(full), short_stacks)
    rows: list[ModuleRow] = []
    for p in est.phases:
        figures: dict[str, list[int]] = {}
        for cat in MODULE_CATEGORIES:
            own = own_acts if cat == "acts" else own_static[cat]
            figures[cat] = inclusive(parents, _fitted(own, int(getattr(p, cat))))
        for i, n in enumerate(names):
            rows.append(ModuleRow(p.step, 0, 0, p.phase, n, *(figures[c][i] for c in MODULE_CATEGORIES)))
    return rows


def _fitted(own: list[int], total: int) -> list[int]:
    """``own`` for a phase whose figure is ``total``: as it is when it adds up to it, nothing when the phase holds
    none, and otherwise the whole figure at the root (a strategy's buffers hold every module's share at once)."""
    have = sum(own)
    if total == have:
        return list(own)
    if total == 0:
        return [0] * len(own)
    return [total, *([0] * (len(own) - 1))]


def _acts_own(
    names: list[str],
    index: dict[str, int],
    depth: int,
    prof: Any,
    full_stacks: dict[str, list[str]],
    short_stacks: dict[str, list[str]],
) -> list[int]:
    """Each tree module's own activation bytes after the forward, the missing layers included."""
    own = [0] * len(names)
    per_layer: dict[str, list[int]] = {}  # each stacked layer's own costs, by slot (what a copy of it repeats)
    for chain, noted, layer, nbytes in prof.saved_where:
        slot = slot_at(chain, noted, names, index)
        own[slot] += nbytes
        if layer is not None:
            per_layer.setdefault(layer, [0] * len(names))[slot] += nbytes
    for c in prof.layers:
        full_sigs = full_stacks.get(c.stack, [])
        short_sigs = short_stacks.get(c.stack, [])
        more = full_sigs.count(c.signature) - short_sigs.count(c.signature)
        if more <= 0:
            continue
        holder = owner_index(names, c.stack, index)
        typical = f"{c.stack}.{c.index}"
        missing = [j for j, s in enumerate(full_sigs) if s == c.signature and j >= len(short_sigs)]
        if typical not in index or len(missing) != more:
            own[holder] += more * c.acts  # the layers are below the tree: their stack's module holds them
            continue
        # The tree reaches the layers: each missing one is a copy of the typical layer's subtree, what it saved of
        # its own and of the hidden state it received (not what the stack's layers share: it was saved before).
        repeated = per_layer.get(typical, [0] * len(names))
        subtree = [
            (n[len(typical) :], repeated[i]) for i, n in enumerate(names) if n == typical or n.startswith(typical + ".")
        ]
        copies: dict[int, int] = {}
        for j in missing:
            for suffix, b in subtree:
                k = index.get(f"{c.stack}.{j}{suffix}", holder)
                copies[k] = copies.get(k, 0) + b
        # What the estimate adds per layer is what the layer made that was saved (by it or the next); the tree
        # counts what it saved. They agree for a layer between two of its kind; any difference is the stack's. A
        # copy larger than the estimate's figure would leave the stack less than its layers: the stack keeps all.
        copied = sum(copies.values())
        if copied > more * c.acts:
            copies = {}
            copied = 0
        for k, b in copies.items():
            own[k] += b
        own[holder] += more * c.acts - copied
    return own


def slot_at(chain: tuple[str, ...], noted: str | None, names: list[str], index: dict[str, int]) -> int:
    """The tree slot the probe gives a tensor saved while ``chain`` ran (outermost first).

    The probe hooks the tree's modules and the ones a level below (under their tree ancestor's slot); a deeper
    module running counts at the innermost hooked one around it, and nothing running at the root. A checkpointed
    layer's noted input goes to that layer's slot (``ModuleMap.slot_of``).
    """
    if noted is not None:
        return owner_index(names, noted, index)
    for n in reversed(chain):
        i = index.get(n)
        if i is not None:
            return i
        if below_tree(n, index):
            return owner_index(names, n, index)
    return 0


def rows_json(rows: list[ModuleRow]) -> list[dict[str, Any]]:
    """The estimate JSON's ``modules`` (and a saved prediction's): each row's object without ``micro_step``/``rank``
    (DESIGN.md: an estimate models one micro-step on one rank)."""
    out = []
    for r in rows:
        obj = r.to_json()
        del obj["micro_step"], obj["rank"]
        out.append(obj)
    return out
