"""A run saves its estimate when it starts; ``show`` prints predicted beside measured and ``compare`` the peak."""

from __future__ import annotations

from pathlib import Path

import pytest

from blipmon.cli import main as cli_main
from blipmon.core.config import resolve
from blipmon.core.profile import write_config
from blipmon.core.report import render_compare
from blipmon.core.run import load_run
from blipmon.runner.child import record


@pytest.mark.slow
def test_a_run_saves_its_prediction_and_show_prints_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BLIPMON_PREDICT", "1")
    cfg = resolve("tiny/blip2-opt", ["train.num_train_samples=16", "train.max_epochs=1", "runtime.sample_hz=2"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, cfg)
    assert record(cfg, run_dir) == 0
    run = load_run(run_dir)
    # The tiny model on the CPU, judged against this machine's available memory: it can only fit (and did).
    assert run.prediction is not None and run.prediction["verdict"] == "fits"
    predicted_params = next(p["params"] for p in run.prediction["phases"] if p["phase"] == "before_fwd")
    assert predicted_params == run.phases[0]["params"]  # exact, as the estimator promises
    assert cli_main(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "predicted / measured" in out and "estimate " in out
    table = render_compare([run, run], "csv")
    assert "predicted peak," in table and "predicted verdict," in table


def test_runtime_predict_false_saves_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPMON_PREDICT", "1")
    cfg = resolve("tiny/blip2-opt", ["train.num_train_samples=8", "train.max_epochs=1", "runtime.predict=false"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, cfg)
    assert record(cfg, run_dir) == 0
    assert load_run(run_dir).prediction is None


def test_the_verdict_line_puts_where_it_would_run_out_beside_where_it_did() -> None:
    """For an OOM run, `show` says what the estimate said before the run and what happened."""
    from blipmon.estimate import render_verdict_line
    from blipmon.estimate.timeline import CUDA_RUNTIME_BYTES

    gib = 1024**3
    cap = 40 * gib
    totals = {(0, "before_fwd"): 10, (0, "after_fwd"): 30, (0, "after_bwd"): 39.8, (0, "after_opt_step"): 35}
    totals |= {(1, "before_fwd"): 20, (1, "after_fwd"): 38, (1, "after_bwd"): 45, (1, "after_opt_step"): 35}
    phases = [
        {"step": s, "phase": ph, "params": 0, "grads": 0, "optim": 0, "acts": 0, "total": int(t * gib)}
        for (s, ph), t in totals.items()
    ]
    pred = {"gpu_memory_bytes": cap, "phases": phases, "peak_bytes": 45 * gib, "peak_phase": "after_bwd"}
    line = render_verdict_line({**pred, "verdict": "oom"}, on_gpu=True, oom={"step": 0, "phase": "after_bwd"})
    # 39.8 GiB + the CUDA runtime allowance is over 40 GiB: step 0's backward, before the step-1 peak
    assert 39.8 * gib + CUDA_RUNTIME_BYTES > cap
    assert "predicted peak at step 1 after_bwd" in line
    assert "predicted to run out at step 0 after_bwd (backward)" in line
    assert line.rstrip().endswith("the run ran out at step 0 after_bwd")
    fits = render_verdict_line({**pred, "verdict": "fits"}, on_gpu=True, oom=None)
    assert "run out" not in fits and fits.startswith("estimate fits against 40.0 GiB")
