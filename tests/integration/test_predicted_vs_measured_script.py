"""The GPU validation script of the estimator, checked end to end on the CPU.

``benchmarks/predicted_vs_measured.py`` is what a lent GPU runs to measure "predicted peak within 10 %"; it must
not rot between GPU sessions. With ``--cpu`` it runs a real ``blipmon run`` child, reads the prediction the run
saved when it started and pairs it with what the run measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import subprocess_env

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "predicted_vs_measured.py"


def test_a_cpu_run_pairs_its_saved_prediction_with_what_it_measured(
    tmp_path: Path, blipmon_cache: Path, tiny_models: dict[str, Path]
) -> None:
    cmd = [sys.executable, str(SCRIPT), "--cpu", "tiny/blip2-opt", "--out", str(tmp_path), "--json"]
    env = subprocess_env(blipmon_cache, BLIPMON_PREDICT="1")  # the run saves its prediction when it starts
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout)["rows"][0]
    assert row["status"] == "ok" and row["verdict"] == "fits"
    assert row["exact"] is True  # params, grads and optimizer state to the byte
    assert row["ratio"] == 1.0 and row["acts_error_max"] == 0.0
    assert Path(row["run"]).is_dir()


def test_without_a_gpu_it_says_so_and_exits_2(blipmon_cache: Path) -> None:
    env = subprocess_env(blipmon_cache)  # the GPU hidden
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "needs a GPU" in proc.stderr and "Traceback" not in proc.stderr
