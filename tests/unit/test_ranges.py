"""Every number of a configuration has a range (issue 16, item 8): absurd values are refused at once, exit 2.

The bounds are written out here as docs/configuration.md states them, not read back from the schema, so a bound
that moves without its documentation fails here.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blipmon import cli
from blipmon.core import config, schema
from blipmon.core.config import ConfigError, get, resolve, validate

REPO = Path(__file__).resolve().parents[2]
TINY_RUN = REPO / "tests" / "data" / "tiny-cpu"  # a recorded run, so replay's refusal is about --speed

# key -> (lowest allowed, highest allowed, the text of what is allowed), as docs/configuration.md says.
RANGES: dict[str, tuple[float, float, str]] = {
    "train.batch_size": (1, 65536, "an integer >= 1 and <= 65536"),
    "train.accumulate_grad_batches": (1, 65536, "an integer >= 1 and <= 65536"),
    "train.lr": (1e-10, 10, "a number >= 1e-10 and <= 10"),
    "train.max_epochs": (1, 100000, "an integer >= 1 and <= 100000"),
    "train.max_steps": (
        -1,
        10_000_000,
        "-1 (no limit) or a positive number of optimizer steps (an integer >= -1 and <= 10000000, not 0)",
    ),
    "train.num_train_samples": (1, 100_000_000, "an integer >= 1 and <= 100000000"),
    "train.num_workers": (0, 256, "an integer >= 0 and <= 256"),
    "train.devices": (1, 64, "an integer >= 1 and <= 64"),
    "train.num_nodes": (1, 1024, "an integer >= 1 and <= 1024"),
    "train.lora.r": (1, 4096, "an integer >= 1 and <= 4096"),
    "train.lora.alpha": (0, 65536, "a number > 0 and <= 65536"),
    "train.lora.dropout": (0, 1, "a number in [0, 1)"),
    "data.max_length": (1, 8192, "an integer >= 1 and <= 8192"),
    "data.caption_tokens": (0, 8192, "an integer >= 0 and <= 8192"),
    "runtime.sample_hz": (0.1, 100, "a number >= 0.1 and <= 100"),
    "runtime.seed": (0, 2**32 - 1, "an integer >= 0 and <= 4294967295"),
    "runtime.module_depth": (0, 8, "an integer >= 0 and <= 8"),
    "runtime.module_every": (1, 1_000_000, "an integer >= 1 and <= 1000000"),
}
EXCLUSIVE_LOW = {"train.lora.alpha"}
EXCLUSIVE_HIGH = {"train.lora.dropout"}


def nested(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def ok_config(key: str, value: Any) -> dict[str, Any]:
    """``key = value`` plus what makes the value legal on its own: a data set for a batch, DDP for ranks."""
    raw = nested(key, value)
    if key in ("train.devices", "train.num_nodes") and value > 1:
        raw["train"].update(strategy="ddp", num_train_samples=100_000_000)
    if key == "train.batch_size":
        raw["train"]["num_train_samples"] = max(int(value), 1)
    if key == "train.num_train_samples":
        raw["train"]["batch_size"] = 1
    return raw


def inside(key: str, v: float) -> bool:
    lo, hi, _ = RANGES[key]
    above_lo = v > lo if key in EXCLUSIVE_LOW else v >= lo
    below_hi = v < hi if key in EXCLUSIVE_HIGH else v <= hi
    return math.isfinite(v) and above_lo and below_hi and not (key == "train.max_steps" and v == 0)


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as ei:
        validate(raw)
    return str(ei.value)


def test_every_number_of_the_schema_has_both_bounds_and_is_listed_here() -> None:
    numeric = {k for k, f in config.SCHEMA.items() if int in f.types or float in f.types}
    assert numeric == set(RANGES)
    for key in numeric:
        f = config.SCHEMA[key]
        assert f.minimum is not None and f.maximum is not None, key
        assert f.allowed() == RANGES[key][2], key


@pytest.mark.parametrize("key", sorted(RANGES))
def test_both_ends_of_each_range_are_accepted_and_one_step_beyond_is_refused(key: str) -> None:
    lo, hi, allowed = RANGES[key]
    if key not in EXCLUSIVE_LOW:
        validate(ok_config(key, lo))
    if key not in EXCLUSIVE_HIGH:
        validate(ok_config(key, hi))
    if config.SCHEMA[key].types == (int,):
        beyond = [hi + 1, lo - 1]
    else:
        beyond = [hi if key in EXCLUSIVE_HIGH else hi * 1.5, lo if key in EXCLUSIVE_LOW else lo / 2 if lo else -0.5]
    if key == "train.max_steps":
        beyond.append(0)
    for v in beyond:
        assert not inside(key, v)
        msg = error_of(ok_config(key, v))
        assert f"{key} = {v!r}: expected {allowed}" in msg


def test_the_largest_allowed_values_together_validate() -> None:
    """Each bound is usable: the edges of every range at once are a valid configuration."""
    raw: dict[str, Any] = {}
    for key, (_lo, hi, _allowed) in RANGES.items():
        if key not in EXCLUSIVE_HIGH:
            raw = config.merge(raw, nested(key, hi))
    raw["train"]["strategy"] = "ddp"
    # 64 devices x 1024 nodes = 65,536 ranks, each holding one batch of 65,536 samples: 2^32 samples, more than
    # num_train_samples allows (10^8); a batch of 1,525 per rank is what 10^8 samples give 65,536 ranks.
    raw["train"]["batch_size"] = math.ceil(100_000_000 / (64 * 1024))
    assert raw["train"]["batch_size"] == 1526
    validate(raw)
    raw["train"]["batch_size"] = 1527
    assert "train.batch_size = 1527 is larger than the data set" in error_of(raw)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "+inf", "1e-300", "1e300", "-1e300", "1e308"])
@pytest.mark.parametrize("key", sorted(RANGES))
def test_nan_inf_and_extreme_floats_are_refused_with_a_message(key: str, text: str) -> None:
    """Through --set, as a user types them: a ConfigError naming the key, never another exception."""
    _lo, _hi, allowed = RANGES[key]
    value = float(text)
    is_float = float in config.SCHEMA[key].types
    if is_float and inside(key, value):  # 1e-300 is a fine dropout or alpha
        assert get(resolve("tiny/blip2-opt", [f"{key}={text}"]), key) == value
        return
    with pytest.raises(ConfigError) as ei:
        resolve("tiny/blip2-opt", [f"{key}={text}"])
    msg = str(ei.value)
    assert msg.startswith("invalid configuration:")
    if not is_float:
        assert f"{key} = {value!r}: expected {allowed}" in msg  # a float where an integer belongs
    elif math.isfinite(value):
        assert f"{key} = {value!r}: expected {allowed}" in msg
    else:
        assert f"{key} = {value!r}: expected a finite number, {allowed}" in msg


def test_an_integer_longer_than_python_converts_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size = '9{19}\.\.\.9{9}' \(5000 characters\)"):
        resolve("tiny/blip2-opt", ["train.batch_size=" + "9" * 5000])
    f = tmp_path / "huge.toml"
    f.write_text("[train]\nbatch_size = " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="huge.toml: cannot read a value"):
        resolve(str(f))


def test_device_map_gpu_indices_have_a_range() -> None:
    for dev in (-1, 64, "cuda:64", "64", 10**12):
        msg = error_of({"model": {"device_map": {"language_model": dev, "vision_model": "cpu"}}})
        assert f"model.device_map.language_model = {dev!r}: expected a GPU index in [0, 63]" in msg
    validate({"model": {"device_map": {"language_model": 63, "vision_model": "cuda:0", "qformer": "cpu"}}})


# -- a batch larger than the data set --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "largest"),
    [
        (["train.num_train_samples=96"], 96),
        # DDP: each of 4 ranks gets ceil(96 / 4) = 24 samples
        (["train.num_train_samples=96", "train.strategy=ddp", "train.devices=4"], 24),
        # 2 machines x 3 ranks: ceil(100 / 6) = 17 (DistributedSampler pads the last share)
        (["train.num_train_samples=100", "train.strategy=ddp", "train.devices=3", "train.num_nodes=2"], 17),
    ],
)
def test_a_batch_larger_than_a_ranks_share_of_the_data_is_refused(sets: list[str], largest: int) -> None:
    assert resolve("tiny/blip2-opt", [*sets, f"train.batch_size={largest}"])["train"]["batch_size"] == largest
    with pytest.raises(ConfigError) as ei:
        resolve("tiny/blip2-opt", [*sets, f"train.batch_size={largest + 1}"])
    msg = str(ei.value)
    assert f"train.batch_size = {largest + 1} is larger than the data set" in msg
    assert f"use train.batch_size <= {largest}" in msg


def test_load_and_generate_jobs_are_not_held_to_the_data_set() -> None:
    for kind in ("load", "generate"):
        sets = [f"job.kind={kind}", "train.batch_size=64", "train.num_train_samples=8"]
        assert resolve("tiny/blip2-opt", sets)["train"]["batch_size"] == 64


def test_every_preset_is_within_the_ranges() -> None:
    from blipmon.core import presets

    for name in presets.names():
        validate(presets.get(name))


# -- through the real command line --------------------------------------------------------------------------------


def test_estimate_of_an_absurd_batch_exits_2_at_once_through_the_real_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "blipmon", "estimate", "tiny/blip2-opt", "--set", "train.batch_size=1000000000000"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "train.batch_size = 1000000000000: expected an integer >= 1 and <= 65536" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_of_an_absurd_batch_exits_2_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    code = cli.main(["run", "tiny/blip2-opt", "--set", "train.batch_size=1000000000000", "--out", str(out)])
    assert code == 2
    assert "train.batch_size = 1000000000000" in capsys.readouterr().err
    assert not out.exists()
    code = cli.main(["run", "tiny/blip2-opt", "--set", "train.batch_size=97", "--out", str(out)])
    assert code == 2
    assert "train.batch_size = 97 is larger than the data set" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("speed", ["inf", "-inf", "nan", "0", "-1", "1e-300", "1e300", "0.001", "10001"])
def test_replay_speed_out_of_range_is_refused(speed: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["replay", str(TINY_RUN), "--speed", speed])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--speed {float(speed):g}: expected a number from 0.01 to 10000" in err
    assert "expected one argument" not in err


@pytest.mark.parametrize("hz", ["1e-9", "1e-300", "0", "-1", "-1e9", "inf", "nan", "1e9", "0.09", "101"])
def test_watch_sample_hz_out_of_range_is_refused_before_the_command_runs(
    hz: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    out = tmp_path / "runs"
    argv = ["watch", "--out", str(out), "--sample-hz", hz, "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "--sample-hz " in err and "a number >= 0.1 and <= 100" in err
    assert "expected one argument" not in err
    assert not marker.exists() and not out.exists()


def test_values_that_start_with_a_dash_reach_the_checks_and_watchs_command_is_untouched() -> None:
    join = cli._join_dash_values
    assert join(["replay", "r", "--speed", "-inf"]) == ["replay", "r", "--speed=-inf"]
    assert join(["estimate", "c", "--gpu-memory", "-1GiB", "--json"]) == [
        "estimate",
        "c",
        "--gpu-memory=-1GiB",
        "--json",
    ]
    assert join(["estimate", "c", "--gpu-memory", "--json"]) == ["estimate", "c", "--gpu-memory", "--json"]
    cmd = ["watch", "--sample-hz", "-5", "--", "prog", "--speed", "-1"]
    assert join(cmd) == ["watch", "--sample-hz=-5", "--", "prog", "--speed", "-1"]


def test_the_configuration_reference_lists_every_key_with_its_range() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for key in config.SCHEMA:
        assert f"| `{key}` |" in doc, key
    for key, (lo, hi, _allowed) in RANGES.items():
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{key}` |"))
        if key == "train.max_steps":
            assert "-1 (no limit) or [1, 10000000]" in row
            continue
        left = "(" if key in EXCLUSIVE_LOW else "["
        right = ")" if key in EXCLUSIVE_HIGH else "]"
        assert f"{left}{schema.fmt_num(lo)}, {schema.fmt_num(hi)}{right}" in row, key
