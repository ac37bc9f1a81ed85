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
    assert run.prediction is not None and run.prediction["verdict"] in ("fits", "oom")
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
