"""The memory estimate never delays a run: it is made in a thread beside the loading (issue 17 item 3)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import blipmon.estimate as estimate
from blipmon.core import config
from blipmon.runner.child import start_prediction


def test_the_run_goes_on_while_the_estimate_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    emitted: list[tuple[str, dict[str, Any]]] = []

    def slow_estimate(cfg: dict[str, Any]) -> dict[str, Any]:
        release.wait(10)
        return {"peak_bytes": 123, "verdict": "fits"}

    monkeypatch.setattr(estimate, "predict_for_run", slow_estimate)
    thread = start_prediction(config.resolve("tiny/blip2-opt"), lambda kind, **f: emitted.append((kind, f)))
    assert thread.is_alive() and emitted == []  # returned at once: loading starts now
    release.set()
    thread.join(5)
    assert emitted == [("prediction", {"peak_bytes": 123, "verdict": "fits"})]


def test_no_estimate_no_record(monkeypatch: pytest.MonkeyPatch) -> None:
    emitted: list[str] = []
    monkeypatch.setattr(estimate, "predict_for_run", lambda cfg: None)
    start_prediction(config.resolve("tiny/blip2-opt"), lambda kind, **f: emitted.append(kind)).join(5)
    assert emitted == []
