"""The command line's own messages: untrusted text made visible, `attach` on a run not written yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from blipmon import cli


def test_attach_on_a_run_whose_events_are_still_empty_waits_for_it(tmp_path: Path, monkeypatch: Any) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_text("")
    seen: list[Path] = []

    import blipmon.ui.app as app

    monkeypatch.setattr(app, "run_attach", lambda p: seen.append(p) or 0)
    assert cli.main(["attach", str(run)]) == 0
    assert seen == [run]


def test_replay_of_an_empty_run_is_still_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_text("")
    assert cli.main(["replay", str(run)]) == 2
    assert "blipmon:" in capsys.readouterr().err


def test_an_error_quoting_a_hostile_path_prints_no_escape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x\x1b]0;TITLE\x07\x1b[2J"
    bad.mkdir()
    assert cli.main(["show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert "blipmon:" in err


def test_ctrl_c_before_the_run_starts_exits_4_without_a_traceback(
    monkeypatch: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while the configuration is resolved: `run`'s code for a stopped run, one line, nothing recorded."""
    import blipmon.core.config as config

    def interrupted(*_a: Any, **_k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(config, "resolve", interrupted)
    assert cli.main(["run", "tiny/blip2-opt"]) == 4
    err = capsys.readouterr().err
    assert "interrupted before the run started" in err and "Traceback" not in err
