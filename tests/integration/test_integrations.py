"""The Hugging Face Trainer and Lightning callbacks: real trainers, a real tiny BLIP-2, profiles read back.

Each trainer runs in this process, as in a user's script: tiny BLIP-2 OPT (built from its config,
random weights), batch 2, ``accumulate = 2``, three optimizer steps. The profile must have the four
phases of every micro-batch with the same meaning as a ``blipmon run``: activations only between
forward and backward, gradients from the first backward, AdamW state from the first optimizer step.
A second, smaller model raises an out-of-memory error in its second step's forward, which must be
recorded with its step and phase.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from support import adamw_step_counter_bytes, optimizer_state_bytes, read_events, unique_storage_bytes

from blipmon.core.report import render_compare, render_show
from blipmon.core.run import PHASES, RunData, load_run
from blipmon.integrations._recorder import MODULE_EVERY
from blipmon.runner.data import SyntheticCaptions
from blipmon.runner.models import family_of, model_class, tiny_config

STEPS, ACCUM, BATCH = 3, 2, 2


def tiny_blip2() -> tuple[torch.nn.Module, Any]:
    cfg = tiny_config("tiny/blip2-opt")
    torch.manual_seed(0)
    return model_class(cfg)(cfg), cfg


def captions(cfg: Any) -> SyntheticCaptions:
    return SyntheticCaptions(cfg, family_of(cfg), n=STEPS * ACCUM * BATCH, max_length=8)


class OomOnSecondStep(torch.nn.Module):
    """A small regressor whose forward raises CUDA's out-of-memory error in its third call.

    With two micro-batches per step, that is the first micro-batch of step 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        self.calls = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        y = self.net(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(y, labels), "logits": y}


class Regression(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(8, generator=g), "labels": torch.randn((), generator=g)}


def adamw_expected_bytes(model: torch.nn.Module) -> int:
    """AdamW's state after its first step on a full fine-tune of ``model``, from the model itself: exp_avg and
    exp_avg_sq like each parameter (2x the parameter bytes) plus torch's per-tensor step counter."""
    params = list(model.parameters())
    return 2 * unique_storage_bytes(params) + len(params) * adamw_step_counter_bytes()


def check_four_phases(run: RunData, model: torch.nn.Module, optimizer: Any, *, grads_kept_after_step: bool) -> None:
    """The lab's memory story, phase by phase, for STEPS steps of ACCUM micro-batches.

    ``model`` is the module the trainer trained (built in this test) and ``optimizer`` the trainer's own AdamW:
    the expected bytes come from them, never from the profile.
    """
    assert [s["step"] for s in run.steps] == list(range(STEPS))
    got = [(p["step"], p["micro_step"], p["phase"]) for p in run.phases]
    expected = []
    for step in range(STEPS):
        for micro in range(ACCUM):
            expected += [(step, micro, ph) for ph in PHASES[:3]]
        expected.append((step, ACCUM - 1, "after_opt_step"))
    assert got == expected
    params = unique_storage_bytes(model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 (4 bytes a parameter) all along
    adamw = adamw_expected_bytes(model)
    assert optimizer_state_bytes(optimizer) == adamw  # what torch allocated is what the formula says
    assert all(p["params"] == params for p in run.phases)
    for p in run.phases:
        assert p["host_rss"] > 0 and p["allocated"] is None  # CPU: no allocator figures
        if p["step"] >= 2 and p["step"] % MODULE_EVERY:  # not counted in full: only what costs nothing per tensor
            assert (p["grads"], p["optim"], p["acts"], p["other"]) == (None, None, None, None), p
            continue
        if p["phase"] == "after_fwd":
            assert p["acts"] > 0, p
        else:
            assert p["acts"] == 0, p  # nothing saved for backward outside forward..backward
        if p["phase"] in ("after_bwd", "after_opt_step"):
            assert p["grads"] == params, p  # a full fine-tune: one fp32 gradient per parameter
        before_first_step = p["step"] == 0 and p["phase"] != "after_opt_step"
        assert p["optim"] == (0 if before_first_step else adamw), p
    assert any(p["step"] == 2 for p in run.phases)  # a step not counted in full was recorded too
    first = run.phases[0]
    assert first["grads"] == 0
    step1_start = next(p for p in run.phases if p["step"] == 1)
    assert step1_start["grads"] == (params if grads_kept_after_step else 0)
    for s in run.steps:
        assert s["seconds"] > 0 and isinstance(s["loss"], float) and s["samples_per_s"] > 0
        assert s["micro_steps"] == ACCUM


def check_readers(run: RunData) -> None:
    """``show`` and ``compare`` read the profile; the summary is the fixed one."""
    summary = run.summary()
    assert summary["status"] == "ok" and summary["load"] is None
    assert summary["config"]["train"]["accumulate_grad_batches"] == ACCUM
    assert summary["config"]["train"]["batch_size"] == BATCH
    assert summary["peaks"]["host_rss"] > 0
    assert run.plan["total_steps"] == STEPS
    text = render_show(run)
    assert "after_opt_step" in text and "finished" in text
    assert "status" in render_compare([run, run], "markdown")


# -- Hugging Face Trainer --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    from blipmon.integrations.transformers import BlipmonCallback

    class Checked(BlipmonCallback):
        """Counts how often the Trainer-callback fallback had to record after_bwd itself."""

        fallbacks = 0

        def _fallback_after_bwd(self) -> None:
            if self.recorder is not None and self.recorder.has("after_fwd"):
                type(self).fallbacks += 1
            super()._fallback_after_bwd()

    base = tmp_path_factory.mktemp("trainer")
    model, cfg = tiny_blip2()
    args = TrainingArguments(
        output_dir=str(base / "hf"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_steps=STEPS,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    cb = Checked(out=base / "profiles", name="hf/tiny-blip2")
    trainer = Trainer(model=model, args=args, train_dataset=captions(cfg), callbacks=[cb])
    trainer.train()
    assert cb.run_dir is not None and cb.run_dir.parent == base / "profiles"
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "run": load_run(cb.run_dir),
        "logged": logged,
        "fallbacks": Checked.fallbacks,
        "cb": cb,
        "model": model,
        "optimizer": trainer.optimizer,
    }


def test_trainer_callback_records_four_phases_per_micro_batch(trainer_run: dict[str, Any]) -> None:
    # The Trainer sets gradients to None right after the optimizer step.
    check_four_phases(trainer_run["run"], trainer_run["model"], trainer_run["optimizer"], grads_kept_after_step=False)


def test_trainer_after_bwd_comes_from_the_end_of_backward_itself(trainer_run: dict[str, Any]) -> None:
    assert trainer_run["fallbacks"] == 0


def test_trainer_step_losses_are_the_ones_the_trainer_logs(trainer_run: dict[str, Any]) -> None:
    losses = [s["loss"] for s in trainer_run["run"].steps]
    assert losses == pytest.approx(trainer_run["logged"], rel=1e-4)


def test_trainer_profile_reads_like_any_run(trainer_run: dict[str, Any]) -> None:
    run = trainer_run["run"]
    assert run.name == "hf/tiny-blip2" and run.header["source"] == "transformers.Trainer"
    assert run.config["train"]["optim"] == "adamw" and run.config["job"]["kind"] == "train"
    assert len(run.samples) > 0
    check_readers(run)
    assert sys.excepthook is not trainer_run["cb"].recorder._excepthook  # handed back after training


def cpu_args(out: Path, *, batch: int, steps: int, accumulate: int = 1) -> Any:
    """A short Trainer run on the CPU that writes nothing but blipmon's profile."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate,
        max_steps=steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )


def test_trainer_batches_with_image_placeholders_raise_no_note(trainer_run: dict[str, Any]) -> None:
    assert not [n for n in trainer_run["run"].notes if "placeholder" in n]


def test_trainer_batches_without_image_placeholders_are_called_out(tmp_path: Path) -> None:
    """The seed lab's mistake (captions tokenized alone): the images do nothing, and the user is told so."""
    from transformers import Trainer

    from blipmon.integrations.transformers import BlipmonCallback

    model, cfg = tiny_blip2()
    data = SyntheticCaptions(cfg, family_of(cfg), n=4, max_length=8, image_placeholders=False)
    args = cpu_args(tmp_path / "hf", batch=2, steps=2)
    cb = BlipmonCallback(out=tmp_path / "profiles")
    with pytest.warns(UserWarning, match="without image placeholder tokens"):
        Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    run = load_run(cb.run_dir)
    assert run.summary()["status"] == "ok"
    notes = [n for n in run.notes if "placeholder" in n]
    assert len(notes) == 1 and "the images do not affect the loss" in notes[0]  # once, not every step
    assert "note     BLIP-2 batch without image placeholder tokens" in render_show(run)


def test_trainer_oom_in_forward_is_recorded_with_step_and_phase(tmp_path: Path) -> None:
    from transformers import Trainer

    from blipmon.integrations.transformers import BlipmonCallback

    args = cpu_args(tmp_path / "hf", batch=4, steps=4, accumulate=2)
    cb = BlipmonCallback(out=tmp_path / "profiles")
    trainer = Trainer(model=OomOnSecondStep(), args=args, train_dataset=Regression(), callbacks=[cb])
    with pytest.raises(torch.OutOfMemoryError) as raised:
        trainer.train()
    # The forward hook has recorded the OOM; the run ends when the exception reaches the interpreter,
    # as it does in a script that does not catch it (the default hook prints the traceback after ours).
    assert cb.recorder is not None and not cb.recorder.finished
    sys.excepthook(raised.type, raised.value, raised.tb)
    assert cb.recorder.finished and sys.excepthook is not cb.recorder._excepthook
    run = load_run(cb.run_dir)
    summary = run.summary()
    assert summary["status"] == "oom"
    assert summary["oom"]["step"] == 1 and summary["oom"]["micro_step"] == 0
    assert summary["oom"]["phase"] == "forward"
    assert summary["oom"]["requested_bytes"] == 2 * 1024**3
    assert [s["step"] for s in summary["steps"]] == [0]
    assert sum(1 for e in read_events(cb.run_dir / "events.jsonl") if e["type"] == "oom") == 1


def test_a_failure_inside_blipmon_never_stops_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import Trainer, TrainingArguments

    from blipmon.integrations.transformers import BlipmonCallback
    from blipmon.runner.probes import PhaseProbe

    def broken(self: PhaseProbe, *_args: Any, **_kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(PhaseProbe, "measure", broken)
    model = torch.nn.Sequential(torch.nn.Linear(8, 1))

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": torch.nn.functional.mse_loss(self.net(x).squeeze(-1), labels)}

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=2, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    cb = BlipmonCallback(out=tmp_path / "profiles")
    with pytest.warns(RuntimeWarning, match="probe exploded"):
        Trainer(model=Wrapper(), args=args, train_dataset=Regression(), callbacks=[cb]).train()
    run = load_run(cb.run_dir)
    assert run.status == "ok" and run.phases == []
    assert [s["step"] for s in run.steps] == [0, 1]  # the steps are still recorded
    assert sum("probe exploded" in n for n in run.notes) == 1


# -- Lightning -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import lightning as L  # the test extra installs it: a broken install fails, never skips

    from blipmon.integrations.lightning import BlipmonCallback

    class FineTuner(L.LightningModule):
        """The seed lab's module, minus the processor: the batch is already tensors."""

        def __init__(self) -> None:
            super().__init__()
            self.model, self.cfg = tiny_blip2()

        def training_step(self, batch: dict[str, torch.Tensor], _idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    base = tmp_path_factory.mktemp("lightning")
    module = FineTuner()
    loader = torch.utils.data.DataLoader(captions(module.cfg), batch_size=BATCH)
    cb = BlipmonCallback(out=base / "profiles")
    trainer = L.Trainer(
        max_steps=STEPS,
        accumulate_grad_batches=ACCUM,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.fit(module, loader)
    assert cb.run_dir is not None
    return {"run": load_run(cb.run_dir), "model": module.model, "optimizer": trainer.optimizers[0]}


def test_lightning_callback_records_the_lab_phases(lightning_run: dict[str, Any]) -> None:
    # Lightning zeroes gradients just before the next backward: they are still there at the next before_fwd.
    check_four_phases(
        lightning_run["run"], lightning_run["model"], lightning_run["optimizer"], grads_kept_after_step=True
    )


def test_lightning_profile_reads_like_any_run(lightning_run: dict[str, Any]) -> None:
    run = lightning_run["run"]
    assert run.name == "lightning/FineTuner" and run.header["source"] == "lightning.Trainer"
    assert run.config["train"]["precision"] == "32-true"
    check_readers(run)


def test_lightning_oom_is_recorded_by_on_exception(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import lightning as L

    from blipmon.integrations.lightning import BlipmonCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = OomOnSecondStep()

        def training_step(self, batch: dict[str, torch.Tensor], _idx: int) -> torch.Tensor:
            return self.net(**batch)["loss"]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = BlipmonCallback(out=tmp_path, print_phases=True)
    trainer = L.Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    with pytest.raises(torch.OutOfMemoryError):
        trainer.fit(Module(), torch.utils.data.DataLoader(Regression(), batch_size=4))
    summary = load_run(cb.run_dir).summary()
    assert summary["status"] == "oom"
    assert summary["oom"]["step"] == 1 and summary["oom"]["micro_step"] == 0
    assert summary["oom"]["phase"] == "forward"
    assert summary["config"]["train"]["optim"] == "sgd"
    printed = capsys.readouterr().out  # the lab script's lines, with its phase names
    for name in ("_phase0_before_fwd", "_phase1_after_fwd", "_phase2_after_bwd", "_phase3_after_opt_step"):
        assert f"step 0 micro 1 {name}:" in printed or f"step 0 micro 0 {name}:" in printed
    assert "Params" in printed and "Acts" in printed
