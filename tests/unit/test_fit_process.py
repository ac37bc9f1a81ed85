"""The fit worker process the launcher's fit view follows: its JSON-lines events, its result, and being stopped.

Real processes (``python -m blipmon.runner.fit_process``), as the view starts them.
"""

from __future__ import annotations

import pytest

from blipmon.core.config import resolve
from blipmon.core.presets import LAB_CARD_BYTES
from blipmon.estimate import timeline
from blipmon.runner.fit_process import FitRun, launcher_gpu_memory


def test_a_cpu_fit_reports_progress_then_its_result() -> None:
    cfg = resolve("tiny/blip2-opt", ["model.device_map=cpu"])  # the host, on any machine
    run = FitRun(cfg)
    events = list(run.events())
    progress = [e for e in events if "progress" in e]
    assert [e["progress"] for e in progress] == list(range(1, len(progress) + 1))
    assert progress[0]["label"] == "as configured"
    last = events[-1]
    assert set(last) == {"result", "assumed_card"} and last["assumed_card"] is False
    r = last["result"]
    assert r["verdict"] == "fits" and r["device"] == "cpu" and r["suggestions"] == []
    # The tiny model fits the host at any batch the 96 samples allow: the data set bounds the largest batch.
    assert r["max_batch_size"] == 96
    assert r["max_batch_note"] == "limited by the data set: train.num_train_samples = 96 over 1 rank(s)"
    assert r["estimates"] == len(progress)
    assert not run._config.exists()  # noqa: SLF001 - its temporary configuration file is gone


def test_stop_ends_a_running_search() -> None:
    run = FitRun(resolve("h100/baseline"))  # a search of a dozen estimates or more
    first = next(iter(run.events()))
    assert first == {"progress": 1, "label": "as configured"}
    run.stop()
    assert run._proc.poll() is not None  # noqa: SLF001 - the process is gone
    assert not run._config.exists()  # noqa: SLF001


def test_an_error_is_an_event() -> None:
    cfg = resolve("tiny/blip2-opt", ["model.device_map=cpu"])
    cfg["train"]["batch_size"] = 0  # a configuration file edited by hand: validated in the worker
    events = list(FitRun(cfg).events())
    assert len(events) == 1 and "train.batch_size = 0: expected an integer >= 1" in events[0]["error"]


def test_the_launchers_card_for_a_gpu_configuration_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)
    assert launcher_gpu_memory(resolve("train/blip-vqa-lora"), None) == (LAB_CARD_BYTES["h100"], True)
    assert launcher_gpu_memory(resolve("train/blip-vqa-lora"), 10 * 1024**3) == (10 * 1024**3, False)
    assert launcher_gpu_memory(resolve("h100/baseline"), None) == (None, False)  # judge knows its card
    assert launcher_gpu_memory(resolve("tiny/blip2-opt"), None) == (None, False)  # auto: the host, here
