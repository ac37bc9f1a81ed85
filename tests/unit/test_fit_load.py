"""``fit`` for load and generate jobs: the loading seeds' knobs (16-bit, 8-bit and 4-bit weights, an ``auto`` map),
the training knobs left out with a reason, and no batch for a load job.

Every figure is ``judge``'s (``blipmon estimate``'s) for the same configuration, checked here independently.
"""

from __future__ import annotations

import pytest

from blipmon.core.config import resolve
from blipmon.estimate import timeline
from blipmon.estimate.fit import fit
from blipmon.estimate.judge import judge

GIB = 1024**3


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


def test_a_load_job_gets_weight_knobs_and_its_training_knobs_are_skipped_with_a_reason() -> None:
    r = fit(resolve("load/cpu-first"), gpu_memory=16 * GIB)
    assert r.verdict == "oom" and r.max_batch_size is None and r.max_batch_note == "a load job has no batch"
    assert [s.changes for s in r.suggestions] == [{"model.quantization": "4bit-nf4"}]  # 8-bit and auto stay over
    expected = judge(resolve("load/cpu-first", ["model.quantization=4bit-nf4"]), gpu_memory=16 * GIB)
    assert (r.suggestions[0].peak_bytes, r.suggestions[0].headroom_bytes) == (
        expected.peak_bytes,
        expected.headroom_bytes,
    )
    assert r.suggestions[0].effective_batch == 0
    skipped = {tuple(s.changes): s.reason for s in r.skipped}
    assert skipped[("train.lora.enabled",)] == "job.kind = 'load': nothing is trained, so training knobs do not apply"


def test_a_generate_job_that_no_batch_fits_gets_quantized_weights() -> None:
    r = fit(resolve("load/fp16-gpu"), gpu_memory=8 * GIB)
    assert r.verdict == "oom" and r.max_batch_size is None  # fp16 weights and the GPU overheads alone are over
    assert [s.changes for s in r.suggestions] == [{"model.quantization": "8bit"}, {"model.quantization": "4bit-nf4"}]
    for s in r.suggestions:
        j = judge(
            resolve("load/fp16-gpu", [f"model.quantization={s.changes['model.quantization']}"]), gpu_memory=8 * GIB
        )
        assert (s.verdict, s.peak_bytes) == ("fits", j.peak_bytes)
