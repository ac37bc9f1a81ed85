"""``python -m blipmon.runner.fit_process CONFIG.json GPU_BYTES|- HOST_BYTES|-``: a fit in a process of its own.

The launcher's fit view runs the search here, not in a thread: building a model is not thread-safe (accelerate's
and transformers' empty-weight contexts patch ``torch.nn.Module`` for the whole process, and the launcher's
estimate panel builds models in its own thread), and a process of its own never slows the interface, whatever the
search costs. The protocol is JSON lines on stdout, written as they happen:

- ``{"progress": N, "label": "batch 16 x 4 (bf16-mixed)"}`` before each estimate the search makes;
- then exactly one of ``{"result": <blipmon fit --json object>, "assumed_card": bool}`` or ``{"error": "message"}``.

``FitRun`` is the other side: it starts the process, reads its events and stops it (by its own process id) when
the view closes. One module for both sides, so the protocol has one home.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def launcher_gpu_memory(cfg: dict[str, Any], gpu_memory: int | None) -> tuple[int | None, bool]:
    """(GPU capacity to judge against, whether it is an assumed card), as the launcher's estimate panel judges.

    A configuration that runs on a GPU, on a machine without one, with no capacity given and not named for a lab
    card (which ``judge`` already judges against its card) is judged against the seed lab's 80 GB H100.
    """
    if gpu_memory is not None:
        return gpu_memory, False
    from blipmon.core.config import ConfigError
    from blipmon.core.presets import LAB_CARD_BYTES
    from blipmon.estimate.judge import gpu_intended, lab_card
    from blipmon.estimate.timeline import capacity

    if not gpu_intended(cfg) or lab_card(cfg) is not None or cfg["model"]["device_map"] in ("auto", "cpu-first"):
        return None, False
    try:
        capacity("cuda", None)
    except ConfigError:  # no GPU here
        return LAB_CARD_BYTES["h100"], True
    return None, False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m blipmon.runner.fit_process CONFIG.json GPU_BYTES|- HOST_BYTES|-", file=sys.stderr)
        return 2
    gpu = None if args[1] == "-" else int(args[1])
    host = None if args[2] == "-" else int(args[2])
    from blipmon.core.config import ConfigError
    from blipmon.estimate.fit import fit

    try:
        cfg = json.loads(Path(args[0]).read_text(encoding="utf-8"))  # a resolved configuration, read as data
        gpu, assumed = launcher_gpu_memory(cfg, gpu)
        result = fit(
            cfg, gpu_memory=gpu, host_memory=host, progress=lambda n, label: _emit({"progress": n, "label": label})
        )
    except ConfigError as e:
        _emit({"error": str(e)})
        return 0
    except Exception as e:  # noqa: BLE001 - the view shows why, never a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _emit({"error": f"{type(e).__name__}: {first}"})
        return 0
    _emit({"result": result.to_json(), "assumed_card": assumed})
    return 0


class FitRun:
    """A fit running in its own process: ``events()`` yields its JSON lines, ``stop()`` ends it."""

    def __init__(self, cfg: dict[str, Any], gpu_memory: int | None = None, host_memory: int | None = None) -> None:
        fd, name = tempfile.mkstemp(prefix="blipmon-fit-", suffix=".json")
        self._config = Path(name)
        with open(fd, "w", encoding="utf-8") as fh:
            json.dump(cfg, fh)
        cmd = [
            sys.executable,
            "-m",
            "blipmon.runner.fit_process",
            str(self._config),
            "-" if gpu_memory is None else str(gpu_memory),
            "-" if host_memory is None else str(host_memory),
        ]
        # The estimator's library warnings go nowhere: the view shows the events, and the result says what matters.
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def events(self) -> Iterator[dict[str, Any]]:
        """Each event as the worker writes it; ends when the process does (an ``error`` if it died silently)."""
        assert self._proc.stdout is not None
        final = False
        for line in self._proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                final = final or "result" in ev or "error" in ev
                yield ev
        code = self._proc.wait()
        self._cleanup()
        if not final and code is not None and code < 0:
            return  # stopped on purpose: nothing to say
        if not final:
            yield {"error": f"the fit process ended without a result (exit code {code})"}

    def stop(self) -> None:
        """End the process if it still runs (this object's own child, by its id), and remove its config file."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        try:
            self._config.unlink()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
