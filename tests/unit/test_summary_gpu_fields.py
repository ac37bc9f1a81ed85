"""GPU extensions of the run summary read from a profile: per-GPU figures, offload shares, the OOM's device.

These records are written on GPU machines only (and by DeepSpeed offload); the reader must carry them into
`show` and `show --json`, typed, and ignore them when they are malformed (a profile is untrusted data).
"""

from __future__ import annotations

import json
from pathlib import Path

from blipmon.core.report import render_show
from blipmon.core.run import load_run

GIB = 1 << 30
MIB = 1 << 20


def _write(run: Path, records: list[dict]) -> Path:
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"id": "x"}, "job": {"kind": "train"}, "train": {}}))
    header = {"type": "header", "t": 0, "format_version": 1, "name": "gpu-run", "pid": 1, "hostname": "elsewhere"}
    lines = [header, *records]
    (run / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def _phase(**extra: object) -> dict:
    return {"type": "phase", "t": 1.0, "step": 0, "micro_step": 0, "rank": 0, "phase": "after_fwd", "params": 10,
            "grads": 0, "optim": 0, "acts": 5, "other": 1, "allocated": 16, "peak": 20, "reserved": 32,
            "host_rss": 100, **extra}  # fmt: skip


def test_per_gpu_figures_and_offloaded_shares_reach_the_summary(tmp_path: Path) -> None:
    devices = {"cuda:0": {"allocated": 10, "reserved": 16, "peak": 12}, "cuda:1": {"allocated": 6, "reserved": 16}}
    run = _write(tmp_path / "r", [_phase(devices=devices, optim_host=7, grads_host=3)])
    p = load_run(run).summary()["phases"][0]
    assert p["devices"] == {
        "cuda:0": {"allocated": 10, "reserved": 16, "peak": 12},
        "cuda:1": {"allocated": 6, "reserved": 16, "peak": None},
    }
    assert (p["optim_host"], p["grads_host"]) == (7, 3)


def test_malformed_per_gpu_figures_are_dropped_not_a_crash(tmp_path: Path) -> None:
    run = _write(tmp_path / "r", [_phase(devices="cuda:0 lots"), _phase(devices={"cuda:0": 5})])
    phases = load_run(run).summary()["phases"]
    assert [("devices" in p) for p in phases] == [False, False]


def test_a_phase_without_extensions_has_exactly_the_fixed_keys(tmp_path: Path) -> None:
    run = _write(tmp_path / "r", [_phase()])
    assert set(load_run(run).summary()["phases"][0]) == {
        "step", "micro_step", "rank", "phase", "t", "params", "grads", "optim", "acts", "other", "allocated", "peak",
        "reserved", "host_rss",
    }  # fmt: skip


def test_show_names_the_host_share_of_a_device_map_with_cpu_parts(tmp_path: Path) -> None:
    load = {"type": "load", "t": 0.5, "seconds": 1.0, "params_bytes": 4 * GIB,
            "placement": {"cuda:0": 3 * GIB, "cpu": 1 * GIB}}  # fmt: skip
    text = render_show(load_run(_write(tmp_path / "r", [load])))
    assert "offload  1.00 GiB on the host: 25 % of the parameters are off the GPU" in text


def test_the_oom_names_its_device_and_free_memory(tmp_path: Path) -> None:
    oom = {"type": "oom", "t": 2, "step": 3, "micro_step": 0, "phase": "after_fwd", "requested_bytes": 512 * MIB,
           "message": "CUDA out of memory", "device": "cuda:1", "device_free": 100 * MIB, "device_limit": 80 * GIB,
           "requested_source": "allocator"}  # fmt: skip
    run = load_run(_write(tmp_path / "r", [oom, {"type": "end", "t": 3, "status": "oom", "code": 3}]))
    s = run.summary()["oom"]
    assert (s["requested_bytes"], s["device"], s["device_free"], s["device_limit"]) == (
        512 * MIB, "cuda:1", 100 * MIB, 80 * GIB,
    )  # fmt: skip
    assert "trying to allocate 512.00 MiB on cuda:1 (100.00 MiB free of 80.00 GiB)" in render_show(run)
