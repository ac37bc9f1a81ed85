"""Fixtures for the dashboard tests: recorded runs, a synthetic GPU run that ends in OOM, a frozen clock.

- ``cpu_run``: a real ``tiny/blip2-opt`` run recorded on a CPU (tests/ui/data/tiny-cpu), copied.
- ``gpu_run``: a deterministic CUDA-shaped run (allocator figures, NVML device used, an H100's
  capacity) that runs out of memory at step 4 (see ``ui_helpers.gpu_events``).
- ``clock``: a clock that only moves when told, for snapshots that must not depend on the time.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from rank_helpers import TINY_DDP, ddp_gpu_events  # noqa: E402
from ui_helpers import DATA, FrozenClock, gpu_events, write_run  # noqa: E402


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def cpu_run(tmp_path: Path) -> Path:
    dst = tmp_path / "profiles" / "20261123T123615-tiny-blip2-opt"
    shutil.copytree(DATA / "tiny-cpu", dst)
    return dst


@pytest.fixture
def gpu_run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "profiles" / "20261123T130000-h100-reduced-batch", gpu_events())


@pytest.fixture
def snapshot_update() -> bool:
    """Set BLIPMON_SNAPSHOT_UPDATE=1 to rewrite the text snapshots after checking a change by eye."""
    return os.environ.get("BLIPMON_SNAPSHOT_UPDATE") == "1"


@pytest.fixture
def tiny_ddp(tmp_path: Path) -> Path:
    """A real 2-rank DDP run of ``tiny/blip2-opt`` recorded on a CPU (tests/ui/data/tiny-ddp), copied."""
    dst = tmp_path / "profiles" / "20261123T150234-tiny-blip2-opt"
    shutil.copytree(TINY_DDP, dst)
    return dst


@pytest.fixture
def ddp_gpu(tmp_path: Path) -> Path:
    """A synthetic 2-rank GPU run whose ranks differ (see ``rank_helpers.ddp_gpu_events``)."""
    return write_run(tmp_path / "profiles" / "20261123T160000-h100-ddp", ddp_gpu_events())
