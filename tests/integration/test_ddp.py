"""Several ranks: ``train.devices=2`` with ``strategy=ddp`` runs two ranks through torchrun (gloo on CPU).

Both ranks record their own phases into the one event stream, on one time axis, and the run ends
as one run with the parent's exit record.
"""

from __future__ import annotations

import pytest

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
