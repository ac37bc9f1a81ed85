"""A Ctrl-C while a sweep's child is being started stops the sweep, not only that child.

``Launch.start`` handles that Ctrl-C itself (it stops the child, which records the stop), so no
KeyboardInterrupt reaches the sweep loop: the sweep must read ``launch.interrupted``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import blipmon.runner.launch as launch_mod
from blipmon.core import config
from blipmon.core import sweep as sweep_data
from blipmon.runner import sweep


class _StartedThenInterrupted:
    def __init__(self, cfg: dict[str, Any], out: Path) -> None:
        self.run_dir = out / "run"
        self.run_dir.mkdir(parents=True)
        (self.run_dir / "events.jsonl").write_text("")
        self.interrupted = False

    def start(self) -> None:
        self.interrupted = True  # what Launch does on a Ctrl-C during start: the child is stopped

    def poll(self) -> int:
        return 4

    def exit_code(self) -> int:
        return 4


class _Quiet(sweep.Progress):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def started(self, *a: Any) -> None: ...
    def update(self, *a: Any) -> None: ...
    def finished(self, *a: Any) -> None: ...

    def note(self, text: str) -> None:
        self.notes.append(text)


def test_a_ctrl_c_while_starting_ends_the_sweep(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(launch_mod, "Launch", _StartedThenInterrupted)
    e = sweep_data.Entry("tiny/blip2-opt", config.resolve("tiny/blip2-opt"))
    progress = _Quiet()
    assert sweep._run_one(0, e, tmp_path, progress, 2) is False
    assert e.status == "stopped"
    assert any("rest of the sweep is skipped" in n for n in progress.notes)
