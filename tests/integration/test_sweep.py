"""``blipmon sweep``: configurations one after another, each in a fresh child, going on after a failure.

The main sweep runs three tiny configurations as a user would (``python -m blipmon sweep``): a short
train, a load, and a load of a local checkpoint whose architecture blipmon does not support, which
fails in its child. A fourth configuration needs a GPU, which the test hides, so preflight refuses
it. All four must be reported, the three runs recorded, and the comparison printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from support import BROKEN, NEEDS_GPU, PATIENCE_S

from blipmon.commands import sweep
from blipmon.core import outcomes
from blipmon.core import sweep as sweep_data
from blipmon.core.config import ConfigError
from blipmon.core.run import load_run

pytestmark = pytest.mark.slow

TRAIN = """
name = "mini/train"
[model]
id = "tiny/blip2-opt"
device_map = "cpu"
[train]
batch_size = 2
max_steps = 1
num_train_samples = 2
[data]
max_length = 8
[runtime]
sample_hz = 5
"""

LOAD = """
name = "mini/load"
[model]
id = "tiny/blip-vqa"
device_map = "cpu"
[job]
kind = "load"
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, run_cli: Any, tiny_models: Any) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("sweep")
    broken = base / "unsupported-checkpoint"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    files = []
    for name, text in (
        ("1-train", TRAIN),
        ("2-load", LOAD),
        ("3-broken", BROKEN.format(path=broken)),
        ("4-gpu", NEEDS_GPU),
    ):
        f = base / f"{name}.toml"
        f.write_text(text)
        files.append(f)
    out = base / "out"
    done = run_cli("sweep", *files, "--out", out, timeout=PATIENCE_S)
    sweep_dirs = list(out.iterdir())
    assert len(sweep_dirs) == 1, (sweep_dirs, done.stderr)
    return {"done": done, "dir": sweep_dirs[0]}


def test_the_sweep_exits_with_the_most_severe_outcome(swept: dict[str, Any]) -> None:
    done = swept["done"]
    assert done.returncode == 1, done.stderr  # error outranks refused


def test_every_run_is_recorded_in_its_own_directory_under_the_sweep(swept: dict[str, Any]) -> None:
    runs = sorted((p for p in swept["dir"].iterdir() if p.is_dir()), key=lambda p: p.name)
    by_name = {load_run(p).name: load_run(p) for p in runs}
    assert set(by_name) == {"mini/train", "mini/load", "mini/broken"}
    assert by_name["mini/train"].status == "ok" and len(by_name["mini/train"].steps) == 1
    assert by_name["mini/train"].phases, "the train run has its four phases"
    assert by_name["mini/load"].status == "ok" and by_name["mini/load"].load is not None
    broken = by_name["mini/broken"]
    assert broken.status == "error" and "not supported" in broken.error["message"]


def test_sweep_json_lists_all_four_with_status_and_exit_code(swept: dict[str, Any]) -> None:
    doc = json.loads((swept["dir"] / "sweep.json").read_text())
    assert doc["finished"] is True
    got = [(c["name"], c["status"], c["exit_code"]) for c in doc["configs"]]
    assert got == [
        ("mini/train", "ok", 0),
        ("mini/load", "ok", 0),
        ("mini/broken", "error", 1),
        ("mini/gpu-only", "refused", 2),
    ]
    refused = doc["configs"][3]
    assert refused["run_dir"] is None and "GPU" in refused["reason"]


def test_progress_names_each_run_its_status_and_an_eta(swept: dict[str, Any]) -> None:
    err = swept["done"].stderr
    for i, (name, status) in enumerate(
        [("mini/train", "ok"), ("mini/load", "ok"), ("mini/broken", "error"), ("mini/gpu-only", "refused")], 1
    ):
        assert f"[{i}/4] {name}: {status}" in err, err
    assert "ETA" in err
    assert "not supported" in err  # the error's first line, so the user need not open the log to know why


def test_the_comparison_table_has_a_column_per_configuration(swept: dict[str, Any]) -> None:
    table = swept["done"].stdout
    header, status = table.splitlines()[:2]
    for name in ("mini/train", "mini/load", "mini/broken", "mini/gpu-only"):
        assert name in header
    assert status.split()[1:] == ["ok", "ok", "error", "refused"]


def test_a_typo_anywhere_stops_the_sweep_before_anything_runs(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(LOAD)
    bad = tmp_path / "bad.toml"
    bad.write_text(LOAD.replace("[job]", "[job]\nkidn = 1"))
    with pytest.raises(ConfigError) as e:
        sweep_data.expand([str(good), str(bad), "tiny/blip2-op"])
    text = str(e.value)
    assert "kidn" in text and "tiny/blip2-op" in text


def test_a_group_expands_to_its_presets_and_refusals_go_to_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU the h100 presets would really run")
    args = argparse.Namespace(configs=["h100/"], out=tmp_path, format="json")
    code = sweep.run(args)
    assert code == 2  # nothing ran, everything refused
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["runs"]) == 15
    status = next(r for r in doc["rows"] if r["label"] == "status")
    assert set(status["values"]) == {"refused"}
    (sweep_dir,) = list(tmp_path.iterdir())
    assert sweep_dir.name.endswith("-sweep-h100")


@pytest.mark.parametrize(
    ("codes", "expected"),
    [([0, 0], 0), ([0, 2], 2), ([2, 3], 3), ([3, 1], 1), ([1, 4], 4), ([], 0), ([None, 0], 0)],
)
def test_exit_code_severity(codes: list[int | None], expected: int) -> None:
    assert outcomes.sweep_exit_code(codes) == expected
