"""``blipmon estimate``: the fixed ``--json`` object, the human table, and exit 2 with a message for bad input.

Commands run through ``blipmon.cli.main`` in this process (the same dispatch a shell gets, without paying for a
second interpreter's imports); the GPU is hidden so a GPU configuration means the same on any machine.
"""

from __future__ import annotations

import json

import pytest

from blipmon import cli
from blipmon.estimate import timeline


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["estimate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_object_for_a_cpu_run(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "tiny/blip2-opt", "--set", "train.batch_size=4", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {
        "gpu_memory_bytes", "phases", "peak_bytes", "peak_phase", "verdict", "seconds", "devices", "judged"
    }  # fmt: skip
    from blipmon.estimate.timeline import CPU_RUNTIME_BYTES

    # a CPU run: the host is its only device, holding the peak and the interpreter
    assert data["devices"] == {"cpu": data["peak_bytes"] + CPU_RUNTIME_BYTES}
    assert data["judged"]["cpu"]["capacity_bytes"] == data["gpu_memory_bytes"]
    assert data["verdict"] == "fits"  # a few MB of tiny model against this machine's available memory
    assert len(data["phases"]) == 8 and {p["step"] for p in data["phases"]} == {0, 1}
    assert data["gpu_memory_bytes"] > 0  # host memory: a CPU run is judged against it
    assert data["peak_phase"] in {p["phase"] for p in data["phases"]}


def test_gpu_memory_makes_it_a_gpu_estimate_and_can_say_oom(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "tiny/blip2-opt", "--gpu-memory", "1MiB", "--json")
    assert code == 0  # an estimate was made: the verdict is data, not an error
    data = json.loads(out)
    assert data["gpu_memory_bytes"] == 1024**2
    assert data["verdict"] == "oom"


def test_human_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "tiny/blip2-t5", "--gpu-memory", "24GB")
    assert code == 0
    assert "after_opt_step" in out and "<- peak" in out
    assert "verdict  FITS" in out


def test_gpu_config_without_gpu_memory_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    # (a preset named for a lab card is judged against that card instead: tests/unit/test_judge.py)
    code, out, err = run(capsys, "tiny/blip2-opt", "--set", "model.device_map=cuda")
    assert code == 2 and out == ""
    assert "--gpu-memory" in err and "Traceback" not in err


@pytest.mark.parametrize("size", ["80XB", "lots", "-3GiB", "0"])
def test_bad_size_is_a_usage_error(capsys: pytest.CaptureFixture[str], size: str) -> None:
    code, _, err = run(capsys, "tiny/blip2-opt", f"--gpu-memory={size}")
    assert code == 2
    assert "--gpu-memory" in err


def test_bad_config_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "tiny/blip2-opt", "--set", "train.optim=adam")
    assert code == 2 and "train.optim" in err
    code, _, err = run(capsys, "no/such-preset")
    assert code == 2 and "neither a preset" in err


def test_load_jobs_are_estimated_per_device(capsys: pytest.CaptureFixture[str]) -> None:
    """(issue 13: they were refused before; tests/unit/test_estimate_load.py checks the figures)"""
    code, out, _ = run(capsys, "tiny/blip2-opt", "--set", "job.kind=load", "--json")
    assert code == 0
    assert set(json.loads(out)["devices"]) == {"cpu"}  # no GPU here: auto is the CPU, as the runner reads it


@pytest.mark.parametrize(("preset", "lab"), [("h100/opt-6.7b", "FITS"), ("a100/baseline", "OUT OF MEMORY")])
def test_full_size_lab_presets_get_the_labs_verdict(capsys: pytest.CaptureFixture[str], preset: str, lab: str) -> None:
    """The closest row that ran and the closest that failed, at real size on fake tensors (no weights, no GPU).

    `h100/opt-6.7b` fits only because the lab's language model sees the caption alone (no image placeholders):
    with 32 placeholder tokens more it is predicted over the card (docs/memory-model.md).
    """
    # In bytes, with the unit --gpu-memory requires.
    capacity = {"h100": f"{int(79.11 * 1024**3)}B", "a100": f"{int(79.35 * 1024**3)}B"}[preset[:4]]
    code, out, _ = run(capsys, preset, "--gpu-memory", capacity)
    assert code == 0
    assert f"verdict  {lab}" in out
    assert "data.image_placeholders = false" in out


def test_it_says_where_a_run_would_run_out_not_only_where_it_peaks(capsys: pytest.CaptureFixture[str]) -> None:
    """The first interval over the capacity is where the run dies; it can come before the peak."""
    from blipmon.core import config
    from blipmon.estimate import estimate

    cfg = config.resolve("tiny/blip2-opt", ["train.batch_size=4"])
    big = estimate(cfg, capacity_bytes=1024**4, device="cuda")
    assert big.runs_out is None and big.runs_out_text() == ""
    totals = [p.total for p in big.phases]
    # a card that holds step 0's forward but not its backward, say: the first total over it decides
    cap = big.runtime_bytes + sorted(set(totals))[len(set(totals)) // 2]
    est = estimate(cfg, capacity_bytes=cap, device="cuda")
    first = est.runs_out
    assert first is not None
    order = [(p.step, p.phase) for p in est.phases]
    over = [k for k, p in zip(order, est.phases, strict=True) if p.total + est.runtime_bytes > cap]
    assert (first.step, first.phase) == over[0]
    assert f"step {first.step} {first.phase} (" in est.runs_out_text()
    code, out, _ = run(capsys, "tiny/blip2-opt", "--set", "train.batch_size=4", "--gpu-memory", f"{cap}B")
    assert code == 0 and f"OUT OF MEMORY: runs out at step {first.step} {first.phase}" in out
