"""Fixes to the load/generate estimates and their verdicts (issue 13 item 1, the reviewer's defects 1-5, 7, 8).

Expected values come from parameter counts x dtype sizes (the architectures' published sizes), transformers'
and accelerate's behaviour read from their sources, and one real run of accelerate's ``dispatch_model`` on the tiny
model (CPU only: the GPU is stood in by ``torch.device("cpu", 0)``, which ``dispatch_model`` treats as a device
that is not the host, so the host-mapped modules get exactly the hooks they get beside a GPU).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blipmon import cli
from blipmon.architectures import catalog
from blipmon.core.config import resolve
from blipmon.estimate import judge as judge_mod
from blipmon.estimate import load, timeline
from blipmon.estimate.judge import judge

GIB = 1024**3
MIB = 1024**2
REPO = Path(__file__).resolve().parents[2]
OPT = "Salesforce/blip2-opt-2.7b"
SPLIT = ['model.device_map={language_model = 0, vision_model = "cpu", qformer = "cpu", '
         'language_projection = "cpu", query_tokens = "cpu"}']  # fmt: skip


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


# -- 1. a split map streams one module's weights at a time ---------------------------------------------------------


def test_split_map_generate_peak_streams_one_module_and_fits_seven_gib() -> None:
    """The reviewer's case: 7 GiB was judged short by 670 MiB because the whole vision tower (1.97 GiB) was added."""
    j = judge(resolve("load/split-language-model"), gpu_memory=7 * GIB)
    gpu = j.estimate.device("cuda:0")
    counts = catalog.params_by_module(OPT)
    resident = 2 * counts["language_model"] + 4 * counts["query_tokens"]  # fp16 LM, the fp32 query tokens moved
    fc1 = (1408 * 6144 + 6144) * 2  # the largest offloaded module: a vision MLP's fc1 in fp16
    assert gpu.offload_transient == fc1
    assert gpu.generate == resident + gpu.acts + fc1
    assert j.verdict == "fits"
    assert j.device_judgement("cuda:0").total_bytes == resident + gpu.acts + fc1 + gpu.runtime


STAND_IN = r"""
import json, sys, torch, accelerate.utils.modeling as am
from accelerate import dispatch_model, hooks
from transformers import Blip2ForConditionalGeneration
from blipmon.runner.models import ensure_tiny

model = Blip2ForConditionalGeneration.from_pretrained(ensure_tiny("tiny/blip2-opt"), dtype=torch.float32)
GPU = torch.device("cpu", 0)
# The stand-in's only differences from a GPU, undone: 'cpu:0' holds CPU tensors (accelerate's device check), a
# Parameter moved there comes back as a plain tensor (re-wrapped), tied weights rely on a real device change
# (the language model's head is untied; it is not offloaded).
same = am.check_device_same
am.check_device_same = lambda a, b: a.type == b.type == "cpu" or same(a, b)
seen = set()
for mod in model.modules():
    for n, p in list(mod._parameters.items()):
        if p is not None and p.data_ptr() in seen:
            setattr(mod, n, torch.nn.Parameter(p.detach().clone()))
        elif p is not None:
            seen.add(p.data_ptr())
live, peak = {}, [0]
on, off = hooks.AlignDevicesHook._onload_weights, hooks.AlignDevicesHook._offload_weights
def onload(self, module):
    on(self, module)
    for n, p in list(module._parameters.items()):
        if p is not None and type(p) is torch.Tensor:
            module._parameters[n] = torch.nn.Parameter(p, requires_grad=False)
    live[id(module)] = sum(p.numel() * p.element_size() for p in module.parameters(recurse=self.place_submodules))
    peak[0] = max(peak[0], sum(live.values()))
def offload(self, module):
    off(self, module)
    live.pop(id(module), None)
hooks.AlignDevicesHook._onload_weights, hooks.AlignDevicesHook._offload_weights = onload, offload
dm = json.loads(sys.argv[1])
dm = {k: (GPU if v == 0 else v) for k, v in dm.items()}
try:
    dispatch_model(model, device_map=dm, main_device=GPU)
except ValueError as e:
    print(json.dumps({"error": str(e)}))
    raise SystemExit(0)
on_meta = sum(p.numel() for p in model.parameters() if p.device.type == "meta")
c = model.config
pix = torch.zeros(2, 3, c.vision_config.image_size, c.vision_config.image_size)
ids = torch.full((2, c.num_query_tokens), c.image_token_index)
with torch.no_grad():
    model.generate(pixel_values=pix, input_ids=ids, max_new_tokens=3)
print(json.dumps({"peak": peak[0], "on_meta": on_meta}))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "BLIPMON_PREDICT": "0"}


def _dispatch(device_map: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", STAND_IN, json.dumps(device_map)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_accelerates_real_dispatch_streams_what_the_estimate_predicts() -> None:
    """accelerate's own dispatch_model + generate on the tiny model: the most offloaded bytes materialised at once
    equals ``offload_stream_bytes`` (a module's own weights plus its offloaded ancestors'), and every host-mapped
    parameter but the root's query tokens sits on the meta device between forwards."""
    split = {"language_model": 0, "vision_model": "cpu", "qformer": "cpu", "language_projection": "cpu",
             "query_tokens": "cpu"}  # fmt: skip
    measured = _dispatch(split)
    cfg = resolve("tiny/blip2-opt", ["job.kind=generate", *SPLIT])
    model = load.model_tensors("tiny/blip2-opt")
    table = {k: load._dev(v) for k, v in split.items()}
    final = {t.name: table[load._owner(t.name, table) or ""] for t in model.tensors}
    final = {n: ("cuda:0" if n == "query_tokens" else d) for n, d in final.items()}
    predicted = load.offload_stream_bytes(model, table, final, "float32", "none")
    assert measured["peak"] == predicted
    # independently: the tiny vision tower's patch embedding (64 x 3 x 16 x 16 + 64) inside its embeddings module
    # (class embedding 64 + 65 positions x 64), fp32
    assert predicted == 4 * ((64 * 3 * 16 * 16 + 64) + (64 + 65 * 64))
    offloaded = sum(t.numel for t in model.tensors if not t.buffer and final[t.name] == "cpu")
    assert measured["on_meta"] == offloaded
    j = judge(cfg, gpu_memory=8 * GIB)
    assert j.estimate.device("cuda:0").offload_transient == predicted


def test_a_whole_model_cpu_entry_beside_a_gpu_cannot_be_dispatched() -> None:
    """``"" = "cpu"`` beside a GPU entry: accelerate offloads everything, then fails moving the GPU module."""
    measured = _dispatch({"language_model": 0, "": "cpu"})
    assert "is on the meta device" in measured["error"]
    j = judge(resolve("tiny/blip2-opt", ["job.kind=load", 'model.device_map={language_model = 0, "" = "cpu"}']),
              gpu_memory=8 * GIB)  # fmt: skip
    assert j.verdict == "oom" and "cannot dispatch" in j.refused and "the rest" not in j.refused


# -- 2, 3. bitsandbytes with modules on the host: refused, against the capacity as given ---------------------------


@pytest.mark.parametrize("quant", ["8bit", "4bit-nf4", "4bit-fp4"])
def test_quantized_with_modules_on_the_host_is_refused_naming_the_map(quant: str) -> None:
    cfg = resolve("tiny/blip2-opt", ["job.kind=load", f"model.quantization={quant}",
                                     'model.device_map={"language_model" = 0, "" = "cpu"}'])  # fmt: skip
    j = judge(cfg, gpu_memory=2 * GIB)
    data = j.to_json()
    assert data["gpu_memory_bytes"] == 2 * GIB == 2147483648  # what --gpu-memory said, no made-up capacity
    assert data["judged"]["cuda:0"]["capacity_bytes"] == 2 * GIB and data["verdict"] == "oom"
    assert data["refused"] == data["judged"]["cuda:0"]["refused"] == j.refused
    bits = "8-bit" if quant == "8bit" else "4-bit"
    assert f"{bits} load whose model.device_map puts the rest of the model on the host" in j.refused
    assert j.limiting_device == "cuda:0" and j.headroom_bytes == j.device_judgement("cuda:0").headroom_bytes > 0
    text = "\n".join(j.device_lines())
    assert "of 2.00 GiB (judged against --gpu-memory): CANNOT LOAD AS MAPPED" in text
    assert "cannot load as mapped" in j.estimate.runs_out_text(j.device_judgement("cuda:0"))


def test_the_reviewers_four_bit_mblip_case_is_refused() -> None:
    cfg = resolve("load/mblip-8bit", ["model.quantization=4bit-nf4", 'model.device_map={language_model=0, ""="cpu"}'])
    j = judge(cfg, gpu_memory=80 * GIB)
    assert j.verdict == "oom" and "4-bit load" in j.refused and j.capacity_bytes == 80 * GIB


def test_a_quantized_map_on_the_gpu_alone_or_the_host_alone_is_not_refused() -> None:
    gpu = judge(resolve("tiny/blip2-opt", ["job.kind=load", "model.quantization=4bit-nf4",
                                           'model.device_map={"" = 0}']), gpu_memory=2 * GIB)  # fmt: skip
    cpu = judge(resolve("tiny/blip2-opt", ["job.kind=load", "model.quantization=8bit", "model.device_map=cpu"]),
                host_memory=64 * GIB)  # fmt: skip
    assert (gpu.verdict, gpu.refused, cpu.verdict, cpu.refused) == ("fits", "", "fits", "")
    assert "refused" not in gpu.to_json()


# -- 4. the parameter count is the real checkpoint's on every path --------------------------------------------------


def test_the_snapshot_path_counts_the_checkpoints_untied_head() -> None:
    cpu = judge(resolve("load/mblip-cpu"), host_memory=64 * GIB).estimate
    bf16 = judge(resolve("load/mblip-bf16"), gpu_memory=16 * GIB).estimate
    assert bf16.path == "snapshot" and cpu.path == "random"
    # mT0-XL stores its own lm_head (tie_word_embeddings false): 250,112 x 2,048 more than the tied model
    assert catalog.raw_config("Gregor/mblip-mt0-xl")["text_config"]["tie_word_embeddings"] is False
    assert bf16.total_params == cpu.total_params == 4_323_079_680 + 250_112 * 2_048 == 4_835_309_056
    assert bf16.total_params == catalog.param_count("Gregor/mblip-mt0-xl")


# -- 5. the host of every job on a GPU holds the CUDA runtime ------------------------------------------------------


def test_the_cuda_runtimes_host_memory_counts_for_every_job_kind_on_a_gpu() -> None:
    train = judge(resolve("h100/baseline"), host_memory=1 * GIB)
    assert train.device_judgement("cpu").runtime_bytes == 420 * MIB + 1024 * MIB
    assert train.device_judgement("cpu").verdict == "oom"  # was "420 MiB FITS"
    loaded = judge(resolve("tiny/blip2-opt", ["job.kind=load", "model.device_map=cuda"]), gpu_memory=8 * GIB)
    assert loaded.device_judgement("cpu").runtime_bytes == 350 * MIB + 1024 * MIB
    on_cpu = judge(resolve("tiny/blip2-opt", ["job.kind=load", "model.device_map=cpu"]), host_memory=8 * GIB)
    assert on_cpu.device_judgement("cpu").runtime_bytes == 350 * MIB  # no GPU used: no CUDA runtime


# -- 7. wording -----------------------------------------------------------------------------------------------------


def test_wording_names_the_flag_the_rest_and_an_unused_gpu_memory(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["estimate", "tiny/blip2-opt", "--set", "job.kind=load", "--set",
                     'model.device_map={"language_model" = 0, "" = "cpu"}', "--gpu-memory", "2GiB"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "placed   cuda:0 <- language_model; cpu <- the rest\n" in out
    assert "(judged against --gpu-memory)" in out and "judged against given" not in out
    assert "(whole model)" not in out
    code = cli.main(["estimate", "tiny/blip2-opt", "--set", "job.kind=load", "--set", "model.device_map=cpu",
                     "--gpu-memory", "2GiB"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "note     --gpu-memory is not used: model.device_map = 'cpu' loads and runs everything on the host" in out
    assert "placed   cpu <- (whole model)\n" in out
    code = cli.main(["estimate", "tiny/blip2-opt", "--set", "model.device_map=cpu", "--gpu-memory", "2GiB"])
    out = capsys.readouterr().out
    assert code == 0 and "note     --gpu-memory is not used: model.device_map = 'cpu' runs everything" in out


# -- 8. bitsandbytes' kernel-hub warning ----------------------------------------------------------------------------


def test_bitsandbytes_cpu_backend_logger_is_quiet_during_an_estimate_only(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")  # where bitsandbytes 0.50 and kernels log
    assert names == judge_mod.QUIETED_LOGGERS
    before = [logging.getLogger(n).level for n in names]
    seen: list[list[int]] = []
    real = load.judge_load

    def spy(*a: object, **k: object) -> object:
        seen.append([logging.getLogger(n).level for n in names])
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(load, "judge_load", spy)
    judge(resolve("tiny/blip2-opt", ["job.kind=load", "model.device_map=cpu"]), host_memory=8 * GIB)
    assert seen == [[logging.ERROR, logging.ERROR]]
    assert [logging.getLogger(n).level for n in names] == before


def test_an_eight_bit_estimate_writes_nothing_on_stderr() -> None:
    proc = subprocess.run(
        # load/mblip-8bit: "auto" on a GPU asks transformers' bitsandbytes quantizer, which imports bitsandbytes
        [sys.executable, "-m", "blipmon", "estimate", "load/mblip-8bit", "--gpu-memory", "80GiB"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
