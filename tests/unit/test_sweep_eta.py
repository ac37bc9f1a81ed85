"""The sweep's ETA, shared by the terminal progress and the dashboard's queue."""

from __future__ import annotations

import pytest

from blipmon.core.sweep import sweep_eta


def test_remaining_runs_take_the_mean_finished_run() -> None:
    assert sweep_eta([8.0, 10.0], runs_left=2, current_left=3.0) == pytest.approx(3.0 + 18.0)


def test_a_run_still_loading_is_assumed_to_take_the_mean_run() -> None:
    # Two runs of 8 s done, the third has run 1.2 s and has no step yet: about 6.8 s left, not 0.
    assert sweep_eta([8.0, 8.0], runs_left=0, current_elapsed=1.2) == pytest.approx(6.8)
    assert sweep_eta([8.0], runs_left=0, current_elapsed=30.0) == 0.0  # slower than the mean: never negative


def test_nothing_known_yet_is_unknown_and_nothing_left_is_zero() -> None:
    assert sweep_eta([], runs_left=3) is None
    assert sweep_eta([], runs_left=0, current_elapsed=2.0) is None
    assert sweep_eta([5.0], runs_left=0) == 0.0
