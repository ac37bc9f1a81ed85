"""``blipmon.estimate.judge``: the one home of the verdict rules, for training jobs (issue 13, item 4).

Every expected figure is derived independently: from ``timeline.estimate`` (the numbers the judgement must not
change), from ``core.presets.LAB_CARD_BYTES`` (the card a named preset means) and from the arithmetic of the rule.
"""

from __future__ import annotations

import json

import pytest

from blipmon import cli
from blipmon.core.config import ConfigError, resolve
from blipmon.core.presets import LAB_CARD_BYTES
from blipmon.estimate import build, timeline
from blipmon.estimate.judge import judge, lab_card

GIB = 1024**3
MIB = 1024**2


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


def tiny(*sets: str) -> dict:
    return resolve("tiny/blip2-opt", ["train.batch_size=4", *sets])


def test_a_gpu_run_has_the_estimates_figures_and_a_line_per_device() -> None:
    cfg = tiny("model.device_map=cuda")
    est = timeline.estimate(cfg, capacity_bytes=24 * GIB)
    j = judge(cfg, gpu_memory=24 * GIB)
    assert (j.verdict, j.device, j.peak_bytes, j.runtime_bytes) == ("fits", "cuda:0", est.peak_bytes, est.runtime_bytes)
    assert j.capacity_bytes == 24 * GIB and j.capacity_source == "given"
    assert j.headroom_bytes == est.headroom_bytes == 24 * GIB - est.runtime_bytes - est.peak_bytes
    assert j.limiting_device == "cuda:0"
    # the GPU's peak with its overheads; the host holds the interpreter and the CUDA runtime's host memory (420 MiB
    # + 1 GiB, the rule of every job kind on a GPU), nothing offloaded, unjudged
    assert j.devices == {"cuda:0": est.peak_bytes + est.overheads.total, "cpu": 420 * MIB + 1024 * MIB}
    assert j.host_bytes == 420 * MIB + 1024 * MIB
    data = j.to_json()
    assert data["devices"] == j.devices
    assert data["judged"] == {"cuda:0": {"capacity_bytes": 24 * GIB, "capacity_source": "given", "verdict": "fits"}}
    assert data["phases"] == est.to_json()["phases"] and data["peak_bytes"] == est.peak_bytes
    assert any(line.startswith("device   cpu") and "not judged" in line for line in j.explain_lines())


def test_a_cpu_run_is_judged_on_the_host() -> None:
    cfg = tiny("model.device_map=cpu")
    j = judge(cfg, host_memory=8 * GIB)
    est = timeline.estimate(cfg, capacity_bytes=8 * GIB, device="cpu")
    assert j.device == "cpu" and j.capacity_source == "--host-memory"
    assert j.devices == {"cpu": est.peak_bytes + timeline.CPU_RUNTIME_BYTES}
    assert j.host_bytes == est.peak_bytes + est.runtime_bytes
    assert j.headroom_bytes == 8 * GIB - j.host_bytes
    small = judge(cfg, host_memory=MIB)
    assert small.verdict == "oom" and small.headroom_bytes == MIB - j.host_bytes


def test_gpu_memory_makes_auto_and_cpu_first_gpu_runs() -> None:
    for dm in ("auto", "cpu-first"):
        j = judge(tiny(f"model.device_map={dm}"), gpu_memory=24 * GIB)
        assert j.device == "cuda:0"
    assert judge(tiny("model.device_map=auto")).device == "cpu"  # no GPU here, none given: the CPU, as the runner


def test_the_host_limits_a_gpu_run_when_host_memory_is_short() -> None:
    cfg = tiny("model.device_map=cuda")
    host_need = 420 * MIB + 1024 * MIB  # tiny training on a GPU: the interpreter and the CUDA runtime's host memory
    j = judge(cfg, gpu_memory=24 * GIB, host_memory=host_need - MIB)
    assert j.verdict == "oom" and j.limiting_device == "cpu"
    assert j.headroom_bytes == -MIB
    assert j.device_judgement("cuda:0").verdict == "fits"
    ok = judge(cfg, gpu_memory=24 * GIB, host_memory=host_need)
    assert ok.verdict == "fits" and ok.limiting_device == "cpu" and ok.headroom_bytes == 0  # the host, exactly
    roomy = judge(cfg, gpu_memory=24 * GIB, host_memory=64 * GIB)
    assert roomy.limiting_device == "cuda:0" and roomy.headroom_bytes == roomy.device_judgement("cuda:0").headroom_bytes


# -- a preset named for a card -------------------------------------------------------------------------------------


def test_lab_card_by_name() -> None:
    assert lab_card({"name": "h100/baseline"}) == (LAB_CARD_BYTES["h100"], "the lab's H100 (79.11 GiB)")
    assert lab_card({"name": "a100/lora"}) == (LAB_CARD_BYTES["a100"], "the lab's A100 (79.35 GiB)")
    assert lab_card({"name": "tiny/blip2-opt"}) is None
    assert lab_card({"name": "h100"}) is None  # a card name without a row is not a lab preset


def test_a_card_named_config_without_a_gpu_is_judged_against_that_card(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny("model.device_map=cuda", "name=h100/demo")
    j = judge(cfg)
    est = timeline.estimate(cfg, capacity_bytes=LAB_CARD_BYTES["h100"], device="cuda")
    assert j.capacity_bytes == LAB_CARD_BYTES["h100"] == int(79.11 * GIB)
    assert j.capacity_source == "the lab's H100 (79.11 GiB)"
    assert j.peak_bytes == est.peak_bytes and j.headroom_bytes == est.headroom_bytes
    assert j.to_json()["capacity_source"] == "the lab's H100 (79.11 GiB)"
    # --gpu-memory wins over the card
    assert judge(cfg, gpu_memory=10 * GIB).capacity_bytes == 10 * GIB
    # the lab ran on a GPU machine: auto means its GPU there
    assert judge(tiny("model.device_map=auto", "name=a100/demo")).capacity_bytes == LAB_CARD_BYTES["a100"]
    # an all-CPU placement is a CPU run wherever it is named
    assert judge(tiny("model.device_map=cpu", "name=h100/demo")).device == "cpu"
    code = cli.main(["estimate", "tiny/blip2-opt", "--set", "name=h100/demo", "--set", "model.device_map=cuda"])
    out = capsys.readouterr().out
    assert code == 0 and "judged against the lab's H100 (79.11 GiB)" in out


def test_a_card_named_config_on_a_gpu_machine_is_judged_against_that_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: 24 * GIB)
    monkeypatch.setattr(timeline, "_local_gpu", lambda: None)
    j = judge(tiny("model.device_map=cuda", "name=h100/demo"))
    assert j.capacity_bytes == 24 * GIB and j.capacity_source == "local GPU"


def test_a_lab_preset_through_the_cli_gets_the_labs_verdict_without_gpu_memory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The preset the launcher judges the same way: the closest row that ran, on the card, at real size."""
    code = cli.main(["estimate", "h100/opt-6.7b", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["verdict"] == "fits"
    assert data["gpu_memory_bytes"] == LAB_CARD_BYTES["h100"]
    assert data["capacity_source"] == "the lab's H100 (79.11 GiB)"
    assert data["devices"]["cuda:0"] == data["peak_bytes"] + data["overheads"]["total"]


# -- cheap to call again, and bad input --------------------------------------------------------------------------------


def test_judging_again_reuses_the_estimators_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny("model.device_map=cuda")
    first = judge(cfg, gpu_memory=24 * GIB)

    def no_build(*_a: object, **_k: object) -> None:
        raise AssertionError("a model was built again")

    monkeypatch.setattr(build, "build_meta", no_build)
    again = judge(cfg, gpu_memory=12 * GIB, host_memory=64 * GIB)
    assert again.peak_bytes == first.peak_bytes and again.capacity_bytes == 12 * GIB


@pytest.mark.parametrize("kw", [{"gpu_memory": 0}, {"host_memory": -1}])
def test_a_capacity_that_is_not_positive_is_refused(kw: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        judge(tiny(), **kw)
