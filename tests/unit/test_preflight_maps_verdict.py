"""``blipmon estimate``'s verdict for a run that cannot run as configured (issue 13 follow-up 3).

A map bitsandbytes or accelerate refuses is judged ``oom`` with the reason in ``refused`` (estimate/judge.py); the
verdict line said "OUT OF MEMORY: cuda:0 cannot load as mapped: ...", which reads as a memory shortage that a bigger
card would cure. It now says CANNOT RUN AS CONFIGURED with the reason; memory verdicts are unchanged.
"""

from __future__ import annotations

import pytest

from blipmon import cli
from blipmon.commands.estimate import verdict_text
from blipmon.core.config import resolve
from blipmon.estimate import timeline
from blipmon.estimate.judge import judge

GIB = 1024**3
ROOT_ON_HOST = 'model.device_map={language_model = 0, "" = "cpu"}'
BNB = (
    "transformers refuses an 8-bit load whose model.device_map puts the rest of the model on the host beside a GPU "
    "(bitsandbytes: 'Some modules are dispatched on the CPU or the disk'; blipmon does not set "
    "llm_int8_enable_fp32_cpu_offload): map every module to the GPU, or load tiny/blip2-opt unquantized"
)
ROOT = (
    "accelerate cannot dispatch this model.device_map: its '' = 'cpu' entry offloads every module, language_model "
    "included, and dispatch_model then fails moving them to the GPU (ValueError: 'weight is on the meta device'): "
    "name the modules that go to the host instead of ''"
)


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


@pytest.mark.parametrize(
    ("sets", "reason"),
    [(["job.kind=load", "model.quantization=8bit", ROOT_ON_HOST], BNB), (["job.kind=generate", ROOT_ON_HOST], ROOT)],
)
def test_a_refused_run_says_it_cannot_run_as_configured(sets: list[str], reason: str) -> None:
    j = judge(resolve("tiny/blip2-opt", sets), gpu_memory=80 * GIB)
    assert j.verdict == "oom" and j.refused == reason  # what judge says, unchanged
    assert verdict_text(j) == f"CANNOT RUN AS CONFIGURED: {reason}"


def test_the_cli_verdict_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["estimate", "tiny/blip2-opt", "--set", "job.kind=load", "--set", "model.quantization=8bit",
                     "--set", ROOT_ON_HOST, "--gpu-memory", "2GiB"])  # fmt: skip
    out = capsys.readouterr().out
    verdict = [line for line in out.splitlines() if line.startswith("verdict  ")]
    assert len(verdict) == 1 and verdict[0].startswith(f"verdict  CANNOT RUN AS CONFIGURED: {BNB}   (")
    assert "OUT OF MEMORY" not in out
    assert code == 0


def test_a_memory_shortage_still_says_out_of_memory() -> None:
    """The tiny model's 8-bit load on the GPU alone is not refused; 1 MiB of card is short of it."""
    j = judge(resolve("tiny/blip2-opt", ["job.kind=load", "model.quantization=8bit", "model.device_map=cuda"]),
              gpu_memory=1024**2)  # fmt: skip
    assert j.refused == "" and j.verdict == "oom"
    assert verdict_text(j).startswith("OUT OF MEMORY: ")
