"""``runtime.alloc_conf`` reaches the child under both names torch has used, and the run records what was in effect.

Newer torch reads ``PYTORCH_ALLOC_CONF`` (and deprecates ``PYTORCH_CUDA_ALLOC_CONF``), older torch only the
CUDA name; the environment record keeps both variables as the child saw them and torch's own parse of them.
"""

from __future__ import annotations

from typing import Any

import pytest

SETTING = "max_split_size_mb:128"  # the setting of seed 000's CPU-first load (load/* presets)


@pytest.mark.slow
def test_both_variables_reach_the_child_and_the_settings_in_effect_are_recorded(start_run: Any) -> None:
    rp = start_run("tiny/blip2-opt", f"runtime.alloc_conf={SETTING}", "job.kind=load",
                   env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})  # fmt: skip
    done = rp.finish()
    assert done.returncode == 0, rp.describe()
    env = done.run().environment
    # The configuration wins over a stale shell variable, under both names.
    assert env["allocator_settings"] == {"PYTORCH_ALLOC_CONF": SETTING, "PYTORCH_CUDA_ALLOC_CONF": SETTING,
                                         "torch": SETTING}  # fmt: skip


@pytest.mark.slow
def test_without_alloc_conf_the_user_s_own_setting_is_kept_and_recorded(start_run: Any) -> None:
    rp = start_run("tiny/blip2-opt", "job.kind=load", env={"PYTORCH_ALLOC_CONF": "max_split_size_mb:64"})
    done = rp.finish()
    assert done.returncode == 0, rp.describe()
    env = done.run().environment
    assert env["allocator_settings"]["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:64"
    assert env["allocator_settings"]["torch"] == "max_split_size_mb:64"
