"""Fixtures for the dashboard tests: whether to rewrite snapshots (the recorded runs: tests/conftest.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def snapshot_update() -> bool:
    """Set BLIPMON_SNAPSHOT_UPDATE=1 to rewrite the text snapshots after checking a change by eye."""
    return os.environ.get("BLIPMON_SNAPSHOT_UPDATE") == "1"
