"""``--gpu-memory`` / ``--host-memory`` (issue 16, item 9): a size needs a unit, and a bad one says what is wrong.

``--gpu-memory 80`` used to mean 80 bytes (a confident OOM verdict, exit 0); ``--gpu-memory -1GiB`` got argparse's
"expected one argument". Commands run through ``blipmon.cli.main``, the dispatch a shell gets.
"""

from __future__ import annotations

import json

import pytest

from blipmon import cli
from blipmon.core.units import parse_memory
from blipmon.estimate import timeline

GIB = 1024**3


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["estimate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("80GiB", 80 * 2**30),
        ("80GB", 80 * 10**9),
        ("24 GB", 24 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1MiB", 2**20),  # the smallest allowed
        ("0.5GiB", 2**29),
        ("+2GB", 2 * 10**9),
        ("85899345920B", 80 * 2**30),  # bytes, said so
        ("64TiB", 64 * 2**40),  # the largest allowed
    ],
)
def test_sizes_with_a_unit(text: str, n: int) -> None:
    assert parse_memory(text) == n


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("80", "'80' has no unit: add a unit (80GiB, 80GB, or 80B for bytes)"),
        ("85899345920", "add a unit (85899345920GiB, 85899345920GB, or 85899345920B for bytes)"),
        ("-1GiB", "'-1GiB' is negative"),
        ("-1", "'-1' is negative"),
        ("0GiB", "'0GiB' is zero"),
        ("inf", "'inf' is not a size: expected a finite amount"),
        ("-inf", "'-inf' is not a size: expected a finite amount"),
        ("nan", "'nan' is not a size: expected a finite amount"),
        ("1e300GB", "'1e300GB': write the number without an exponent"),
        ("1e-300", "'1e-300': write the number without an exponent"),
        ("100TiB", "'100TiB' is more memory than any one machine has: expected at most 64TiB"),
        ("1023KiB", "'1023KiB' is less than 1MiB"),
        ("80XB", "'80XB' is not a size: use e.g. 80GiB, 24GB or 512MiB"),
        ("lots", "'lots' is not a size"),
    ],
)
def test_bad_sizes_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError) as ei:
        parse_memory(text)
    assert message in str(ei.value)


def test_a_bare_number_is_refused_not_read_as_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "tiny/blip2-opt", "--gpu-memory", "80")
    assert code == 2 and out == ""
    assert "blipmon: --gpu-memory '80' has no unit: add a unit (80GiB, 80GB, or 80B for bytes)" in err


@pytest.mark.parametrize("flag", ["--gpu-memory", "--host-memory"])
@pytest.mark.parametrize(
    ("value", "what"), [("-1GiB", "is negative"), ("-inf", "is not a size: expected a finite amount")]
)
def test_a_value_starting_with_a_dash_is_judged_not_taken_for_an_option(
    flag: str, value: str, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in ([flag, value], [f"{flag}={value}"]):
        code, out, err = run(capsys, "tiny/blip2-opt", *argv)
        assert code == 2 and out == ""
        assert f"blipmon: {flag} '{value}' {what}" in err
        assert "expected one argument" not in err


def test_a_missing_size_is_still_missing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        cli.main(["estimate", "tiny/blip2-opt", "--gpu-memory", "--json"])
    assert ei.value.code == 2
    assert "argument --gpu-memory: expected one argument" in capsys.readouterr().err


def test_the_size_is_checked_before_the_configuration_is_estimated(capsys: pytest.CaptureFixture[str]) -> None:
    """Bytes said with B still work, and give the verdict for exactly that capacity."""
    code, out, _ = run(capsys, "tiny/blip2-opt", "--gpu-memory", f"{80 * GIB}B", "--json")
    assert code == 0
    assert json.loads(out)["gpu_memory_bytes"] == 80 * GIB


# -- --host-memory --------------------------------------------------------------------------------------------------


def test_host_memory_is_the_capacity_of_a_cpu_run(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "tiny/blip2-opt", "--set", "model.device_map=cpu", "--host-memory", "8GiB", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["gpu_memory_bytes"] == 8 * GIB  # the CPU run's memory is the host's (it was "available now")
    assert data["host_memory_bytes"] == 8 * GIB
    assert data["verdict"] == "fits"
    # the host holds the whole run: its peak and the interpreter's runtime
    from blipmon.core.config import resolve
    from blipmon.estimate import estimate

    est = estimate(resolve("tiny/blip2-opt", ["model.device_map=cpu"]), capacity_bytes=8 * GIB, device="cpu")
    assert data["host_bytes"] == est.peak_bytes + est.runtime_bytes
    code, out, _ = run(capsys, "tiny/blip2-opt", "--set", "model.device_map=cpu", "--host-memory", "1MiB")
    assert code == 0
    assert "of 1.00 MiB (--host-memory)" in out and "verdict  OUT OF MEMORY" in out


def test_host_memory_judges_deepspeeds_offloaded_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    """ZeRO-2 offload keeps fp32 master weights, both Adam moments and gradient partitions in host RAM.

    FLAN-T5-XXL's optimizer state alone (3 x 4 bytes per parameter over ~11B parameters) is over 120 GiB: a
    64 GiB machine cannot hold it whatever the GPU, a 1 TiB one can.
    """
    preset = "h100/deepspeed-offload"
    code, out, _ = run(capsys, preset, "--gpu-memory", "80GiB", "--host-memory", "64GiB", "--json")
    assert code == 0
    small = json.loads(out)
    assert small["host_memory_bytes"] == 64 * GIB and small["host_bytes"] > 120 * GIB
    assert small["verdict"] == "oom"
    code, out, _ = run(capsys, preset, "--gpu-memory", "80GiB", "--host-memory", "64GiB")
    assert "verdict  OUT OF MEMORY: host RAM: the offloaded optimizer state needs" in out
    code, out, _ = run(capsys, preset, "--gpu-memory", "80GiB", "--host-memory", "1TiB", "--json")
    big = json.loads(out)
    assert big["host_bytes"] == small["host_bytes"]
    without = json.loads(run(capsys, preset, "--gpu-memory", "80GiB", "--json")[1])
    assert big["verdict"] == without["verdict"]  # enough RAM: the GPU decides, as without --host-memory
    assert "host_memory_bytes" not in without  # the fixed JSON object is unchanged without the option
