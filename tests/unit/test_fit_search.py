"""The fit advisor's search and knobs without a model: ``fit_search`` against memory laws written out by hand.

Each test gives the ``Probe`` a judge whose memory is a known function of the batch (a constant optimizer-step
peak, a backward growing per sample, GPU overheads in steps), and holds the search's answer to a brute-force
scan of the same function: the exact largest batch, found with a handful of questions.
"""

from __future__ import annotations

from typing import Any

import pytest

from blipmon.core.config import resolve
from blipmon.estimate import fit_knobs
from blipmon.estimate.fit_search import Probe, describe_changes, largest_batch, largest_of, nested, predict

CAP = 2000


def law(b: int, *, per_sample: int = 37, fixed: int = 1000, step: int = 3) -> tuple[int, int, int]:
    """(optimizer-step total, backward total, runtime) at batch ``b``: a lab-like shape with overheads in steps."""
    return fixed, 200 + per_sample * b, 50 + step * (b // 10)


def law_judge(*, split: bool = False, **kw: Any) -> tuple[Any, list[int]]:
    """A judge following ``law``; ``split`` also says which part of each interval grows with the batch."""
    asked: list[int] = []

    def judge(cfg: dict[str, Any]) -> dict[str, Any]:
        b = cfg["train"]["batch_size"]
        asked.append(b)
        opt, bwd, rt = law(b, **kw)
        peak = max(opt, bwd)
        head = CAP - rt - peak
        return {
            "verdict": "fits" if head >= 0 else "oom",
            "peak_bytes": peak,
            "headroom_bytes": head,
            "capacity_bytes": CAP,
            "phase_totals": (opt, bwd),
            "runtime_bytes": rt,
            "phase_fixed": (opt, 200) if split else (),
            "phase_names": ("after_opt_step", "after_bwd") if split else (),
        }

    return judge, asked


def brute(threshold: int = 0, limit: int = 512, **kw: Any) -> int | None:
    best = None
    for b in range(1, limit + 1):
        opt, bwd, rt = law(b, **kw)
        if CAP - rt - max(opt, bwd) >= threshold:
            best = b
    return best


def cfg(batch: int = 64) -> dict[str, Any]:
    return resolve("tiny/blip2-opt", [f"train.batch_size={batch}", "train.num_train_samples=512"])


@pytest.mark.parametrize("start", [64, 1, 40, 45])
def test_largest_batch_is_the_brute_force_answer_in_a_few_questions(start: int) -> None:
    judge, asked = law_judge()
    probe = Probe(cfg(start), judge)
    got = largest_batch(probe, {}, start=start, limit=512)
    # max(1000, 200 + 37 b) + 50 + 3 (b // 10) <= 2000: 46 -> 1902 + 50 + 12 = 1964; 47 -> 1939 + 50 + 12 = 2001
    assert got == brute() == 46
    assert len(asked) == len(set(asked))  # nothing asked twice
    assert len(asked) <= 5  # the lines through two estimates land on the boundary; a bisection would ask 9


@pytest.mark.parametrize("start", [64, 16])
def test_one_estimate_scaled_guesses_the_boundary(start: int) -> None:
    """With the batch-dependent part known, one estimate predicts the boundary: verified by its two neighbours."""
    judge, asked = law_judge(split=True)
    assert largest_batch(Probe(cfg(start), judge), {}, start=start, limit=512) == 46
    assert sorted(asked) == sorted([start, 46, 47])


def test_threshold_and_the_data_set_limit() -> None:
    judge, _ = law_judge()
    probe = Probe(cfg(64), judge)
    assert (
        largest_batch(probe, {}, start=64, limit=512, threshold=100) == brute(threshold=100) == 44
    )  # 44 -> 1890, 45 -> 1927 (<= 1900)
    judge2, _ = law_judge(per_sample=1)
    probe2 = Probe(cfg(16), judge2)
    # Everything fits up to the data set's 40 samples: the answer is the limit (41 is not a valid configuration).
    assert largest_batch(probe2, {}, start=16, limit=40) == 40


def test_none_when_not_even_one_fits() -> None:
    judge, asked = law_judge(fixed=1990)
    probe = Probe(cfg(8), judge)
    assert largest_batch(probe, {}, start=8, limit=512) is None
    assert sorted(asked) == [1, 8]


def test_a_flat_law_goes_to_the_limit_and_a_steep_one_down_to_one() -> None:
    judge, _ = law_judge(per_sample=0, step=0)
    assert largest_batch(Probe(cfg(8), judge), {}, start=8, limit=300) == 300
    judge, _ = law_judge(per_sample=1700, fixed=0, step=0)  # 200 + 1700 + 50 = 1950 at 1; 3650 at 2
    assert largest_batch(Probe(cfg(8), judge), {}, start=8, limit=300) == 1


def test_predict_takes_the_first_interval_to_cross() -> None:
    judge, _ = law_judge(step=0)
    probe = Probe(cfg(64), judge)
    pts = {b: probe.outcome({"train.batch_size": b}) for b in (1, 64)}
    # backward: 200 + 37 b + 50 <= 2000 -> b <= 47.29; the optimizer step (1050) never crosses
    assert predict(pts, 1, 64, 0) == 47
    assert predict(pts, 1, 64, 100) == 44  # 1900 - 250 = 1650 / 37 = 44.6


def test_largest_of_with_and_without_a_guess() -> None:
    divisors = [1, 2, 4, 8, 16, 32]
    asked: list[int] = []

    def ok(x: int) -> bool:
        asked.append(x)
        return x <= 12

    assert largest_of(divisors, ok, guess=12) == 8
    assert asked == [8, 16]
    asked.clear()
    assert largest_of(divisors, ok) == 8
    assert asked == [1, 8, 16]  # the smallest (if it does not fit, none does), then halves
    assert largest_of(divisors, lambda x: False) is None
    assert largest_of([], ok) is None


def test_probe_asks_each_configuration_once_and_keeps_errors_as_reasons() -> None:
    judge, asked = law_judge()
    probe = Probe(cfg(64), judge)
    probe.outcome({"train.batch_size": 64})  # the configured batch: the same as no change
    probe.outcome({})
    assert asked == [64] and probe.estimates == 1
    bad = probe.outcome({"train.optim": "deepspeed_cpu"})  # without the DeepSpeed strategy: refused by validation
    assert bad.error is not None and "train.strategy" in bad.error and not bad.ok
    assert asked == [64]  # never estimated


def test_nested_and_described_changes() -> None:
    changes = {"train.lora.enabled": True, "train.batch_size": 16}
    assert nested(changes) == {"train": {"lora": {"enabled": True}, "batch_size": 16}}
    assert describe_changes(changes) == "train.lora.enabled=true, train.batch_size=16"
    assert describe_changes({}) == "as configured"


def test_knobs_of_a_full_fp32_fine_tune() -> None:
    knobs = fit_knobs.moves_for(cfg(), deepspeed=True)
    assert [m.name for m in knobs.moves] == [
        "bf16-mixed",
        "bf16-true",
        "sgd",
        "adam_8bit",
        "paged_adamw_8bit",
        "offload",
        "act_ckpt",
        "lora",
        "qlora",
    ]
    assert knobs.skipped == []
    offload = next(m for m in knobs.moves if m.name == "offload")
    assert offload.changes == {"train.optim": "deepspeed_cpu", "train.strategy": "deepspeed_stage_2_offload"}
    assert "a third more compute" in next(m for m in knobs.moves if m.name == "act_ckpt").note


def test_knobs_that_cannot_apply_are_skipped_with_a_reason() -> None:
    no_ds = fit_knobs.moves_for(cfg(), deepspeed=False)
    assert "offload" not in [m.name for m in no_ds.moves]
    assert [s.changes for s in no_ds.skipped] == [fit_knobs.OFFLOAD]
    assert "DeepSpeed is not installed" in no_ds.skipped[0].reason

    load = fit_knobs.moves_for(resolve("load/fp16-gpu"), deepspeed=True)  # fp16 weights, all on the GPU
    assert [m.changes for m in load.moves] == [
        {"model.quantization": "8bit"},
        {"model.quantization": "4bit-nf4"},
        {"model.device_map": "auto"},
    ]
    assert {"train.lora.enabled": True} in [s.changes for s in load.skipped]
    assert all("nothing is trained" in s.reason for s in load.skipped)

    eight = resolve(
        "tiny/blip2-opt", ["model.quantization=8bit", "train.lora.enabled=true", "train.precision=bf16-true"]
    )
    knobs = fit_knobs.moves_for(eight, deepspeed=True)
    names = [m.name for m in knobs.moves]
    assert "qlora" not in names and "lora" not in names and "bf16-true" not in names
    assert any(s.changes == {"train.qlora": True} and "8bit" in s.reason for s in knobs.skipped)


def test_notes_say_when_the_effective_batch_is_kept() -> None:
    assert "keeps the effective batch of 64" in fit_knobs.accumulate_note(16, 4, 64, 64)
    changed = fit_knobs.accumulate_note(25, 1, 25, 64)
    assert "cannot keep the effective batch" in changed and "from 64 to 25" in changed
