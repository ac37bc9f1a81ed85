"""A Ctrl-C between ``blipmon run``'s child starting and the parent's wait is a stopped run, waited for.

Found by tests/integration/test_early_stop_signals.py under load: the KeyboardInterrupt landed after
``Launch.start`` had restored Python's SIGINT handler and before ``Launch.wait`` (which handles it) began, so the
parent said "interrupted before the run started" and exited while its child was still recording the stop.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blipmon.commands import run as run_command
from blipmon.core.outcomes import EXIT_STOPPED


class _Launch:
    """Stands in for ``runner.launch.Launch``: a started child that stops with ``blipmon run``'s code 4."""

    calls: list[str] = []

    def __init__(self, cfg: dict[str, Any], out: Path | None) -> None:
        self.run_dir = Path(out or ".") / "run"

    def start(self) -> None:
        self.calls.append("start")

    def stop(self, *_args: Any) -> None:
        self.calls.append("stop")

    def wait(self) -> int:
        self.calls.append("wait")
        return EXIT_STOPPED


@contextlib.contextmanager
def _interrupted(_launch: Any) -> Iterator[None]:
    raise KeyboardInterrupt  # the Ctrl-C arrives as the parent sets up its wait
    yield  # pragma: no cover


def test_a_ctrl_c_before_the_wait_stops_the_child_and_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _Launch.calls = []
    monkeypatch.setattr("blipmon.runner.launch.Launch", _Launch)
    monkeypatch.setattr("blipmon.runner.launch.stop_signals_forwarded_to", _interrupted)
    monkeypatch.setattr("blipmon.runner.preflight.preflight", lambda cfg: None)
    args = argparse.Namespace(config="tiny/blip2-opt", overrides=[], out=tmp_path, live=False)
    assert run_command.run(args) == EXIT_STOPPED
    assert _Launch.calls == ["start", "stop", "wait"]
    assert capsys.readouterr().out.strip() == str(tmp_path / "run")  # the run directory, as after any run
