"""``blipmon fit``: bad input is one clear line and exit 2; ``--sweep DIR`` writes configurations ``blipmon sweep`` runs.

Commands run through ``blipmon.cli.main`` in this process, the GPU hidden. The sweep files are checked with the
sweep's own reader (``core.sweep.expand``): each is a complete configuration equal to the fitted one with the
suggestion's changes applied, and the files sort best first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blipmon import cli
from blipmon.commands import fit as fit_cmd
from blipmon.core.config import resolve
from blipmon.core.sweep import expand
from blipmon.estimate import timeline
from blipmon.estimate.fit import FitResult, Suggestion


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["fit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["tiny/blip2-opt", "--gpu-memory", "80"], "--gpu-memory"),
        (["tiny/blip2-opt", "--host-memory", "lots"], "--host-memory"),
        (["no/such-preset"], "neither a preset"),
        (["tiny/blip2-opt", "--set", "train.batch_size=0"], "train.batch_size"),
        (["tiny/blip2-opt", "--set", "train.optim=lion"], "train.optim"),
        (["tiny/blip2-opt", "--set", "train.devices=2"], "several ranks need train.strategy = 'ddp'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], says: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert says in err and "Traceback" not in err


def test_a_gpu_configuration_with_nothing_to_judge_it_against(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "train/blip-vqa-lora")  # a GPU run, not named for a lab card, no GPU here
    assert code == 2 and out == "" and "--gpu-memory" in err


def test_sweep_folder_that_cannot_take_the_suggestions(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a_file = tmp_path / "f.toml"
    a_file.write_text('name = "mine"\n')
    code, _, err = run(capsys, "tiny/blip2-opt", "--sweep", str(a_file))
    assert code == 2 and "not a folder" in err
    code, _, err = run(capsys, "tiny/blip2-opt", "--sweep", str(tmp_path))
    assert code == 2 and "already holds .toml" in err
    assert a_file.read_text() == 'name = "mine"\n'  # untouched


def suggestion(changes: dict[str, Any], knobs: tuple[str, ...], eff: int) -> Suggestion:
    return Suggestion(changes, 100, "fits", 50, eff, ("a note",), knobs, 1)


def result(suggestions: list[Suggestion]) -> FitResult:
    return FitResult(
        name="tiny/blip2-opt",
        device="cuda",
        verdict="oom",
        peak_bytes=1000,
        headroom_bytes=-10,
        capacity_bytes=2000,
        capacity_source="given",
        margin_bytes=40,
        batch_size=8,
        effective_batch=8,
        max_batch_size=3,
        max_batch_note="",
        suggestions=tuple(suggestions),
        skipped=(),
        seconds=1.5,
        estimates=7,
    )


def test_sweep_files_are_complete_configurations_sweep_reads_best_first(tmp_path: Path) -> None:
    cfg = resolve("tiny/blip2-opt")
    picks = [
        suggestion({"train.batch_size": 2, "train.accumulate_grad_batches": 4}, ("batch",), 8),
        suggestion({"train.act_ckpt": True}, ("act_ckpt",), 8),
        suggestion({"train.optim": "deepspeed_cpu", "train.strategy": "deepspeed_stage_2_offload"}, ("offload",), 8),
        suggestion({"train.lora.enabled": True, "train.precision": "bf16-true"}, ("bf16-true", "lora"), 8),
    ]
    out = tmp_path / "fit-sweep"
    files = fit_cmd.write_sweep(out, cfg, result(picks))
    assert [f.name for f in files] == [
        "01-batch-2x4.toml",
        "02-act_ckpt.toml",
        "03-offload.toml",
        "04-bf16-true-lora.toml",
    ]
    entries = expand([str(out)])  # what `blipmon sweep DIR` runs, in its order
    assert [e.source for e in entries] == [str(out)] * 4
    for i, (entry, s) in enumerate(zip(entries, picks, strict=True), 1):
        expected = resolve("tiny/blip2-opt", [f"{k}={json.dumps(v)}" for k, v in s.changes.items()])
        expected["name"] = f"tiny/blip2-opt-fit{i:02d}"
        assert entry.cfg["name"] == expected["name"]
        assert entry.cfg["description"].startswith(f"blipmon fit suggestion {i} for tiny/blip2-opt: ")
        entry.cfg["description"] = expected["description"]
        assert entry.cfg == expected


def test_text_names_every_part(capsys: pytest.CaptureFixture[str]) -> None:
    r = result([suggestion({"train.batch_size": 2, "train.accumulate_grad_batches": 4}, ("batch",), 8)])
    text = fit_cmd.render(r, config_arg="tiny/blip2-opt", gpu_memory="2000B")
    assert "as is    OUT OF MEMORY" in text
    assert "largest  train.batch_size = 3 fits, everything else as configured; 4 does not" in text
    assert "   1. --set train.batch_size=2 --set train.accumulate_grad_batches=4" in text
    assert "FITS: peak 100 B, 50 B to spare, effective batch 8" in text
    assert "check    blipmon estimate tiny/blip2-opt --gpu-memory 2000B --set train.batch_size=2" in text
    assert fit_cmd.render_sweep(Path("d"), [Path("d/01-x.toml")]).endswith("blipmon sweep d\n")


def test_json_object_is_the_fixed_one(capsys: pytest.CaptureFixture[str]) -> None:
    data = result([suggestion({"train.act_ckpt": True}, ("act_ckpt",), 8)]).to_json()
    fixed = {"verdict", "peak_bytes", "gpu_memory_bytes", "max_batch_size", "suggestions", "seconds"}
    assert fixed <= set(data)
    assert data["suggestions"] == [
        {
            "changes": {"train.act_ckpt": True},
            "peak_bytes": 100,
            "verdict": "fits",
            "effective_batch": 8,
            "notes": ["a note"],
            "headroom_bytes": 50,
        }
    ]
    assert (data["gpu_memory_bytes"], data["max_batch_size"], data["seconds"]) == (2000, 3, 1.5)
