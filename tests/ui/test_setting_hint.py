"""An empty string setting is shown empty in the launcher (issue 20, last bullet).

``runtime.alloc_conf`` is ``""`` in most presets; the field showed its placeholder, the words "a
string", which read as the value. Fields now have no placeholder: an empty setting shows nothing,
and what a field takes is said under the settings box while the field has focus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.containers import VerticalScroll
from textual.widgets import Input
from ui_helpers import drive, screen_text

from blipmon.core import config, presets
from blipmon.core.config_form import setting_hint
from blipmon.ui.app import BlipmonApp
from blipmon.ui.launcher import LauncherScreen


def test_the_hint_says_what_a_setting_takes(tmp_path: Path) -> None:
    assert setting_hint("runtime.alloc_conf") == (
        "runtime.alloc_conf: a string — PYTORCH_CUDA_ALLOC_CONF for the child, e.g. max_split_size_mb:128; "
        "empty = PyTorch's default"
    )
    assert setting_hint("train.optim").startswith("train.optim: one of 'adamw', 'sgd'")


def test_an_empty_alloc_conf_is_shown_empty_and_its_hint_under_the_box(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert config.validate(presets.get("tiny/blip2-opt"))["runtime"]["alloc_conf"] == ""
    monkeypatch.chdir(tmp_path)
    app = BlipmonApp(LauncherScreen(tmp_path / "profiles"))

    async def script(pilot: Any) -> None:
        field = pilot.app.screen.query_one("#set-runtime--alloc_conf", Input)
        assert field.value == "" and field.placeholder == ""
        field.focus()
        await pilot.pause()
        row = next(ln for ln in screen_text(pilot.app).splitlines() if "runtime.alloc_conf  " in ln)
        assert row.split("runtime.alloc_conf", 1)[1].strip(" │") == ""  # nothing in the field
        box = pilot.app.screen.query_one("#settings", VerticalScroll)
        assert box.border_subtitle == setting_hint("runtime.alloc_conf")
        assert "PYTORCH_CUDA_ALLOC_CONF" in screen_text(pilot.app)  # the hint, on the box's border
        pilot.app.screen.query_one("#configs").focus()
        await pilot.pause()
        assert box.border_subtitle is None

    drive(app, script, size=(160, 50))
