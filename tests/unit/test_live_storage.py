"""The independent counter itself (tests/reference/live_storage.py), on cases whose bytes follow from shapes.

Every expected figure below is elements x element size of tensors whose lifetimes the test controls, or what
torch's own sources say an op allocates (named where used). Nothing here imports blipmon.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import torch
from reference.live_storage import LiveStorage, run_steps, tensors_in

F32 = 4


def test_a_matmul_chain_peaks_with_both_products_and_keeps_the_last() -> None:
    x, w1, w2 = torch.ones(8, 16), torch.ones(16, 32), torch.ones(32, 4)
    c = LiveStorage()
    assert c.add_existing(x, w1, w2) == (8 * 16 + 16 * 32 + 32 * 4) * F32
    start = c.live
    with c:
        c.restart()
        y = x @ w1  # 8 x 32
        z = y @ w2  # 8 x 4, while y still lives
        del y
        m = c.mark("chain")
    assert m.peak == start + (8 * 32 + 8 * 4) * F32
    assert m.live == start + 8 * 4 * F32
    del z
    assert c.live == start  # the finalizer took z's storage off when the tensor went


def test_views_share_one_storage_which_dies_with_the_last_view() -> None:
    c = LiveStorage()
    with c:
        t = torch.zeros(100)
        v = t[10:]
        tt = t.view(10, 10).t()
        assert c.live == 100 * F32
        del t, tt
        assert c.live == 100 * F32  # v still holds it
        del v
    assert c.live == 0


def test_a_storage_autograd_keeps_counts_until_backward_frees_it() -> None:
    w = torch.ones(16, 32, requires_grad=True)
    x = torch.ones(8, 16)
    c = LiveStorage()
    c.add_existing(w, x)
    start = c.live
    with c:
        b = (x @ w).exp()  # exp saves its result for backward
        loss = b.sum()
        del b
        # x @ w (8 x 32) died (exp does not keep its input); b lives on inside the graph; loss is 4 bytes
        assert c.live == start + 8 * 32 * F32 + F32
        loss.backward()
    # the graph let b go; w.grad (16 x 32) exists; loss is still referenced here
    assert c.live == start + 16 * 32 * F32 + F32
    assert w.grad is not None and c.add_existing(w) == 0  # the walk finds w.grad already counted


def test_an_out_argument_resized_by_the_op_is_counted_at_its_new_size() -> None:
    a = torch.ones(10, 10)
    c = LiveStorage()
    with c:
        out = torch.empty(0)
        torch.add(a, a, out=out)
        assert c.live == 100 * F32
        del out
    assert c.live == 0


# A custom op whose CPU kernel is Python and allocates a scratch tensor, as bitsandbytes' optimizer kernels do.
_LIB = torch.library.Library("blipmon_livetest", "DEF")
_LIB.define("scratch(Tensor x) -> Tensor")


def _scratch_cpu(x: torch.Tensor) -> torch.Tensor:
    tmp = torch.ones(1000)  # 4000 bytes, freed when the kernel returns
    return (tmp[:100] * x.sum()).clone()  # 400 bytes returned (the product, 400 more, dies at once)


_LIB.impl("scratch", _scratch_cpu, "CPU")


def test_a_custom_ops_python_kernel_is_opened_so_its_scratch_counts() -> None:
    x = torch.ones(3)
    for opened, extra in ((True, 1000 * F32 + 100 * F32 + 100 * F32), (False, 100 * F32)):
        c = LiveStorage(open_custom_ops=opened)
        with c:
            c.restart()
            y = torch.ops.blipmon_livetest.scratch(x)
            m = c.mark("op")
        # opened: tmp, the product and its clone coexist (x.sum() is 4 bytes and died before the product)
        assert m.peak == extra, opened
        assert m.live == 100 * F32
        del y


def test_tensors_in_finds_quant_state_like_attributes_and_optimizer_state() -> None:
    p = torch.nn.Parameter(torch.ones(4, 4))
    p.quant_state = types.SimpleNamespace(absmax=torch.ones(2), code=torch.ones(16))  # type: ignore[attr-defined]
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(4, 4)
    opt.step()
    found = {id(t.untyped_storage()) for t in tensors_in((p, opt))}
    state = opt.state[p]
    expect = [p, p.grad, p.quant_state.absmax, p.quant_state.code, state["exp_avg"], state["exp_avg_sq"], state["step"]]
    assert {id(t.untyped_storage()) for t in expect} <= found


class _TwoLayers(torch.nn.Module):
    """x (B x 8) -> x @ w1.T (B x 4) -> @ w2.T (B x 16) -> sum: two weights of 128 and 256 bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.full((4, 8), 0.1))
        self.w2 = torch.nn.Parameter(torch.full((16, 4), 0.1))

    def forward(self, x: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(loss=((x @ self.w1.t()) @ self.w2.t()).sum())


def _batches(n: int, b: int = 2) -> Iterator[dict[str, torch.Tensor]]:
    for _ in range(n):
        yield {"x": torch.ones(b, 8)}  # made inside the window before the forward: 2 x 8 x 4 = 64 bytes


def test_run_steps_windows_of_a_two_layer_model_with_single_tensor_adamw() -> None:
    model = _TwoLayers()
    params = (4 * 8 + 16 * 4) * F32  # 384
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # CPU: torch runs _single_tensor_adam
    trace = run_steps(model, opt, _batches(3), steps=2)
    assert trace.start == params
    batch, h, z, loss = 2 * 8 * F32, 2 * 4 * F32, 2 * 16 * F32, F32
    # before the forward: the parameters and the batch being made
    assert trace.peak(0, "before_fwd") == params + batch
    # forward: at the sum, x, h (saved by the second mm), z and the sum coexist
    assert trace.peak(0, "after_fwd") == params + batch + h + z + loss
    # after it: x and h saved for backward, the loss / 1 (the model's own loss died with ``out``)
    assert trace.live(0, "after_fwd") == params + batch + h + loss
    # after the backward: the gradients (one per parameter) and the kept loss; batch and graph are gone
    assert trace.live(0, "after_bwd") == params + params + loss
    # AdamW's first step: exp_avg and exp_avg_sq per parameter plus a 4-byte step scalar each, all made before the
    # first update; then per parameter exp_avg_sq.sqrt() and its quotient, with the previous parameter's denom still
    # bound: for w2 that is 128 (w1's denom) + 2 x 256
    state = 2 * params + 2 * F32
    assert trace.peak(0, "after_opt_step") == params + params + loss + state + 4 * 8 * F32 + 2 * 16 * 4 * F32
    assert trace.live(0, "after_opt_step") == params + params + loss + state
    # step 1: the same step with the state already there
    assert trace.peak(1, "after_opt_step") == trace.peak(0, "after_opt_step")
    # between steps 0 and 1: the interval starts with the gradients (not yet zeroed) and the kept loss
    assert trace.peak(1, "before_fwd") == params + params + loss + state
    assert trace.leaked_to_gc == 0


def test_run_steps_accumulation_keeps_gradients_and_losses_through_the_window() -> None:
    model = _TwoLayers()
    params = (4 * 8 + 16 * 4) * F32
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # no momentum: no state, an in-place update
    trace = run_steps(model, opt, _batches(5), steps=2, accumulate=2)
    micro = [(w.step, w.micro, w.phase) for w in trace.windows]
    assert micro[:7] == [
        (0, 0, "before_fwd"), (0, 0, "after_fwd"), (0, 0, "after_bwd"),
        (0, 1, "before_fwd"), (0, 1, "after_fwd"), (0, 1, "after_bwd"), (0, 1, "after_opt_step"),
    ]  # fmt: skip
    by = {(w.step, w.micro, w.phase): w for w in trace.windows}
    assert by[(0, 0, "after_bwd")].live == params + params + F32
    # the second micro-step makes its batch next to the gradients and the first loss
    assert by[(0, 1, "before_fwd")].peak == params + params + F32 + 2 * 8 * F32
    assert by[(0, 1, "after_bwd")].live == params + params + 2 * F32
    # SGD adds in place: the optimizer step holds nothing more
    assert by[(0, 1, "after_opt_step")].peak == params + params + 2 * F32
