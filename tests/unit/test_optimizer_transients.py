"""The optimizer step's own memory, per implementation: arithmetic from torch's and bitsandbytes' sources, and
torch's foreach AdamW (what CUDA runs) held to a real foreach step on the CPU through the independent counter.

The expected figures are what the named source lines allocate for parameters of known sizes; the reference counter
(tests/reference/live_storage.py) then says what a real step held, with no blipmon code in it.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest
import torch
from reference.live_storage import run_steps

from blipmon.estimate import static

F32, BF16 = torch.float32, torch.bfloat16


def _sizes(*spec: tuple[int, torch.dtype]) -> list[tuple[int, int, torch.dtype]]:
    return [(n, n * torch.empty((), dtype=d).element_size(), d) for n, d in spec]


def test_the_implementation_each_device_gets() -> None:
    # torch.optim.adam.adam -> _default_to_fused_or_foreach: foreach where the device has foreach kernels (CUDA),
    # the single-tensor loop elsewhere (the CPU); fused only when asked.
    assert static.adamw_implementation("cuda") == "foreach"
    assert static.adamw_implementation("cpu") == "single-tensor"
    assert static.optimizer_step("adamw", _sizes((10, F32)), "cuda").implementation == "foreach"
    assert static.optimizer_step("sgd", _sizes((10, F32)), "cpu").implementation == "in-place"
    assert static.optimizer_step("adam_8bit", _sizes((10, F32)), "cuda").implementation == "bitsandbytes-cuda"
    assert static.optimizer_step("adam_8bit", _sizes((10, F32)), "cpu").implementation == "bitsandbytes-cpu"


def test_single_tensor_adamw_two_temporaries_and_the_previous_denom() -> None:
    # _single_tensor_adam: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps); the old denom is rebound
    # only once the new quotient exists. Parameters of 400, 1200 and 80 bytes: at the second, 400 + 2 x 1200.
    sizes = _sizes((100, F32), (300, F32), (20, F32))
    step = static.optimizer_step("adamw", sizes, "cpu")
    assert step.tensors == (400, 1200, 1200) and step.temp == 2800
    # the first step: exp_avg, exp_avg_sq (2 x 1680) and three 4-byte step scalars made first, then the loop
    assert step.first_peak == 2 * 1680 + 3 * 4 + 2800


def test_foreach_adamw_one_sqrt_per_dtype_group_and_the_previous_groups() -> None:
    # _multi_tensor_adam: torch._foreach_sqrt(exp_avg_sqs) per (device, dtype) group; the previous group's list is
    # still bound while the next one is made. Two groups: both, whatever the order.
    sizes = _sizes((100, F32), (300, F32), (50, BF16))
    step = static.optimizer_step("adamw", sizes, "cuda")
    assert step.temp == 400 + 1200 + 100
    assert step.first_peak == 2 * (400 + 1200 + 100) + step.temp  # the step scalars live on the host
    one = static.optimizer_step("adamw", _sizes((100, F32), (300, F32)), "cuda")
    assert one.temp == 1600 and sorted(one.tensors) == [400, 1200]


def test_bitsandbytes_cpu_temporaries_and_state_made_parameter_by_parameter() -> None:
    # _optimizer_update_8bit_blockwise_cpu: two dequantized fp32 states, g.float() * gnorm_scale, sqrt and quotient
    # (five fp32 tensors; a sixth, p.data.float(), for a 16-bit parameter). _optimizer_update_32bit_cpu (fewer than
    # 4096 elements): the fp32 gradient, state2.sqrt() + eps and state1 / that (+ the fp32 parameter if 16-bit).
    big, small = 5000, 100
    step = static.optimizer_step("adam_8bit", _sizes((big, F32), (small, F32)), "cpu")
    assert step.tensors == (4 * big,) * 5 and step.temp == 5 * 4 * big
    state_big = 2 * big + 2 * 4 * -(-big // 256)  # uint8 states + fp32 absmax per 256 elements
    maps = 2 * 256 * 4
    assert step.first_peak == maps + max(state_big + 5 * 4 * big, state_big + 8 * small + 3 * 4 * small)
    assert step.before == maps and step.outside == 0
    half = static.optimizer_step("adam_8bit", _sizes((big, BF16), (small, BF16)), "cpu")
    assert half.temp == 6 * 4 * big
    only_small = static.optimizer_step("paged_adamw_8bit", _sizes((small, BF16)), "cpu")
    assert only_small.temp == 4 * 4 * small and only_small.outside == maps  # maps made, never in the state


def test_bitsandbytes_cuda_updates_in_place() -> None:
    step = static.optimizer_step("adam_8bit", _sizes((5000, F32), (100, F32)), "cuda")
    state = 2 * 5000 + 2 * 4 * -(-5000 // 256) + 8 * 100 + 2 * 256 * 4
    assert step.temp == 0 and step.first_peak == state
    # paged: buffers of 100k+ elements are CUDA managed memory, outside the allocator; their absmax are not
    paged = static.optimizer_step("paged_adamw_8bit", _sizes((200_000, F32)), "cuda")
    assert paged.first_peak == 2 * 4 * -(-200_000 // 256) + 2 * 256 * 4


class _Mixed(torch.nn.Module):
    """Two fp32 weights and one bf16 weight: two dtype groups for foreach."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.full((64, 32), 0.01))
        self.b = torch.nn.Parameter(torch.full((32, 8), 0.01))
        self.c = torch.nn.Parameter(torch.full((8, 8), 0.01, dtype=BF16))

    def forward(self, x: torch.Tensor) -> types.SimpleNamespace:
        h = x @ self.a @ self.b
        return types.SimpleNamespace(loss=h.sum() + (h.to(BF16) @ self.c).float().sum())


def _batches(n: int) -> Iterator[dict[str, torch.Tensor]]:
    for _ in range(n):
        yield {"x": torch.ones(4, 64)}


@pytest.mark.parametrize("foreach", [True, False])
def test_the_step_model_equals_a_real_step_on_the_cpu(foreach: bool) -> None:
    """The real step holds the gradients, the kept loss, the state and exactly the modelled temporaries."""
    model = _Mixed()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=foreach)
    trace = run_steps(model, opt, _batches(3), steps=2)
    sizes = [(p.numel(), p.numel() * p.element_size(), p.dtype) for p in model.parameters()]
    impl = "foreach" if foreach else "single-tensor"
    step = static.optimizer_step("adamw", sizes, "cpu", implementation=impl)
    # step 0: the boundary before it holds parameters, gradients and the kept loss; the step adds the state it
    # makes and its temporaries. Step 1: the state is there already; only the temporaries come on top.
    assert trace.peak(0, "after_opt_step") == trace.live(0, "after_bwd") + step.first_peak
    assert trace.peak(1, "after_opt_step") == trace.live(1, "after_bwd") + step.temp
    assert trace.live(0, "after_opt_step") == trace.live(0, "after_bwd") + step.first_peak - step.temp


def test_foreach_on_a_tiny_blipmon_model_equals_the_model(tiny_models: object) -> None:
    """torch's foreach AdamW (CUDA's default) on tiny/blip2-opt, run on the CPU: the CUDA step model, to the byte."""
    from reference.train_like_runner import reference_trace

    from blipmon.core import config

    cfg = config.resolve("tiny/blip2-opt", ["model.device_map=cpu", "train.num_train_samples=32"])
    seen: list[torch.nn.Parameter] = []

    def foreach_adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        seen.extend(params)
        return torch.optim.AdamW(params, lr=lr, foreach=True)

    trace = reference_trace(cfg, steps=2, optimizer=foreach_adamw)
    # Every parameter of tiny/blip2-opt takes part in the loss (the estimate's trace finds no gradient-less one).
    sizes = [(p.numel(), p.numel() * p.element_size(), p.dtype) for p in seen]
    step = static.optimizer_step("adamw", sizes, "cpu", implementation="foreach")
    assert step.temp == sum(b for _n, b, _d in sizes)  # one fp32 group: every parameter's sqrt at once
    assert trace.peak(0, "after_opt_step") == trace.live(0, "after_bwd") + step.first_peak
    assert trace.peak(1, "after_opt_step") == trace.live(1, "after_bwd") + step.temp
