"""The memory estimate never delays a run: it is made beside the loading, in a process of its own (issue 17.3).

A process, not a thread: building a model is not thread-safe (accelerate's and transformers' empty-weight
contexts patch ``torch.nn.Module`` for the whole process), and an estimate traced in a thread while the real
model loaded was seen to count a parameter twice.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from blipmon.core import config
from blipmon.estimate import predict
from blipmon.runner.child import finish_prediction, start_prediction


def _slow(seconds: float, payload: Any) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds}); print({json.dumps(json.dumps(payload))})"]


def test_the_run_goes_on_while_the_estimate_is_made() -> None:
    emitted: list[tuple[str, dict[str, Any]]] = []
    t0 = time.monotonic()
    thread = start_prediction(
        config.resolve("tiny/blip2-opt"),
        lambda kind, **f: emitted.append((kind, f)),
        command=_slow(1.5, {"peak_bytes": 123, "verdict": "fits"}),
    )
    assert thread.is_alive() and emitted == []  # returned at once: loading starts now
    assert time.monotonic() - t0 < 1.5
    finish_prediction(thread)
    assert emitted == [("prediction", {"peak_bytes": 123, "verdict": "fits"})]


def test_no_estimate_or_a_broken_one_leaves_no_record() -> None:
    emitted: list[str] = []
    for payload in (None, "not an object"):
        finish_prediction(start_prediction({}, lambda kind, **f: emitted.append(kind), command=_slow(0, payload)))
    broken = [sys.executable, "-c", "import sys; print('{oops'); sys.exit(3)"]
    finish_prediction(start_prediction({}, lambda kind, **f: emitted.append(kind), command=broken))
    assert emitted == []


def test_the_estimate_process_prints_the_runs_prediction(tmp_path: Any, capsys: Any) -> None:
    cfg = config.resolve("tiny/blip2-opt")
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps(cfg))
    assert predict.main([str(f)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "fits" and out["peak_bytes"] > 0 and len(out["phases"]) == 8
