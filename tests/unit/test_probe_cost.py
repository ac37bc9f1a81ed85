"""What the probe costs, held by what can be counted exactly: Python calls, hooks, entries (issue 12's cost bar).

Timing is left to ``benchmarks/overhead.py``. Here: on a step not recorded in full the module hooks are off and
the four boundaries run the same number of Python calls whatever the number of parameters, gradients, optimizer
tensors and saved tensors (no Python code per tensor: counting goes through C-level passes); the pack hook is the
only probe code in a forward, and does not alias parameters. And the shortcuts stay exact: every figure is held to
one counted by hand, and a changed gradient or optimizer tensor is recounted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch

from blipmon.runner.probes import PhaseProbe, StorageCounter, _keys_and_sizes, _unique_totals
from blipmon.runner.train import Cursor

PROBES = str(Path(__file__).resolve().parents[2] / "blipmon" / "runner" / "probes.py")


class Enc(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 8)
        self.inner = torch.nn.Linear(8, 8)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.fail:
            raise RuntimeError("CPU allocator: out of memory (a test's)")
        return self.inner(h)


class Toy(torch.nn.Module):
    """enc (lin 4->8, inner 8->8), relu in the root's code, head 8->2 without bias; batch 3, fp32.

    Saved for backward: x (3x4) by enc.lin, lin's output (3x8) by enc.inner, relu's result (3x8) by relu and again
    by head: 240 bytes in three storages; and each linear's weight (a view of a parameter) three times more.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enc = Enc()
        self.head = torch.nn.Linear(8, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.enc(x))).sum()


ACTS = (3 * 4 + 3 * 8 + 3 * 8) * 4
PARAMS = ((4 * 8 + 8) + (8 * 8 + 8) + 8 * 2) * 4


def _probe(model: torch.nn.Module, every: int, depth: int = 2) -> tuple[PhaseProbe, list[tuple[str, dict[str, Any]]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = PhaseProbe(model, lambda kind, **f: out.append((kind, f)), optimizer=opt, module_depth=depth,
                       module_every=every)  # fmt: skip
    return probe, out


def _step(model: torch.nn.Module, probe: PhaseProbe, step: int, x: torch.Tensor | None = None) -> None:
    probe.boundary("before_fwd", step, 0)
    with probe.saved.track():
        loss = model(torch.randn(3, 4) if x is None else x)
    probe.boundary("after_fwd", step, 0)
    loss.backward()
    del loss
    probe.boundary("after_bwd", step, 0)
    probe.optimizer.step()
    probe.boundary("after_opt_step", step, 0)
    probe.optimizer.zero_grad(set_to_none=True)


def test_module_hooks_run_only_on_steps_recorded_in_full() -> None:
    torch.manual_seed(0)
    model = Toy()
    probe, out = _probe(model, every=3)
    hooked = {}
    packed = {}
    for step in range(5):
        probe.boundary("before_fwd", step, 0)
        hooked[step] = (len(model.enc.inner._forward_pre_hooks), len(model.enc.inner._forward_hooks))
        calls = [0]
        pack = probe.saved._pack
        probe.saved._pack = lambda t, _pack=pack, _calls=calls: (_calls.__setitem__(0, _calls[0] + 1), _pack(t))[1]
        with probe.saved.track():
            loss = model(torch.randn(3, 4))
        packed[step] = calls[0] > 0
        del probe.saved._pack
        probe.boundary("after_fwd", step, 0)
        loss.backward()
        del loss
        probe.boundary("after_bwd", step, 0)
        probe.optimizer.step()
        probe.boundary("after_opt_step", step, 0)
        probe.optimizer.zero_grad(set_to_none=True)
    assert hooked == {0: (1, 1), 1: (1, 1), 2: (0, 0), 3: (1, 1), 4: (0, 0)}  # steps 0, 1, then every third
    assert packed == {0: True, 1: True, 2: False, 3: True, 4: False}  # the saved-tensor hook, likewise
    fwd = {f["step"]: f for k, f in out if k == "phase" and f["phase"] == "after_fwd"}
    # Steps not recorded in full count nothing per tensor: acts, grads and optimizer state are null there (the
    # documented cadence), params (counted when they change) stay; the counted steps are exact.
    assert [fwd[s]["acts"] for s in range(5)] == [ACTS, ACTS, None, ACTS, None]
    opt_rec = {f["step"]: f for k, f in out if k == "phase" and f["phase"] == "after_opt_step"}
    params = sum(p.numel() * 4 for p in model.parameters())
    assert [opt_rec[s]["params"] for s in range(5)] == [params] * 5
    assert [opt_rec[s]["grads"] for s in range(5)] == [params, params, None, params, None]
    assert [opt_rec[s]["optim"] for s in range(5)] == [params, params, None, params, None]  # SGD momentum buffers
    assert all(opt_rec[s]["other"] is None and opt_rec[s]["host_rss"] > 0 for s in range(5))
    mods = {f["step"]: f for k, f in out if k == "modules" and f["phase"] == "after_fwd"}
    assert sorted(mods) == [0, 1, 3]
    # Tree "", enc, enc.lin, enc.inner, head: after the hooks came back at step 3, the split is step 0's.
    assert mods[3]["acts"] == mods[0]["acts"] == [ACTS, (12 + 24) * 4, 12 * 4, 24 * 4, 0]
    probe.close()
    assert len(model.enc.inner._forward_hooks) == 0


def test_an_error_on_a_step_not_recorded_in_full_names_its_module_from_the_traceback() -> None:
    model = Toy()
    probe, _ = _probe(model, every=10)
    for step in range(2):
        _step(model, probe, step)
    probe.boundary("before_fwd", 2, 0)  # step 2: not in full, the module hooks are off
    assert probe.modules is not None and not probe.modules.attached
    model.enc.fail = True
    cursor = Cursor(step=2, phase="forward", running_module=probe.running_module)
    try:
        with probe.saved.track():
            model(torch.randn(3, 4))
    except RuntimeError as exc:
        assert probe.running_module(exc) == "enc"  # raised in enc's own forward, after enc.lin returned
        assert probe.running_module() == "enc"  # the exception being handled
        assert cursor.where() == {"module": "enc", "module_pass": "forward"}
        caught = exc
    assert probe.running_module() is None  # outside every handler, without the hooks: nothing runs
    assert probe.running_module(caught) == "enc"
    model.enc.fail = False

    # In backward no module's call is a frame: the step's record names the pass alone.
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("out of memory in backward (a test's)")

    handle = model.enc.inner.register_forward_hook(lambda _m, _a, out: Boom.apply(out))
    with probe.saved.track():
        loss = model(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="in backward") as info:
        loss.backward()
    assert probe.running_module(info.value) is None
    handle.remove()


def test_the_saved_tensor_hook_leaves_parameters_as_they_are() -> None:
    torch.manual_seed(0)
    model = Toy()
    probe, _ = _probe(model, every=1, depth=0)  # every step counted, without module slots
    for step in range(2):
        _step(model, probe, step)
    probe.boundary("before_fwd", 2, 0)
    with probe.saved.track():
        loss = model(torch.randn(3, 4))
    alive = list(probe.saved.alive())
    # x, lin's output, relu's result saved by relu and again by head: four aliases, none of a parameter (the three
    # weights' views that the linears save are kept as they are).
    assert sorted(t.numel() for t in alive) == [12, 24, 24, 24]
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(t.untyped_storage().data_ptr() in param_storages for t in alive)
    del alive  # the test's own references would keep the aliases alive past backward
    assert probe.boundary("after_fwd", 2, 0)["acts"] == ACTS
    loss.backward()
    assert probe.boundary("after_bwd", 2, 0)["acts"] == 0


def _python_calls_in_probes(fn: Any) -> dict[str, int]:
    """Python-level calls (generator resumptions too) of functions defined in probes.py while ``fn`` runs."""
    calls: dict[str, int] = {}

    def prof(frame: FrameType, event: str, _arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename == PROBES:
            calls[frame.f_code.co_name] = calls.get(frame.f_code.co_name, 0) + 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


class Stack(torch.nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.sum()


def _calls_of_step_2(layers: int, depth: int = 2, every: int = 10) -> tuple[dict[str, int], dict[str, int]]:
    """Python calls of the probes in step 2's boundaries and in its forward."""
    torch.manual_seed(0)
    model = Stack(layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # three state tensors per parameter
    probe = PhaseProbe(model, lambda *_a, **_f: None, optimizer=opt, module_depth=depth, module_every=every)
    phases = ("before_fwd", "after_fwd", "after_bwd", "after_opt_step")
    x = torch.randn(4, 16)
    boundary_calls: dict[str, int] = {}
    forward_calls: dict[str, int] = {}
    state: dict[str, Any] = {}
    for step in range(3):

        def at(phase: str, step: int = step) -> None:
            calls = _python_calls_in_probes(lambda: probe.boundary(phase, step, 0))
            if step == 2:
                for k, v in calls.items():
                    boundary_calls[k] = boundary_calls.get(k, 0) + v

        def forward() -> None:
            with probe.saved.track():
                state["loss"] = model(x)

        at(phases[0])
        fwd = _python_calls_in_probes(forward)
        if step == 2:
            forward_calls = fwd
        at(phases[1])
        state.pop("loss").backward()
        at(phases[2])
        opt.step()
        at(phases[3])
        opt.zero_grad(set_to_none=True)
    return boundary_calls, forward_calls


def test_a_step_not_in_full_runs_no_python_code_per_tensor() -> None:
    small, small_fwd = _calls_of_step_2(2)
    large, large_fwd = _calls_of_step_2(8)
    # 4 parameters and 12 optimizer tensors against 16 and 48, 4 saved activations against 16: the same calls.
    assert small == large
    assert sum(small.values()) < 40  # a few calls per boundary, whatever the model
    # No saved-tensor hook at all: ``track`` (a generator: entered and resumed) installs none on such a step.
    assert small_fwd == large_fwd == {"track": 2}


def test_counting_every_step_without_modules_runs_python_code_per_saved_tensor_only() -> None:
    """``runtime.module_depth = 0`` with ``module_every = 1``: every step counted, by C-level passes at the
    boundaries; the only per-tensor Python code left is the pack hook."""
    small, small_fwd = _calls_of_step_2(2, depth=0, every=1)
    large, large_fwd = _calls_of_step_2(8, depth=0, every=1)
    assert small == large
    assert sum(small.values()) < 80
    # Each layer saves its input, its weight's view (kept as it is) and tanh's result, but the first layer not its
    # weight (the batch needs no gradient).
    assert small_fwd == {"track": 2, "_pack": 2 * 3 - 1}
    assert large_fwd == {"track": 2, "_pack": 8 * 3 - 1}


def test_gradients_and_optimizer_state_are_recounted_when_they_change() -> None:
    torch.manual_seed(0)
    model = Toy()
    probe, _ = _probe(model, every=1, depth=0)  # every step counted, by the C-level passes
    for step in range(2):
        _step(model, probe, step)
    probe.boundary("before_fwd", 2, 0)
    with probe.saved.track():
        loss = model(torch.randn(3, 4))
    probe.boundary("after_fwd", 2, 0)
    loss.backward()
    assert probe.boundary("after_bwd", 2, 0)["grads"] == PARAMS  # every gradient its parameter's size
    # The same gradients at the next boundary: counted from the cache, the same figure.
    assert probe.measure(split=False)["grads"] == PARAMS
    # One gradient replaced by a view of a larger buffer (as DDP's buckets are): its whole storage counts.
    head = model.head.weight
    bucket = torch.zeros(100)
    head.grad = bucket[:16].view(2, 8)
    assert probe.measure(split=False)["grads"] == PARAMS - 16 * 4 + 100 * 4
    # Two gradients in one buffer: the buffer counts once.
    model.enc.lin.bias.grad = bucket[16:24]
    assert probe.measure(split=False)["grads"] == PARAMS - 16 * 4 - 8 * 4 + 100 * 4
    probe.optimizer.step()  # SGD with momentum: one buffer per parameter, each its parameter's size
    assert probe.boundary("after_opt_step", 2, 0)["optim"] == PARAMS
    # A state tensor replaced by a view of a larger buffer (SGD updates it in place): recounted after the step.
    probe.optimizer.state[head]["momentum_buffer"] = torch.zeros(50)[:16].view(2, 8)
    probe.optimizer.step()
    assert probe.boundary("after_opt_step", 3, 0)["optim"] == PARAMS - 16 * 4 + 50 * 4


def test_c_level_totals_equal_the_storage_counter() -> None:
    """The shortcut's rule is ``StorageCounter``'s: unique storages, each once, whatever views hold it."""
    base = torch.zeros(64)
    other = torch.zeros(10, dtype=torch.float16)
    tensors = [base[:8], other, base[8:], base.view(8, 8), torch.ones(3), other[2:]]
    keys, sizes = _keys_and_sizes(tensors)
    assert _unique_totals(keys, sizes) == StorageCounter().count(tensors) == (64 * 4 + 10 * 2 + 3 * 4, 0)
    assert _unique_totals(keys, sizes, {keys[0]}) == (10 * 2 + 3 * 4, 0)  # excluded: base's storage
