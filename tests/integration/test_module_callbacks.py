"""Per-module memory and the module an out-of-memory error ran in, recorded by the callbacks (issue 12).

A small model with known modules trains under the Hugging Face Trainer and Lightning with blipmon's callback.
Its ``head`` (or, in backward, its ``enc``) asks the CPU allocator for 4 PiB on the third micro-batch: a real
allocation failure, which the profile's ``oom`` record must place in that module and pass.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from blipmon.core.run import load_run

HUGE = 2**50  # elements of fp32: no allocator can give them


class Explode(torch.autograd.Function):
    """Identity whose backward really allocates HUGE floats when armed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, armed: bool) -> torch.Tensor:
        ctx.armed = armed
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.armed:
            torch.empty(HUGE)
        return g, None


class Enc(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 16)
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Explode.apply(torch.relu(self.lin(x)), self.armed)


class Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 1)
        self.armed = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.armed:
            torch.empty(HUGE)
        return self.lin(h).squeeze(-1)


class Regressor(torch.nn.Module):
    """``enc`` then ``head``; ``fail`` = "forward" or "backward" arms one of them on the third call."""

    def __init__(self, fail: str | None = None) -> None:
        super().__init__()
        self.enc = Enc()
        self.head = Head()
        self.fail = fail
        self.calls = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.calls += 1
        self.head.armed = self.fail == "forward" and self.calls == 3
        self.enc.armed = self.fail == "backward" and self.calls == 3
        y = self.head(self.enc(x))
        return {"loss": torch.nn.functional.mse_loss(y, labels), "logits": y}


class Data(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(8, generator=g), "labels": torch.randn((), generator=g)}


ENC_BYTES = (8 * 16 + 16) * 4
HEAD_BYTES = (16 + 1) * 4
BATCH = 4


def trainer(tmp_path: Path, model: torch.nn.Module, steps: int) -> tuple[Any, Any]:
    from transformers import Trainer, TrainingArguments

    from blipmon.integrations.transformers import BlipmonCallback

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        optim="sgd",
    )
    cb = BlipmonCallback(out=tmp_path / "profiles", module_every=2)
    return Trainer(model=model, args=args, train_dataset=Data(), callbacks=[cb]), cb


def test_trainer_records_each_module_and_the_root_is_the_phase(tmp_path: Path) -> None:
    tr, cb = trainer(tmp_path, Regressor(), steps=3)
    tr.train()
    run = load_run(cb.run_dir)
    assert run.status == "ok"
    assert run.modules.trees[0] == ("", "enc", "enc.lin", "head", "head.lin")
    assert sorted({r.step for r in run.modules.rows}) == [0, 1, 2]  # 0, 1, then every 2nd
    params = [ENC_BYTES + HEAD_BYTES, ENC_BYTES, ENC_BYTES, HEAD_BYTES, HEAD_BYTES]
    for ph in run.phases:
        rows = run.modules.at(ph["step"], ph["phase"])
        assert [r.params for r in rows] == params
        assert [r.acts for r in rows][0] == ph["acts"] and [r.grads for r in rows][0] == ph["grads"]
    fwd = run.modules.at(0, "after_fwd")
    # enc.lin saves the batch x (4x8); relu saves its result (4x16), which head.lin saves again: at enc, the first
    # saver; relu's result is enc's own code, above enc.lin. The loss's inputs are the root's.
    assert [r.acts for r in fwd][1:3] == [(4 * 8 + 4 * 16) * 4, 4 * 8 * 4]
    assert [r.grads for r in run.modules.at(0, "after_bwd")] == params


@pytest.mark.parametrize(("fail", "module"), [("forward", "head"), ("backward", "enc")])
def test_trainer_oom_names_the_module_and_pass(tmp_path: Path, fail: str, module: str) -> None:
    tr, cb = trainer(tmp_path, Regressor(fail), steps=4)
    with pytest.raises(RuntimeError, match="can't allocate memory") as raised:
        tr.train()
    sys.excepthook(raised.type, raised.value, raised.tb)  # as the interpreter does for an uncaught error
    summary = load_run(cb.run_dir).summary()
    assert summary["status"] == "oom"
    assert summary["oom"]["step"] == 2
    assert summary["oom"]["requested_bytes"] == HUGE * 4
    assert summary["oom"]["module"] == module
    assert summary["oom"]["module_pass"] == fail


def test_lightning_records_modules_and_names_the_oom_module(tmp_path: Path) -> None:
    import lightning as L

    from blipmon.integrations.lightning import BlipmonCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Regressor("forward")

        def training_step(self, batch: dict[str, torch.Tensor], _i: int) -> torch.Tensor:
            return self.net(**batch)["loss"]

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = BlipmonCallback(out=tmp_path)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])  # fmt: skip
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        trainer.fit(Module(), torch.utils.data.DataLoader(Data(), batch_size=BATCH))
    run = load_run(cb.run_dir)
    summary = run.summary()
    assert summary["status"] == "oom"
    assert summary["oom"]["module"] == "net.head" and summary["oom"]["module_pass"] == "forward"
    # ``enc`` and ``head`` each hold one module, ``lin``: no level of their own, so their ``lin`` is recorded too
    assert run.modules.trees[0] == ("", "net", "net.enc", "net.enc.lin", "net.head", "net.head.lin")
    assert [r.params for r in run.modules.at(0, "before_fwd")] == [
        ENC_BYTES + HEAD_BYTES,
        ENC_BYTES + HEAD_BYTES,
        ENC_BYTES,
        ENC_BYTES,
        HEAD_BYTES,
        HEAD_BYTES,
    ]
