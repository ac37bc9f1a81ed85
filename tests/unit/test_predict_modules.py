"""Per-module memory predicted by the estimator (issue 12 item 2): ``estimate.modules.predict_modules``.

The root's figures are the estimate's phase figures to the byte for all four categories, every module's figures
are at most its parent's, the tree is the one the run's probe records, and the parameters per top-level module
are the transformers model's own bytes, counted here from a model built independently. How the activations of
each module compare with a real run's is tests/integration/test_predict_modules_measured.py's.
"""

from __future__ import annotations

import json

import pytest

from blipmon import cli
from blipmon.core import config
from blipmon.core.config import ConfigError
from blipmon.core.modules import MODULE_CATEGORIES, ModuleRow, tree_parents
from blipmon.estimate import timeline
from blipmon.estimate.modules import predict_modules, rows_json, slot_at
from blipmon.estimate.timeline import estimate

SHORT = ["train.batch_size=2", "train.num_train_samples=8"]

CASES: list[tuple[str, list[str]]] = [
    ("tiny/blip2-opt", []),
    ("tiny/blip2-opt", ["train.lora.enabled=true", "train.accumulate_grad_batches=2"]),
    ("tiny/blip2-opt", ["train.qlora=true", "train.act_ckpt=true", "train.precision=bf16-true"]),
    ("tiny/blip2-t5", ["train.optim=adam_8bit"]),
    ("tiny/blip2-t5", ["train.qlora=true", "runtime.module_depth=4"]),
    ("tiny/blip-vqa", ["train.act_ckpt=true", "train.optim=sgd"]),
    ("tiny/blip-vqa", ["train.lora.enabled=true", "train.precision=bf16-mixed"]),
]


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


def _children_within_parents(rows: list[ModuleRow]) -> None:
    names = [r.module for r in rows]
    for r, parent in zip(rows, tree_parents(names), strict=True):
        if parent >= 0:
            for cat in MODULE_CATEGORIES:
                assert getattr(r, cat) <= getattr(rows[parent], cat), (r.module, cat)


@pytest.mark.parametrize(("name", "sets"), CASES, ids=[f"{n.split('/')[1]}:{','.join(s) or 'base'}" for n, s in CASES])
def test_the_root_is_the_estimate_and_children_stay_within_parents(name: str, sets: list[str]) -> None:
    cfg = config.resolve(name, SHORT + sets)
    est = estimate(cfg, device="cpu")
    rows = predict_modules(cfg, est=est)
    for p in est.phases:
        at = [r for r in rows if r.step == p.step and r.phase == p.phase]
        assert at[0].module == ""
        assert (at[0].params, at[0].grads, at[0].optim, at[0].acts) == (p.params, p.grads, p.optim, p.acts)
        assert {(r.micro_step, r.rank) for r in at} == {(0, 0)}
        _children_within_parents(at)
    assert {(r.step, r.phase) for r in rows} == {(p.step, p.phase) for p in est.phases}


def test_the_tree_and_parameters_are_the_models_own() -> None:
    """The tree is the probe's (``ModuleMap`` on the real model) and each top-level module's parameters are the
    fp32 bytes of the parameters under it in a model built here by transformers (tied weights once)."""
    from blipmon.runner.models import model_class, tiny_config
    from blipmon.runner.probes import ModuleMap

    arch = tiny_config("tiny/blip2-opt")
    model = model_class(arch)(arch)
    cfg = config.resolve("tiny/blip2-opt", SHORT)
    rows = [r for r in predict_modules(cfg, device="cpu") if (r.step, r.phase) == (1, "after_opt_step")]
    mm = ModuleMap(model, 2)
    try:
        assert [r.module for r in rows] == mm.names
    finally:
        mm.remove()
    by_path = {r.module: r for r in rows}
    expected: dict[str, int] = {}
    for n, prm in model.named_parameters():
        top = n.split(".")[0] if "." in n else ""
        expected[top] = expected.get(top, 0) + prm.numel() * 4
    for top in ("vision_model", "qformer", "language_model", "language_projection"):
        assert by_path[top].params == expected[top], top
    assert by_path[""].params == sum(expected.values())
    # AdamW: two fp32 moments and a 4-byte step per parameter that got a gradient; every one does here.
    for top in ("vision_model", "qformer", "language_model", "language_projection"):
        tensors = sum(1 for n, _p in model.named_parameters() if n.startswith(top + "."))
        assert by_path[top].grads == expected[top]
        assert by_path[top].optim == 2 * expected[top] + 4 * tensors


def test_the_fold_follows_the_probes_hooks() -> None:
    """A saved tensor goes where ``ModuleMap`` at that depth would put it: the innermost tree module running, a
    module one level below the tree at its tree ancestor, deeper modules at what runs around them (the root when
    the model calls a deep module itself), a checkpointed layer's noted input at that layer's tree ancestor."""
    names = ["", "language_model", "language_model.model", "vision_model", "vision_model.encoder"]
    index = {n: i for i, n in enumerate(names)}
    deep = ("", "language_model", "language_model.model", "language_model.model.decoder")
    assert slot_at(deep, None, names, index) == 2
    assert slot_at(("", "language_model.model.decoder.embed_tokens"), None, names, index) == 0
    assert slot_at(("", "vision_model", "vision_model.encoder.layers.0.mlp"), None, names, index) == 3
    assert slot_at((), None, names, index) == 0
    assert slot_at(("", "vision_model"), "vision_model.encoder.layers.1", names, index) == 4


def test_depth_zero_gives_no_rows_and_load_jobs_are_refused() -> None:
    assert predict_modules(config.resolve("tiny/blip2-opt", SHORT), device="cpu", depth=0) == []
    with pytest.raises(ConfigError, match="per-module prediction covers training"):
        predict_modules(config.resolve("load/auto", []), device="cpu")


def test_per_parameter_adds_up_to_the_static_analysis() -> None:
    from blipmon.estimate import build, static

    for name, sets in [("tiny/blip2-t5", ["train.optim=adam_8bit"]), ("tiny/blip2-opt", ["train.qlora=true"])]:
        cfg = config.validate(config.resolve(name, SHORT + sets))
        spec = build.resolve_spec(cfg)
        full = build.build_meta(spec, spec.arch, cfg)
        st = static.analyse(full, cfg, frozenset(), "cpu")
        per = static.per_parameter(full, cfg, frozenset())
        assert sum(p.params for p in per) == st.params
        assert sum(p.grads for p in per) == st.grads
        assert sum(p.optim for p in per) == st.optim
        assert not any(p.name.startswith("base_model.") for p in per)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(["estimate", *argv])
    return code, capsys.readouterr().out


def test_estimate_modules_json_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    sets = ["--set", "train.batch_size=2"]
    code, out = _cli(capsys, "tiny/blip2-opt", *sets, "--modules", "--json")
    assert code == 0
    data = json.loads(out)
    mods = data["modules"]
    assert {tuple(sorted(m)) for m in mods} == {("acts", "grads", "module", "optim", "params", "phase", "step")}
    assert {m["step"] for m in mods} == {0, 1}
    for p in data["phases"]:
        root = next(m for m in mods if m["module"] == "" and (m["step"], m["phase"]) == (p["step"], p["phase"]))
        assert [root[c] for c in MODULE_CATEGORIES] == [p[c] for c in MODULE_CATEGORIES]
    cfg = config.resolve("tiny/blip2-opt", ["train.batch_size=2"])
    assert mods == rows_json(predict_modules(cfg, device="cpu"))
    code, out = _cli(capsys, "tiny/blip2-opt", *sets, "--json")
    assert code == 0 and "modules" not in json.loads(out)
    # attribution off for runs (module_depth = 0): asking for modules gives the default depth's tree
    code, out = _cli(capsys, "tiny/blip2-opt", *sets, "--set", "runtime.module_depth=0", "--modules", "--json")
    assert code == 0 and json.loads(out)["modules"] == mods
    code, out = _cli(capsys, "tiny/blip2-opt", *sets, "--modules")
    assert code == 0
    head = next(line for line in out.splitlines() if line.startswith("modules  predicted at step 1 "))
    phase = "after_fwd" if data["peak_phase"] in ("after_fwd", "after_bwd") else data["peak_phase"]
    assert head.startswith(f"modules  predicted at step 1 {phase} ")
    lines = out.splitlines()
    table = lines[lines.index(head) + 1 :]
    assert table[0].split() == ["module", "params", "grads", "optim", "acts", "total"]
    assert table[1].split()[0] == "(model)"
    top = {line.split()[0] for line in table if line.startswith("    ") and not line.startswith("     ")}
    assert top == {"vision_model", "qformer", "language_model", "language_projection"}


def test_estimate_modules_on_a_load_job_says_why_not(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(capsys, "load/auto", "--modules")
    assert code == 0
    assert "note     --modules: per-module prediction covers training jobs (job.kind = load)" in out
    assert "verdict  " in out
    code, out = _cli(capsys, "load/auto", "--modules", "--json")
    assert code == 0 and "modules" not in json.loads(out)
