"""Per-module attribution at most doubles a long run's profile (issue 12's bar), held on a short run that bounds it.

The same tiny configuration trains 20 steps through the child's loop with attribution on (default depth and
cadence) and off, each into a real profile file. Steps recorded in full are 0, 1 and every 10th: 3 of 20 here,
101 of 1,000 in the bar's run, so the short run's ratio is the larger one (each record's size is the same at
every step, up to a few digits of its time and memory figures). benchmarks/profile_size.py measures the 1,000-step
run itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blipmon.core.config import resolve
from blipmon.core.profile import EventWriter
from blipmon.runner.models import load_model
from blipmon.runner.train import Cursor, run_train


def _size(tmp_path: Path, *sets: str) -> int:
    cfg = resolve("tiny/blip2-opt", ["train.batch_size=1", "train.num_train_samples=20", "train.max_epochs=1", *sets])
    path = tmp_path / f"events{len(sets)}.jsonl"
    writer = EventWriter(path)
    run_train(load_model(cfg, cuda=False), cfg, writer.write, Cursor(), cuda=False)
    writer.close()
    return path.stat().st_size


@pytest.mark.slow
def test_attribution_at_most_doubles_the_profile(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    on, off = _size(tmp_path), _size(tmp_path, "runtime.module_depth=0")
    from support import read_events

    kinds = [e["type"] for e in read_events(tmp_path / "events0.jsonl")]
    assert kinds.count("modules") == 3 * 4 and kinds.count("module_tree") == 1  # steps 0, 1, 10; four phases each
    assert on <= 2 * off, (on, off)
