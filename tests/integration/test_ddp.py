"""Several ranks: ``train.devices=2`` with ``strategy=ddp`` runs two ranks through torchrun (gloo on CPU).

Both ranks record their own phases into the one event stream, on one time axis, and the run ends
as one run with the parent's exit record. Each rank also records its modules (issue 12), named without DDP's
``module.`` prefix, with exact parameters, gradients and AdamW state per module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from module_checks import OPT_DEPTH2, check_root_and_children, own_param_bytes, param_tensors, tiny_model

from blipmon.core.run import RunData


@pytest.fixture(scope="module")
def ddp_run(start_run) -> RunData:  # type: ignore[no-untyped-def]
    rp = start_run("tiny/blip2-opt", "train.devices=2", "train.strategy=ddp", "train.num_train_samples=16",
                   "train.batch_size=4")  # fmt: skip
    done = rp.finish()
    assert done.returncode == 0, rp.describe()
    return done.run()


@pytest.mark.slow
def test_both_ranks_record_their_phases(ddp_run: RunData) -> None:
    ranks = {p["rank"] for p in ddp_run.phases}
    assert ranks == {0, 1}
    for rank in (0, 1):
        mine = [p for p in ddp_run.phases if p["rank"] == rank]
        # 16 samples over 2 ranks in batches of 4: two optimizer steps per rank, four phases each.
        assert [p["phase"] for p in mine][:4] == ["before_fwd", "after_fwd", "after_bwd", "after_opt_step"]
        assert len(mine) == 8
        assert all(p["params"] == mine[0]["params"] for p in mine)


@pytest.mark.slow
def test_the_run_reads_as_one_run(ddp_run: RunData) -> None:
    assert ddp_run.status == "ok"
    assert ddp_run.header["world_size"] == 2
    assert ddp_run.environment["world_size"] == 2
    assert [s["step"] for s in ddp_run.steps] == [0, 1]  # rank 0's steps; the others are rank_step records
    summary = ddp_run.summary()
    assert summary["environment"]["world_size"] == 2
    assert {p["rank"] for p in summary["phases"]} == {0, 1}


@pytest.mark.slow
def test_show_and_compare_report_each_rank_and_the_maximum(ddp_run: RunData) -> None:
    from blipmon.core.report import render_compare, render_show

    text = render_show(ddp_run)
    assert "ranks    2" in text and "rank 0:" in text and "rank 1:" in text and "<- max" in text
    table = render_compare([ddp_run, ddp_run], "csv")
    assert "ranks,2,2" in table and "peak phase total, max over ranks" in table


@pytest.mark.slow
def test_each_rank_records_its_modules_root_equal_to_its_phases(ddp_run: RunData) -> None:
    check_root_and_children(ddp_run, "ddp")
    assert ddp_run.modules.trees[0] == ddp_run.modules.trees[1] == OPT_DEPTH2  # DDP's ``module.`` dropped


@pytest.mark.slow
def test_parameters_gradients_and_adamw_state_per_module_are_exact(
    ddp_run: RunData, tiny_models: dict[str, Path], tiny_facts: dict[str, Any]
) -> None:
    names = list(ddp_run.modules.trees[0])  # a full fine-tune in fp32 with torch's AdamW, on two ranks
    model = tiny_model(tiny_models["tiny/blip2-opt"])
    expected = own_param_bytes(model, names)
    tensors = param_tensors(model, names)
    step_bytes = tiny_facts["tiny/blip2-opt"].adamw_step_bytes
    assert expected[0] == tiny_facts["tiny/blip2-opt"].params_bytes
    for rank in (0, 1):
        assert [r.params for r in ddp_run.modules.at(0, "before_fwd", rank=rank)] == expected
        # After the first backward every trainable parameter has an fp32 gradient of its own size.
        assert [r.grads for r in ddp_run.modules.at(0, "after_bwd", rank=rank)] == expected
        assert [r.optim for r in ddp_run.modules.at(0, "after_bwd", rank=rank)] == [0] * len(names)
        # AdamW: two moments of the parameter's size and one step counter per parameter tensor.
        assert [r.optim for r in ddp_run.modules.at(0, "after_opt_step", rank=rank)] == [
            2 * b + step_bytes * n for b, n in zip(expected, tensors, strict=True)
        ]
        assert [r.acts for r in ddp_run.modules.at(0, "after_bwd", rank=rank)] == [0] * len(names)
