"""Device maps with CPU (and disk) parts: where the weights are, where inputs go (issue 15, item 5).

accelerate moves the modules a device map puts on the CPU to the meta device when the model runs on a GPU,
and attaches hooks that bring their weights (from the hooks' weights map) to the GPU for each forward. That
path runs here, on the CPU, through accelerate's own ``dispatch_model``: accelerate decides "the main device
is the CPU, offload nothing" by comparing ``main_device`` with the *string* ``"cpu"``, so a
``torch.device("cpu")`` standing in for seed 001's GPU takes the GPU branch: the CPU modules go to the meta
device with an ``OffloadedWeightsLoader``, exactly as on a GPU machine, and the model still runs here. The
disk case goes through ``from_pretrained`` itself, which works on the CPU as is.

Expected bytes are the parameters' shapes x dtype sizes, taken from an untouched copy of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import cpu_offload, dispatch_model

from blipmon.integrations import _recorder
from blipmon.runner.allocator import model_cuda_devices
from blipmon.runner.models import ensure_tiny, input_device, model_class, placement, tiny_config
from blipmon.runner.probes import PhaseProbe, hooks_of, offloaded_params

GPU_STAND_IN = torch.device("cpu")  # see the module docstring
OFFLOADED = ("vision_model", "qformer", "language_projection")  # seed 001's CPU modules (query_tokens: a root param)


def _tiny() -> Any:
    cfg = tiny_config("tiny/blip2-opt")
    torch.manual_seed(0)
    return model_class(cfg)(cfg)


def _bytes_by_top_module(model: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        out[top] = out.get(top, 0) + p.numel() * p.element_size()
    return out


def _seed_001_dispatched() -> tuple[Any, dict[str, int]]:
    """Seed 001's exact map (language model on the GPU, the rest on the CPU), dispatched by accelerate."""
    model = _tiny()
    expected = _bytes_by_top_module(model)
    device_map = {"language_model": GPU_STAND_IN, "vision_model": "cpu", "qformer": "cpu",
                  "language_projection": "cpu", "query_tokens": "cpu"}  # fmt: skip
    dispatch_model(model, device_map, main_device=GPU_STAND_IN)
    model.hf_device_map = device_map
    return model, expected


def _batch(model: Any, device: torch.device) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (2, 12))
    ids[:, : model.config.num_query_tokens] = model.config.image_token_index
    return {
        "pixel_values": torch.randn(2, 3, 128, 128).to(device),
        "input_ids": ids.to(device),
        "labels": ids.to(device),
    }


def test_seed_001_offloads_to_meta_and_placement_counts_the_host_share() -> None:
    model, expected = _seed_001_dispatched()
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert meta and {n.split(".")[0] for n in meta} == set(OFFLOADED)  # the situation of issue 15, item 5
    off = offloaded_params(model)
    assert {o.where for o in off} == {"cpu"}
    assert sum(o.nbytes for o in off) == sum(expected[m] for m in OFFLOADED)
    # Every weight counted once, where it is: no "meta" entry (every offloaded weight collapsed into one
    # storage key there before). The language model runs on the CPU here, standing in for the GPU.
    assert placement(model) == {"cpu": sum(expected.values())}


def test_inputs_go_to_the_execution_device_and_the_forward_runs() -> None:
    model, _ = _seed_001_dispatched()
    dev = input_device(model)
    assert dev == GPU_STAND_IN  # the vision tower's hook's execution device, not its meta weights
    out = model(**_batch(model, dev))
    assert torch.isfinite(out.loss)


def test_the_probe_counts_each_offloaded_weight_at_its_host_copy() -> None:
    model, expected = _seed_001_dispatched()
    rec = PhaseProbe(model, lambda *a, **k: None).measure()
    assert rec["params"] == sum(expected.values())


def test_disk_offload_through_from_pretrained(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """transformers' own offload (a safetensors index without shapes): the disk share from shapes x dtype."""
    expected = _bytes_by_top_module(_tiny())
    cls = model_class(tiny_config("tiny/blip2-opt"))
    model = cls.from_pretrained(
        ensure_tiny("tiny/blip2-opt"),
        device_map={
            "vision_model": "disk",
            "qformer": "cpu",
            "language_projection": "cpu",
            "language_model": "cpu",
            "query_tokens": "cpu",
        },  # fmt: skip
        offload_folder=str(tmp_path / "offload"),
    )
    assert {o.where for o in offloaded_params(model)} == {"disk"}
    assert placement(model) == {
        "cpu": sum(expected.values()) - expected["vision_model"],
        "disk": expected["vision_model"],
    }
    assert input_device(model) == torch.device("cpu")
    # Disk-offloaded weights are in no memory: the probe's params are what RAM (or a GPU) holds.
    assert (
        PhaseProbe(model, lambda *a, **k: None).measure()["params"] == sum(expected.values()) - expected["vision_model"]
    )
    assert torch.isfinite(model(**_batch(model, input_device(model))).loss)


def test_callbacks_see_a_wholly_offloaded_model_on_its_gpu() -> None:
    """Every parameter on meta, the hooks running it on GPU 0: the callbacks must record a CUDA run.

    ``cpu_offload(model, execution_device=0)`` cannot be built without a GPU (its hooks move the buffers
    there), so it is built for the CPU and its hooks are then pointed at GPU 0, as they would be on a GPU.
    """
    model = _tiny()
    total = sum(_bytes_by_top_module(model).values())
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert all(p.device.type == "meta" for p in model.parameters())
    for module in model.modules():
        for hook in hooks_of(module):
            if getattr(hook, "execution_device", None) is not None:
                hook.execution_device = torch.device("cuda", 0)
    assert _recorder._device_of(model) == torch.device("cuda", 0)  # it said "meta", so "not on CUDA"
    cfg = _recorder.build_config("t", "", model, {"batch_size": 1}, 10.0)
    assert cfg["model"]["device_map"] == "cuda"
    assert input_device(model) == torch.device("cuda", 0)
    assert model_cuda_devices(model) == [0]
    assert placement(model) == {"cpu": total}


def test_a_meta_parameter_nothing_holds_counts_under_meta() -> None:
    """A model built on the meta device without hooks: its bytes are shown as meta, each weight once."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    assert placement(model) == {"meta": (4 * 8 + 8 + 8 * 2 + 2) * 4}
    assert input_device(model) == torch.device("cpu")
