"""One estimate at a time in a process: the launcher's panel and its fit view estimate in threads, and model
construction without weights patches ``nn.Module`` process-wide (two at once counted a parameter twice)."""

from __future__ import annotations

import threading

from blipmon.core.config import resolve
from blipmon.estimate.judge import ESTIMATE_LOCK, judge


def test_a_second_estimate_waits_for_the_first_and_then_agrees_with_it() -> None:
    cfg = resolve("tiny/blip2-opt", ["model.device_map=cpu"])
    alone = judge(cfg)
    got: list = []
    ESTIMATE_LOCK.acquire()  # an estimate in progress elsewhere
    try:
        t = threading.Thread(target=lambda: got.append(judge(cfg)))
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive() and got == []  # it waits; it does not run beside the other one
    finally:
        ESTIMATE_LOCK.release()
    t.join()
    assert [g.peak_bytes for g in got] == [alone.peak_bytes]
    assert got[0].estimate.phases == alone.estimate.phases


def test_the_lock_is_reentrant_for_a_caller_that_judges_inside_it() -> None:
    cfg = resolve("tiny/blip2-opt", ["model.device_map=cpu"])
    with ESTIMATE_LOCK:
        assert judge(cfg).verdict in ("fits", "oom")
