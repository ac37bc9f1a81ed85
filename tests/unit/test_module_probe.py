"""Per-module attribution in the probe (issue 12), on a hand-made model whose every byte is known by hand.

The model: ``enc`` (Linear 4->8, its child ``inner`` Linear 8->8), ``relu`` in the root's own code, ``head``
(Linear 8->2) whose weight is also ``tied.weight`` (a second name for one parameter). Batch of 3, fp32.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from blipmon.core.modules import (
    below_tree,
    canonical_name,
    inclusive,
    owner_index,
    tree_levels,
    tree_names,
    tree_parents,
)
from blipmon.runner.probes import ModuleMap, PhaseProbe, unwrap_model


class Enc(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 8)
        self.inner = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.lin(x))


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = Enc()
        self.head = torch.nn.Linear(8, 2, bias=False)
        self.tied = torch.nn.Module()
        self.tied.weight = self.head.weight  # one parameter, two names: counted at ``head``
        self.fail_in: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        r = torch.relu(h)  # root's own code: relu saves its result (3 x 8 fp32)
        return self.head(r).sum()  # head saves its input: r again, already counted at the root


def _probe(model: Any, depth: int, every: int = 1) -> tuple[PhaseProbe, list[tuple[str, dict[str, Any]]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # one momentum buffer per parameter
    probe = PhaseProbe(model, lambda kind, **f: out.append((kind, f)), optimizer=opt, module_depth=depth,
                       module_every=every)  # fmt: skip
    return probe, out


def _step(model: Any, probe: PhaseProbe, step: int) -> None:
    probe.boundary("before_fwd", step, 0)
    with probe.saved.track():
        loss = model(torch.randn(3, 4))
    probe.boundary("after_fwd", step, 0)
    loss.backward()
    del loss
    probe.boundary("after_bwd", step, 0)
    probe.optimizer.step()
    probe.boundary("after_opt_step", step, 0)
    probe.optimizer.zero_grad(set_to_none=True)


ENC_LIN = (4 * 8 + 8) * 4
ENC_INNER = (8 * 8 + 8) * 4
HEAD = 8 * 2 * 4


def test_every_category_lands_at_its_module_and_the_root_is_the_phase() -> None:
    torch.manual_seed(0)
    model = Toy()
    probe, out = _probe(model, depth=1)
    _step(model, probe, 0)
    trees = [f for k, f in out if k == "module_tree"]
    assert trees == [{"rank": 0, "depth": 1, "modules": ["", "enc", "head", "tied"]}]
    mods = {f["phase"]: f for k, f in out if k == "modules"}
    phases = {f["phase"]: f for k, f in out if k == "phase"}
    params = [ENC_LIN + ENC_INNER + HEAD, ENC_LIN + ENC_INNER, HEAD, 0]
    for phase in ("before_fwd", "after_fwd", "after_bwd", "after_opt_step"):
        assert mods[phase]["params"] == params
        for cat in ("params", "grads", "optim", "acts"):
            assert mods[phase][cat][0] == phases[phase][cat]
    # enc.lin saves the batch x (3x4) and enc.inner saves lin's output (3x8); the root's relu saves its result
    # (3x8), which head saves again (counted once, at the root, its first saver).
    assert mods["after_fwd"]["acts"] == [(12 + 24 + 24) * 4, (12 + 24) * 4, 0, 0]
    assert mods["after_bwd"]["grads"] == params  # every parameter's gradient is its own size
    assert mods["after_bwd"]["acts"] == [0, 0, 0, 0]
    assert mods["after_opt_step"]["optim"] == params  # SGD momentum: one buffer of each parameter's size


def test_depth_two_adds_children_and_cadence_skips_steps() -> None:
    torch.manual_seed(0)
    model = Toy()
    probe, out = _probe(model, depth=2, every=3)
    for step in range(5):
        _step(model, probe, step)
    full = sorted({f["step"] for k, f in out if k == "modules"})
    assert full == [0, 1, 3]  # steps 0 and 1, then every third
    assert sum(1 for k, _ in out if k == "phase") == 20  # the phases: every step
    assert sum(1 for k, _ in out if k == "module_tree") == 1
    tree = next(f for k, f in out if k == "module_tree")["modules"]
    assert tree == ["", "enc", "enc.lin", "enc.inner", "head", "tied"]
    fwd = next(f for k, f in out if k == "modules" and f["phase"] == "after_fwd")
    assert fwd["acts"] == [240, 144, 48, 96, 0, 0]


def test_depth_zero_records_nothing_per_module() -> None:
    model = Toy()
    probe, out = _probe(model, depth=0)
    _step(model, probe, 0)
    assert probe.modules is None
    assert {k for k, _ in out} == {"phase"}


def test_running_module_in_forward_and_backward() -> None:
    """What an out-of-memory record names: the innermost module running, or whose backward ran last."""
    model = Toy()
    probe, _ = _probe(model, depth=2)
    seen: dict[str, Any] = {}

    def spy_forward(_m: Any, _args: Any, _out: Any) -> None:
        seen["forward"] = probe.running_module()

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            seen["backward"] = probe.running_module()
            return g

    model.enc.inner.register_forward_hook(spy_forward)  # runs after the probe's own hook of enc.inner: in enc
    model.enc.lin.register_forward_hook(lambda _m, _a, out: Spy.apply(out))  # lin's output passes the spy
    probe.boundary("before_fwd", 0, 0)
    assert probe.running_module() is None
    with probe.saved.track():
        loss = model(torch.randn(3, 4))
    assert seen["forward"] == "enc"
    assert probe.running_module() is None  # the forward is over
    loss.backward()
    # The spy's backward runs after enc.inner's backward was entered, before enc's input: still enc.inner.
    assert seen["backward"] == "enc.inner"


def test_wrappers_are_looked_through() -> None:
    model = Toy()
    ddp_like = type("DistributedDataParallel", (torch.nn.Module,), {})()
    ddp_like.module = model
    assert unwrap_model(ddp_like) == (model, [ddp_like])
    mm = ModuleMap(ddp_like, 1)
    assert mm.names == ["", "enc", "head", "tied"]
    mm.remove()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("module.base_model.model.vision_model.x", "vision_model.x"),
        ("module", ""),
        ("language_model", "language_model"),
    ],
)
def test_canonical_name(name: str, expected: str) -> None:
    assert canonical_name(name) == expected


def test_tree_helpers() -> None:
    names = tree_names(["", "a", "a.b", "a.b.c", "a.b.f", "a.e", "d"], 2)
    assert names == ["", "a", "a.b", "a.e", "d"]  # a.b.c is a third level: a and a.b have two children each
    parents = tree_parents(names)
    assert parents == [-1, 0, 1, 1, 0]
    assert owner_index(names, "a.b.c.weight") == 2 and owner_index(names, "x.weight") == 0
    assert inclusive(parents, [1, 2, 3, 4, 5]) == [15, 9, 3, 4, 5]


def test_a_module_with_a_single_child_is_no_level_of_its_own() -> None:
    """OPT's ``OPTModel`` holds only ``decoder``: the default depth reaches ``language_model.model.decoder`` (issue
    12's example) beside ``vision_model.encoder``; a child of a ``ModuleList`` of one layer likewise."""
    paths = ["", "vision_model", "vision_model.embeddings", "vision_model.encoder", "vision_model.encoder.layers",
             "vision_model.encoder.layers.0", "vision_model.encoder.layers.0.mlp", "vision_model.encoder.layers.0.norm",
             "vision_model.post_layernorm", "language_model", "language_model.model", "language_model.model.decoder",
             "language_model.model.decoder.layers", "language_model.model.decoder.embed_tokens",
             "language_model.lm_head"]  # fmt: skip
    levels = tree_levels(paths)
    assert levels["vision_model.encoder"] == levels["language_model.model"] == 2
    assert levels["language_model.model.decoder"] == 2  # its parent holds nothing else
    assert levels["language_model.model.decoder.layers"] == 3  # the decoder holds layers and embeddings
    assert levels["vision_model.encoder.layers"] == levels["vision_model.encoder.layers.0"] == 2
    assert levels["vision_model.encoder.layers.0.mlp"] == 3
    assert tree_names(paths, 2) == ["", "vision_model", "vision_model.embeddings", "vision_model.encoder",
                                    "vision_model.encoder.layers", "vision_model.encoder.layers.0",
                                    "vision_model.post_layernorm", "language_model", "language_model.model",
                                    "language_model.model.decoder", "language_model.lm_head"]  # fmt: skip
    assert tree_names(paths, 1) == ["", "vision_model", "language_model"]
    tree = {n: i for i, n in enumerate(tree_names(paths, 2))}
    assert below_tree("language_model.model.decoder.layers", tree) and below_tree(
        "vision_model.encoder.layers.0.mlp", tree
    )
    assert not below_tree("language_model.model.decoder", tree)  # in the tree
    assert not below_tree("language_model.model.decoder.layers.0", tree)  # two levels below
