"""Property: whatever happens to a profile on disk, reading it raises nothing but ProfileError.

Real-shaped profiles are mutated — truncated anywhere, bytes flipped, lines duplicated or
dropped, values swapped for arbitrary JSON — and then read, summarised and rendered the way
``show`` and ``compare`` do.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blipmon.core.errors import ProfileError
from blipmon.core.report import render_compare, render_show
from blipmon.core.run import load_run


def real_events() -> list[dict[str, Any]]:
    ev: list[dict[str, Any]] = [
        {"type": "header", "format_version": 1, "name": "tiny/blip2-opt", "pid": 999999, "hostname": "elsewhere"},
        {"type": "config", "config": {"name": "tiny/blip2-opt", "model": {"id": "tiny/blip2-opt"}, "job": {"kind": "train"},
                                      "train": {"batch_size": 8, "accumulate_grad_batches": 1}}},
        {"type": "environment", "t": 0.1, "device": "cpu", "gpu_name": None, "host_total_bytes": 2**34, "torch": "2.13",
         "transformers": "5.23", "world_size": 1},
        {"type": "load", "t": 0.5, "seconds": 0.1, "params_bytes": 1000, "placement": {"cpu": 1000}, "weights": "random"},
        {"type": "plan", "t": 0.6, "total_steps": 2, "micro_per_step": 1, "trainable_params": 250, "total_params": 250},
    ]  # fmt: skip
    for step in range(2):
        for i, ph in enumerate(("before_fwd", "after_fwd", "after_bwd", "after_opt_step")):
            ev.append({"type": "phase", "t": 1 + step + i / 10, "step": step, "micro_step": 0, "rank": 0, "phase": ph,
                       "params": 1000, "grads": 1000 if i >= 2 else 0, "optim": 2000 if step or i == 3 else 0,
                       "acts": 500 if i == 1 else 0, "other": None, "allocated": None, "peak": None, "reserved": None,
                       "host_rss": 10**8})  # fmt: skip
            ev.append({"type": "sample", "t": 1 + step + i / 10 + 0.05, "rss": 10**8 + i})
        ev.append({"type": "step", "t": 2 + step, "step": step, "seconds": 0.05, "loss": 6.9, "samples_per_s": 160.0})
    ev += [{"type": "end", "t": 4, "status": "ok", "code": 0}, {"type": "exit", "code": 0, "signal": None}]
    return ev


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _read_everything(run_dir: Path) -> None:
    try:
        run = load_run(run_dir)
    except ProfileError:
        return
    json.dumps(run.summary())
    render_show(run)
    render_compare([run, run], "table")
    render_compare([run, run], "csv")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    events = real_events()
    kind = draw(st.sampled_from(["value", "drop", "dup", "bytes", "truncate", "garbage", "version"]))
    if kind == "value":
        i = draw(st.integers(0, len(events) - 1))
        keys = list(events[i])
        key = draw(st.sampled_from(keys))
        events[i][key] = draw(json_values)
    elif kind == "drop":
        del events[draw(st.integers(0, len(events) - 1))]
    elif kind == "dup":
        i = draw(st.integers(0, len(events) - 1))
        events.insert(draw(st.integers(0, len(events))), events[i])
    elif kind == "version":
        events[0]["format_version"] = draw(json_values)
    data = "".join(json.dumps(e) + "\n" for e in events).encode()
    if kind == "bytes":
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1 :]
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "garbage":
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.binary(max_size=40)) + data[pos:]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_a_damaged_profile_raises_only_profile_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d)
        (run_dir / "events.jsonl").write_bytes(data)
        _read_everything(run_dir)
