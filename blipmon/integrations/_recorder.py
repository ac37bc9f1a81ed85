"""The part both training-framework callbacks share: one blipmon profile written from inside the user's process.

Why one recorder for two frameworks: the profile must be the same whoever drives the loop — the
same events, the same four phases measured by the same ``PhaseProbe``, the same step records — so
``show``, ``compare``, ``replay`` and ``attach`` cannot tell a Trainer run from a ``blipmon run``
except by its header's ``source``. The callbacks only translate their framework's hooks into
``begin_step`` / ``boundary`` / ``end_step`` calls.

Phases follow seed 002's lab script: before_fwd, after_fwd, after_bwd (once per micro-batch) and
after_opt_step (once per optimizer step); activations are counted exactly, from the tensors saved
for backward while ``track_begin``/``track_end`` bracket the forward.

A profiler must never be what breaks a training run: every hook body is guarded, and an internal
failure turns into one warning and a ``note`` in the profile, after which phase probing stops while
the run (and its step records) go on.

One module although it is long: ``Recorder`` is one state machine (start, steps, phases, failure, finish) whose
parts share its fields; the small helpers above it exist only for it. Split, each half would read the other's state.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch

from blipmon.core.layout import EVENTS
from blipmon.core.outcomes import run_exit_code
from blipmon.core.profile import FORMAT_VERSION, EventWriter, write_config

PHASE_INDEX = {"before_fwd": 0, "after_fwd": 1, "after_bwd": 2, "after_opt_step": 3}
# Per-module memory (issue 12): as ``blipmon run`` records it by default (core/schema.py).
MODULE_DEPTH = 2
MODULE_EVERY = 10
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.\-/ ]+")
_F = TypeVar("_F", bound=Callable[..., Any])


def guarded(fn: _F) -> _F:
    """Run a recorder hook; turn an internal failure into a note instead of an exception in the user's loop."""

    @functools.wraps(fn)
    def wrapper(self: Recorder, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - never propagate into the training loop
            self.disable(f"{fn.__name__}: {type(e).__name__}: {e}")
            return None

    return wrapper  # type: ignore[return-value]


class CallbackOptions:
    """The options both callbacks take, checked the same way (each subclasses its framework's callback too)."""

    def _set_options(
        self,
        out: str | os.PathLike[str] | None,
        name: str | None,
        sample_hz: float,
        print_phases: bool,
        module_depth: int = MODULE_DEPTH,
        module_every: int = MODULE_EVERY,
    ) -> None:
        if not sample_hz > 0:
            raise ValueError(f"sample_hz = {sample_hz!r}: expected a number > 0")
        check_module_options(module_depth, module_every)
        self.module_depth = module_depth
        self.module_every = module_every
        self.out = out
        self.name = name
        self.sample_hz = sample_hz
        self.print_phases = print_phases
        self.recorder: Recorder | None = None
        self.run_dir: Path | None = None

    def runtime_options(self) -> dict[str, Any]:
        """The configuration's ``runtime`` keys these options set (besides the sampling rate)."""
        return {"module_depth": self.module_depth, "module_every": self.module_every}


def check_module_options(depth: int, every: int) -> None:
    """``module_depth``/``module_every`` as ``runtime.module_depth``/``runtime.module_every`` allow them."""
    from blipmon.core.schema import SCHEMA

    for key, value in (("runtime.module_depth", depth), ("runtime.module_every", every)):
        f = SCHEMA[key]
        if isinstance(value, bool) or not isinstance(value, int) or not f.minimum <= value <= f.maximum:
            raise ValueError(f"{key.split('.')[1]} = {value!r}: expected an integer in [{f.minimum}, {f.maximum}]")


def safe_name(text: str) -> str:
    """A configuration name (letters, digits, ``-_./`` and spaces) from anything a user or a model calls itself."""
    name = _NAME_BAD.sub("-", text).replace("..", ".").lstrip("/").strip() or "run"
    return name[:120]


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors at the top level of a batch or a model output (dict, ModelOutput, tuple, list)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            if isinstance(v, torch.Tensor):
                yield v
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            if isinstance(v, torch.Tensor):
                yield v


def batch_size_of(*objs: Any) -> int:
    """The leading dimension of the first tensor in a batch: what samples/s counts."""
    for obj in objs:
        for t in iter_tensors(obj):
            if t.dim() > 0:
                return int(t.shape[0])
    return 0


def unwrap_optimizer(opt: Any) -> Any:
    """The innermost torch optimizer behind accelerate's / Lightning's wrappers (where the state and step hooks live)."""
    seen = 0
    while opt is not None and seen < 8:
        inner = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
        seen += 1
    return opt


def is_oom(e: BaseException) -> bool:
    """Out of memory by the child's rule (``runner.child._record_failure``): torch's and Python's errors, a message
    saying so, or one naming a size it tried to allocate (the CPU allocator raises a plain RuntimeError)."""
    from blipmon.core.units import requested_bytes_from_message

    text = str(e)
    return (
        isinstance(e, (torch.OutOfMemoryError, MemoryError))
        or "out of memory" in text.lower()
        or requested_bytes_from_message(text) is not None
    )


def optim_name(optimizer: Any) -> str:
    """The configuration's optimizer family for a torch / bitsandbytes optimizer class (memory is what matters)."""
    cls = type(optimizer).__name__ if optimizer is not None else ""
    low = cls.lower()
    if "paged" in low and "8bit" in low:
        return "paged_adamw_8bit"
    if "8bit" in low:
        return "adam_8bit"
    if low.startswith("sgd"):
        return "sgd"
    return "adamw"


def precision_of(model: Any, mixed: str | None = None) -> str:
    """``32-true`` / ``bf16-true`` from the weights' dtype, or the mixed-precision mode the framework runs."""
    if mixed in ("bf16-mixed", "16-mixed"):
        return mixed
    try:
        dtype = next(model.parameters()).dtype
    except (StopIteration, AttributeError):
        return "32-true"
    return "bf16-true" if dtype == torch.bfloat16 else "32-true"


def model_id(model: Any) -> str:
    """What the model calls itself: its hub id or path when it has one, else its class."""
    inner = getattr(model, "base_model", None)
    for m in (model, getattr(inner, "model", None), inner):
        cfg = getattr(m, "config", None)
        path = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
        if isinstance(path, str) and path:
            return path
    return type(model).__name__


def build_config(
    name: str, description: str, model: Any, train: dict[str, Any], hz: float, runtime: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A configuration in blipmon's schema describing the run as well as it can be said from outside.

    It is validated like a user's file, so anything that reads saved runs' configurations (the
    dashboard's launcher, ``estimate``) can use it; if some value does not fit the schema, the
    configuration falls back to name, description and sampling rate only.
    """
    from blipmon.core import config as config_mod

    where = _device_of(model)  # never "meta": a model with host-offloaded modules still runs on its GPU
    device = "cuda" if where is not None and where.type == "cuda" else "cpu"
    raw = {
        "name": name,
        "description": description,
        "model": {"id": model_id(model)[:500], "weights": "pretrained", "device_map": device},
        "job": {"kind": "train"},
        "train": train,
        "runtime": {"sample_hz": hz, **(runtime or {})},
    }
    try:
        return config_mod.validate(raw)
    except config_mod.ConfigError:
        return {"name": name, "description": description, "runtime": {"sample_hz": hz}}


class Recorder:
    """Writes one run directory: header, config, environment, plan, samples, phases, steps, end."""

    def __init__(
        self,
        out: str | os.PathLike[str] | None,
        *,
        sample_hz: float,
        print_phases: bool,
        source: str,
        module_depth: int = MODULE_DEPTH,
        module_every: int = MODULE_EVERY,
    ) -> None:
        if not sample_hz > 0:
            raise ValueError(f"sample_hz = {sample_hz!r}: expected a number > 0")
        check_module_options(module_depth, module_every)
        self.module_depth = module_depth
        self.module_every = module_every
        self.out = Path(out) if out is not None else None
        self.sample_hz = float(sample_hz)
        self.print_phases = print_phases
        self.source = source
        self.run_dir: Path | None = None
        self.writer: EventWriter | None = None
        self.probe: Any = None
        self._hooks: list[Any] = []
        self.sampler: Any = None
        self.disabled = False
        self.finished = False
        self.status: str | None = None
        # Where the loop is (step, micro-batch, and the runner's cursor phase names for an OOM record).
        self.step = 0
        self.micro = 0
        self.cursor_phase = "load"
        self._done: set[str] = set()  # phases recorded for the current micro-batch
        self._step_open = False
        self._step_t0 = 0.0
        self._losses: list[torch.Tensor | float] = []
        self._loss_summed = False
        self._samples = 0
        self._tracking: Any = None
        self._printed_upto = 1  # the last step ``_maybe_print`` printed, after steps 0 and 1
        self._failure: tuple[str, BaseException] | None = None
        self._prev_excepthook: Any = None

    # -- life cycle -----------------------------------------------------------------------------
    def start(
        self,
        *,
        name: str,
        model: Any,
        optimizer: Any,
        config: dict[str, Any],
        plan: dict[str, Any],
        integration: dict[str, Any],
        rank: int = 0,
    ) -> Path:
        """Create the run directory and start recording; on failure nothing is left running."""
        try:
            return self._start(name, model, optimizer, config, plan, integration, rank)
        except BaseException:
            if self.sampler is not None:
                self.sampler.stop()
            if self.writer is not None:
                self.writer.write("note", message="blipmon could not start recording this run")
                self.writer.close()
            self.finished = True
            raise

    def _start(
        self,
        name: str,
        model: Any,
        optimizer: Any,
        config: dict[str, Any],
        plan: dict[str, Any],
        integration: dict[str, Any],
        rank: int,
    ) -> Path:
        import blipmon
        from blipmon.runner.allocator import model_cuda_devices
        from blipmon.runner.batch_check import watch_image_placeholders
        from blipmon.runner.environment import environment
        from blipmon.runner.launch import make_run_dir
        from blipmon.runner.probes import PhaseProbe, track_checkpoint_inputs
        from blipmon.runner.sampler import Sampler

        self.run_dir = make_run_dir(config, self.out)
        write_config(self.run_dir, config)
        self.writer = writer = EventWriter(self.run_dir / EVENTS)
        emit = writer.write
        emit(
            "header",
            format_version=FORMAT_VERSION,
            name=name,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            started=time.time(),
            source=self.source,
            blipmon=blipmon.__version__,
        )
        emit("config", config=config)
        device = _device_of(model)
        # Not from the first parameter alone: one accelerate offloaded to the host is on the meta device while
        # the model runs on its GPU, and other parts may sit on other GPUs.
        cuda = (device is not None and device.type == "cuda") or (
            torch.cuda.is_available() and bool(model_cuda_devices(model))
        )
        # The GPU the model trains on (cuda:3 under a launcher that hands out devices), not GPU 0.
        emit("environment", **environment(cuda, device=_cuda_index(device, model) if cuda else 0))
        if cuda:
            from blipmon.runner.child import OOM_OBSERVER

            OOM_OBSERVER.attach(torch)  # exact sizes of a CUDA OOM, as `blipmon run` records them
        emit("integration", rank=rank, **integration)
        trainable = [p for p in model.parameters() if p.requires_grad]
        emit(
            "plan",
            trainable_params=sum(p.numel() for p in trainable),
            total_params=sum(p.numel() for p in model.parameters()),
            **plan,
        )
        cuda_dev = _cuda_index(device, model) if cuda else None
        self.probe = PhaseProbe(
            model,
            emit,
            optimizer=unwrap_optimizer(optimizer),
            rank=rank,
            cuda=cuda,
            cuda_device=cuda_dev,
            module_depth=self.module_depth,
            module_every=self.module_every,
        )
        # Activation checkpointing keeps each checkpointed layer's inputs instead of its saved tensors:
        # count those, as ``blipmon run`` does (a no-op for a model without checkpointing).
        track_checkpoint_inputs(model, self.probe.saved)
        self._hooks = watch_image_placeholders(model, self._note_and_warn)
        # The first boundary's peak covers the run's own interval, not everything before the fit began,
        # on every GPU the model occupies (the same reset ``blipmon run`` does after loading).
        self.probe.start_interval()
        self.sampler = Sampler(
            emit, self.sample_hz, cuda=cuda, cuda_device=cuda_dev or 0, rank=rank,
            cuda_devices=self.probe.devices or None,
        )  # fmt: skip
        self.sampler.start()
        self._prev_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        atexit.register(self._atexit)
        return self.run_dir

    def _note_and_warn(self, text: str) -> None:
        """Something the user should fix in their script: in the run's notes, and on their terminal now."""
        if self.finished:
            return
        if self.writer is not None:
            self.writer.write("note", message=text)
        warnings.warn(f"blipmon: {text}", UserWarning, stacklevel=2)

    def disable(self, reason: str) -> None:
        """Stop probing after an internal failure; the run keeps its steps and ends normally."""
        self._track_close()
        if self.disabled:
            return
        self.disabled = True
        warnings.warn(f"blipmon: phase recording stopped: {reason}", RuntimeWarning, stacklevel=3)
        if self.writer is not None:
            self.writer.write("note", message=f"blipmon stopped recording phases: {reason}"[:2000])

    def finish(self, status: str = "ok", note: str | None = None) -> None:
        """Write the end record once; later calls (atexit after on_train_end, say) do nothing."""
        if self.finished or self.writer is None:
            return
        self.finished = True
        self._track_close()
        for handle in self._hooks:  # a run that ends before its first forward leaves no hook behind
            handle.remove()
        self._hooks = []
        if self.probe is not None:
            self.probe.close()
        if self._failure is not None and status == "ok":
            status = self._failure[0]
        self.status = status
        if note:
            self.writer.write("note", message=note)
        if self.sampler is not None:
            self.sampler.stop()
        self.writer.write("end", status=status, code=run_exit_code(status))
        self.writer.close()
        if sys.excepthook == self._excepthook:
            sys.excepthook = self._prev_excepthook
        atexit.unregister(self._atexit)

    def abandon(self, note: str) -> None:
        """End a run whose loop stopped without saying how (an exception the user caught, say)."""
        self.finish(self._failure[0] if self._failure else "error", note=note)

    def fail(self, exc: BaseException) -> str:
        """Record how the run failed (once per exception) and return the status it ends with."""
        if self._failure is not None and self._failure[1] is exc:
            return self._failure[0]
        if self.writer is None:
            return "error"
        emit = self.writer.write
        message = f"{type(exc).__name__}: {exc}".strip()
        if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "StopRequested":
            status = "stopped"
            emit("note", message=f"stopped by {type(exc).__name__}")
        elif is_oom(exc):
            from blipmon.runner.child import OOM_OBSERVER
            from blipmon.runner.oom import oom_fields

            status = "oom"
            state: dict[str, Any] = {}
            if self.probe is not None and self.probe.cuda:
                from blipmon.runner.allocator import read

                # Summed over every GPU the model occupies, each GPU's own under "devices" when several.
                state = read(self.probe.devices).as_record()
            module_pass = {"forward": "forward", "backward": "backward", "optimizer_step": "optimizer"}.get(
                self.cursor_phase
            )
            module = None
            if module_pass in ("forward", "backward") and self.probe is not None:
                module = self.probe.running_module(exc)  # exc's traceback: fail() may run from sys.excepthook
            emit(
                "oom",
                step=self.step,
                micro_step=self.micro,
                phase=self.cursor_phase,
                message=message[:2000],
                module=module,
                module_pass=module_pass,
                **oom_fields(exc, OOM_OBSERVER if self.probe is not None and self.probe.cuda else None),
                **state,
            )
        else:
            status = "error"
            tb = "".join(traceback.format_exception(exc))
            emit("error", message=message[:2000], traceback=tb[-8000:], phase=self.cursor_phase, step=self.step)
        self._failure = (status, exc)
        return status

    def _excepthook(self, etype: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        try:
            if not self.finished:
                self.finish(self.fail(value))
        finally:
            prev = self._prev_excepthook or sys.__excepthook__
            prev(etype, value, tb)

    def _atexit(self) -> None:
        if not self.finished:
            if self._failure:
                self.finish(self._failure[0])
            else:
                self.finish("stopped", note="the process exited before training ended")

    # -- the loop -------------------------------------------------------------------------------
    @guarded
    def begin_step(self, step: int) -> None:
        self.step = step
        self.micro = 0
        self._done.clear()
        self._losses = []
        self._loss_summed = False
        self._samples = 0
        self._step_open = True
        self.cursor_phase = "forward"
        self._step_t0 = time.perf_counter()

    @property
    def step_open(self) -> bool:
        return self._step_open

    @guarded
    def new_micro(self) -> None:
        """A new micro-batch starts; one abandoned without a backward (a skipped batch) keeps its own index."""
        if self._done:
            self.micro += 1
            self._done.clear()

    @guarded
    def boundary(self, phase: str) -> bool:
        """Measure one phase of the current micro-batch, in order and at most once; False when out of place."""
        if self.probe is None or self.disabled or not self._step_open:
            return False
        if phase == "after_opt_step":
            if "after_opt_step" in self._done:
                return False
            micro = max(self.micro - 1, 0) if "before_fwd" not in self._done else self.micro
            # The state changed in step(): recount it even if the optimizer's step hooks did not fire
            # (a wrapper that bypasses them); PhaseProbe otherwise recounts only after a hooked step.
            mark = getattr(self.probe, "_mark_optim_dirty", None)
            if mark is not None:
                mark()
            rec = self.probe.boundary(phase, self.step, micro)
            self._done.add(phase)
            self.cursor_phase = "forward"
            self._maybe_print(phase, rec)
            return True
        needs = {"before_fwd": None, "after_fwd": "before_fwd", "after_bwd": "after_fwd"}[phase]
        if phase in self._done or (needs is not None and needs not in self._done):
            return False
        rec = self.probe.boundary(phase, self.step, self.micro)
        self.cursor_phase = {"before_fwd": "forward", "after_fwd": "backward", "after_bwd": "backward"}[phase]
        self._maybe_print(phase, rec)
        if phase == "after_bwd":
            self.micro += 1
            self._done.clear()
        else:
            self._done.add(phase)
        return True

    def has(self, phase: str) -> bool:
        return phase in self._done

    @guarded
    def set_phase(self, cursor_phase: str) -> None:
        self.cursor_phase = cursor_phase

    @guarded
    def add_batch(self, samples: int) -> None:
        self._samples += samples

    @guarded
    def add_loss(self, loss: Any, *, part_of_step: bool = False) -> None:
        """Keep the micro-batch loss as a detached tensor: converting it here would sync the GPU every micro-step.

        ``part_of_step``: the loss was already divided by the whole step's token count (the Trainer's
        ``num_items_in_batch``), so the step's loss is the sum of its micro-batches', not their mean.
        """
        self._loss_summed = self._loss_summed or part_of_step
        if isinstance(loss, torch.Tensor):
            if loss.numel() == 1:
                self._losses.append(loss.detach())
        elif isinstance(loss, (int, float)):
            self._losses.append(float(loss))

    @guarded
    def end_step(self) -> None:
        if not self._step_open or self.writer is None:
            return
        self._step_open = False
        losses = [float(x) for x in self._losses]  # one sync per step, before the clock stops
        seconds = time.perf_counter() - self._step_t0
        self.writer.write(
            "step",
            step=self.step,
            seconds=round(seconds, 6),
            loss=(sum(losses) if self._loss_summed else sum(losses) / len(losses)) if losses else None,
            samples_per_s=self._samples / seconds if seconds > 0 and self._samples else None,
            micro_steps=self.micro if self.micro else 1,
        )

    # -- saved-tensor tracking around the forward -------------------------------------------------
    @guarded
    def track_begin(self) -> None:
        """Start counting tensors saved for backward (activations); paired with ``track_end``."""
        if self.probe is None or self.disabled or self._tracking is not None:
            return
        ctx = self.probe.saved.track()
        ctx.__enter__()
        self._tracking = ctx

    def track_end(self) -> None:
        self._track_close()

    def _track_close(self) -> None:
        ctx, self._tracking = self._tracking, None
        if ctx is not None:
            try:
                ctx.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - leaving the hooks installed would be worse than a lost count
                pass

    # -- the lab script's printout ----------------------------------------------------------------
    def _maybe_print(self, phase: str, rec: dict[str, Any]) -> None:
        """The lab's line for each phase of steps 0 and 1, then of the first step counted in full (``counted``) at
        or after every 50th: a line without grads, optimizer state and activations says nothing the lab's did."""
        if not self.print_phases or rec.get("acts") is None:
            return
        if self.step >= 2 and self.step // 50 <= self._printed_upto // 50:
            return
        if phase == "after_opt_step" and self.step >= 2:
            self._printed_upto = self.step
        from blipmon.core.units import fmt_bytes

        def gb(key: str) -> str:
            return fmt_bytes(rec.get(key))

        print(
            f"[blipmon] step {self.step} micro {rec.get('micro_step')} _phase{PHASE_INDEX[phase]}_{phase}: "
            f"Params {gb('params')} | Grads {gb('grads')} | Optim {gb('optim')} | Acts {gb('acts')} | "
            f"Allocated {gb('allocated')} / peak {gb('peak')} | Reserved {gb('reserved')} | Host RSS {gb('host_rss')}",
            flush=True,
        )


def _device_of(model: Any) -> torch.device | None:
    """Where the model runs; a parameter accelerate offloaded (on the meta device) says where its hook runs it."""
    from blipmon.runner.probes import execution_device

    try:
        return execution_device(model)
    except (StopIteration, AttributeError, TypeError):
        return None


def _cuda_index(device: torch.device | None, model: Any) -> int:
    """The GPU the run's inputs go to (the sampler's device); the model's first GPU when that says nothing."""
    if device is not None and device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    from blipmon.runner.allocator import model_cuda_devices

    found = model_cuda_devices(model)
    return found[0] if found else 0


def script_name() -> str:
    """The script being run (``train.py``), for the default run name and the description."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    return Path(argv0).name if argv0 and argv0 != "-c" else "python"


__all__ = [
    "MODULE_DEPTH",
    "MODULE_EVERY",
    "Recorder",
    "batch_size_of",
    "build_config",
    "is_oom",
    "iter_tensors",
    "optim_name",
    "precision_of",
    "safe_name",
    "script_name",
    "unwrap_optimizer",
]
