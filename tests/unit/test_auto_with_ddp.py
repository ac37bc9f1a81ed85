"""An explicit ``device_map = "auto"`` with several training ranks is refused before anything starts (issue 15.4).

Unset, a training job's "auto" is each process's own GPU (what DDP needs); written out, it is accelerate's
placement, which may split the model over GPUs, and DDP refuses a module on several devices.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blipmon.core import config


def test_explicit_auto_with_ddp_is_refused_naming_the_key() -> None:
    with pytest.raises(config.ConfigError) as e:
        config.resolve(
            "tiny/blip2-opt", ["model.device_map=auto", "train.strategy=ddp", "train.devices=2", "train.batch_size=2"]
        )
    assert "model.device_map = 'auto'" in str(e.value) and "DDP" in str(e.value)


def test_explicit_auto_in_a_toml_file_with_ddp_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text('[model]\nid = "tiny/blip2-opt"\ndevice_map = "auto"\n[train]\nstrategy = "ddp"\ndevices = 2\n')
    with pytest.raises(config.ConfigError, match="device_map = 'auto'"):
        config.resolve(str(f))


def test_the_default_auto_with_ddp_is_each_ranks_own_gpu() -> None:
    cfg = config.resolve("tiny/blip2-opt", ["train.strategy=ddp", "train.devices=2"])
    assert cfg["model"]["device_map"] == "auto"  # the default, filled in


def test_explicit_auto_for_one_process_and_for_loads_is_kept() -> None:
    assert config.resolve("tiny/blip2-opt", ["model.device_map=auto"])["model"]["device_map"] == "auto"
    assert config.resolve("load/auto")["model"]["device_map"] == "auto"


def test_a_saved_runs_filled_in_default_does_not_count_as_explicit(tmp_path: Path) -> None:
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.resolve("tiny/blip2-opt")))
    (run / "events.jsonl").write_text("")
    cfg = config.resolve(str(run), ["train.strategy=ddp", "train.devices=2"])
    assert cfg["train"]["strategy"] == "ddp"
