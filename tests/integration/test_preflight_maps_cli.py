"""``blipmon run`` refuses a device map transformers or accelerate refuses with exit 2, before loading anything.

Issue 13 follow-up 2: an 8-bit or 4-bit load (or QLoRA) with modules on the host beside a GPU, and a table whose
``""`` entry is "cpu" beside a GPU, used to load the whole model and then exit 1. The subprocess runs with the GPU
hidden (``support.subprocess_env``), so the map's refusal must come before "needs an NVIDIA GPU".
"""

from __future__ import annotations

from pathlib import Path

import pytest

SPLIT = ('model.device_map={language_model = 0, vision_model = "cpu", qformer = "cpu", language_projection = "cpu", '
         'query_tokens = "cpu"}')  # fmt: skip
ROOT_ON_HOST = 'model.device_map={language_model = 0, "" = "cpu"}'
BNB_HEAD = "transformers refuses {bits} modules dispatched on the CPU or the disk before loading (bitsandbytes: 'Some "
BNB_TAIL = (
    "modules are dispatched on the CPU or the disk'; blipmon does not set llm_int8_enable_fp32_cpu_offload). Map "
    "every module to a GPU, every module to 'cpu', or "
)
CASES = {
    "8bit split": (
        ["job.kind=load", "model.quantization=8bit", SPLIT],
        "model.device_map puts vision_model = 'cpu', qformer = 'cpu', language_projection = 'cpu', query_tokens = "
        "'cpu' on the host beside a GPU (language_model = 0), with model.quantization = '8bit': "
        + BNB_HEAD.format(bits="8-bit")
        + BNB_TAIL
        + "load unquantized (model.quantization = 'none')",
    ),
    "4bit root on host": (
        ["job.kind=generate", "model.quantization=4bit-fp4", ROOT_ON_HOST],
        "model.device_map puts '' = 'cpu' on the host beside a GPU (language_model = 0), with model.quantization = "
        "'4bit-fp4': " + BNB_HEAD.format(bits="4-bit") + BNB_TAIL + "load unquantized (model.quantization = 'none')",
    ),
    "qlora root on host": (
        ["train.qlora=true", ROOT_ON_HOST],
        "model.device_map puts '' = 'cpu' on the host beside a GPU (language_model = 0), with train.qlora = true (the "
        "base model in 4bit-nf4): "
        + BNB_HEAD.format(bits="4-bit")
        + BNB_TAIL
        + "train without QLoRA (train.qlora = false)",
    ),
    "root on host": (
        ["job.kind=load", ROOT_ON_HOST],
        "model.device_map[''] = 'cpu' beside GPU entries (language_model = 0): accelerate offloads the whole model "
        "for the '' entry, and then cannot move the GPU modules' weights to the GPU (ValueError: 'weight is on the "
        "meta device'). Name the modules that go to the host instead of '' (e.g. {vision_model = 'cpu', qformer = "
        "'cpu', ...})",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blipmon_run_refuses_the_map_with_exit_2_before_loading(case: str, tmp_path: Path, run_cli) -> None:
    sets, message = CASES[case]
    args = [a for s in sets for a in ("--set", s)]
    proc = run_cli("run", "tiny/blip2-opt", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == f"blipmon: {message}\n"
    assert proc.stdout == ""
    assert not (tmp_path / "profiles").exists()  # refused before a run directory (or a model) was made
