"""The probe's C-level counting on a real GPU (issue 12's cost work): the CUDA share of each figure.

Run on a lent GPU machine with ``python -m pytest -m gpu tests/gpu/test_gpu_probe_cost.py -q``. Nothing is mocked.
On the CPU every storage key has device -1, so only a GPU exercises the path that sums the CUDA bytes apart
(``_unique_totals``), which ``other`` depends on. Expected figures are counted by hand from the shapes.
"""

from __future__ import annotations

import pytest
import torch

from blipmon.runner.probes import PhaseProbe, StorageCounter, _keys_and_sizes, _unique_totals

pytestmark = [pytest.mark.gpu]


def test_unique_totals_split_cuda_and_host_bytes() -> None:
    dev = torch.zeros(64, device="cuda")
    host = torch.zeros(10)
    tensors = [dev[:8], host, dev.view(8, 8), torch.ones(3, device="cuda", dtype=torch.float16)]
    keys, sizes = _keys_and_sizes(tensors)
    expected = (64 * 4 + 10 * 4 + 3 * 2, 64 * 4 + 3 * 2)
    assert _unique_totals(keys, sizes) == StorageCounter().count(tensors) == expected


@pytest.mark.parametrize(("depth", "every"), [(1, 10), (0, 1)], ids=["modules, cadence", "C-level, every step"])
def test_a_step_on_the_gpu_counts_every_category_on_the_device(depth: int, every: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out: list[dict] = []
    probe = PhaseProbe(model, lambda kind, **f: out.append(f) if kind == "phase" else None, optimizer=opt, cuda=True,
                       module_depth=depth, module_every=every)  # fmt: skip
    params = ((16 * 32 + 32) + (32 * 4 + 4)) * 4
    x = torch.randn(8, 16, device="cuda")
    for step in range(3):
        counted = step < 2 or step % every == 0  # every 10th: step 2 is not counted in full, every step: it is
        probe.boundary("before_fwd", step, 0)
        with probe.saved.track():
            loss = model(x).sum()
        fwd = probe.boundary("after_fwd", step, 0)
        loss.backward()
        del loss
        bwd = probe.boundary("after_bwd", step, 0)
        opt.step()
        end = probe.boundary("after_opt_step", step, 0)
        opt.zero_grad(set_to_none=True)
        if not counted:  # the allocator's figures and params only: no "whatever is left" for other
            for r in (fwd, bwd, end):
                assert (r["grads"], r["optim"], r["acts"], r["other"]) == (None, None, None, None), r
                assert r["params"] == params and r["allocated"] >= params and r["peak"] >= r["allocated"], r
            continue
        # Saved: x (8x16) by the first linear, tanh's result (8x32) by tanh and by the second linear (once).
        assert fwd["acts"] == (8 * 16 + 8 * 32) * 4
        assert bwd["grads"] == params and bwd["acts"] == 0
        # AdamW: two moments per parameter on the GPU, and a step counter per parameter tensor (host, fp32).
        assert end["optim"] == 2 * params + 4 * 4
    # ``other`` is what the allocator holds beyond the four categories on the device: never negative.
    assert all(r["other"] >= 0 for r in out if r["acts"] is not None)
    assert sum(r["acts"] is None for r in out) == (0 if every == 1 else 4)
    probe.close()
