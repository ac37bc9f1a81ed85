"""``blipmon fit`` on the seed lab: every out-of-memory row gets suggestions that fit, among them the change the lab
made next, and the largest batch is exact on every ``h100/*`` and ``a100/*`` preset.

Real-size models on the meta device and fake tensors, no GPU (each preset is judged against its lab card, as ``fit``
and ``estimate`` do on a machine without one). The tests share this process's estimator caches, so the presets that
use the same model, batch and precision reuse each other's traced steps. "Exact" is checked independently of the
search: ``judge`` (what ``blipmon estimate`` says) at the largest batch fits, at one more it does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blipmon import cli
from blipmon.core import presets
from blipmon.core.config import get, resolve
from blipmon.core.presets import LAB_CARD_BYTES
from blipmon.core.sweep import expand
from blipmon.estimate import timeline
from blipmon.estimate.fit import TIGHT_FRACTION, fit
from blipmon.estimate.judge import judge

OOM_ROWS = [f"{card}/{row}" for card in ("h100", "a100") for row in ("baseline", "flan-t5-xxl", "flan-t5-xxl-bs1")]


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


_RESULTS: dict[str, Any] = {}


def fitted(name: str) -> Any:
    if name not in _RESULTS:
        _RESULTS[name] = fit(resolve(name), deepspeed=True)
    return _RESULTS[name]


def only(s: Any, *keys: str) -> bool:
    return set(s.changes) <= set(keys)


def lab_next(name: str, s: Any) -> str | None:
    """Which of the lab's next steps a suggestion is (None: not one the lab took)."""
    c = s.changes
    row = name.split("/", 1)[1]
    if row == "baseline":
        # The lab's next row: the same model with a smaller batch (16), then accumulation keeping the effective batch.
        if only(s, "train.batch_size", "train.accumulate_grad_batches") and c["train.batch_size"] < 64:
            return "reduced batch"
        return None
    optim = c.get("train.optim")
    if optim == "sgd" and only(s, "train.optim"):
        return "sgd"
    configured = presets.get(name)["train"]["batch_size"]
    small = c.get("train.batch_size", configured) < configured or configured == 1  # the lab's: 2 x 2 (bs1: 1)
    eight_bit = optim in ("adam_8bit", "paged_adamw_8bit")
    if eight_bit and small and only(s, "train.optim", "train.batch_size", "train.accumulate_grad_batches"):
        return "8-bit optimizer, small batch"
    if c.get("train.strategy") == "deepspeed_stage_2_offload":
        return "offload"
    if c.get("train.lora.enabled") or c.get("train.qlora"):
        return "lora/qlora"
    return None


@pytest.mark.parametrize("name", OOM_ROWS)
def test_every_oom_row_gets_fitting_suggestions_with_the_labs_next_step(name: str) -> None:
    card = name.split("/")[0]
    r = fitted(name)
    assert r.verdict == "oom"
    assert r.capacity_bytes == LAB_CARD_BYTES[card]
    assert r.margin_bytes == int(LAB_CARD_BYTES[card] * TIGHT_FRACTION)
    fits = [s for s in r.suggestions if s.verdict == "fits"]
    assert fits and all(s.headroom_bytes >= r.margin_bytes for s in fits)
    steps = {lab_next(name, s) for s in fits} - {None}
    if name.endswith("/baseline"):
        assert steps == {"reduced batch"}
        # The lab's own reduced batch (16) fits too: at most the largest batch.
        assert r.max_batch_size is not None and r.max_batch_size >= 16
        kept = next(s for s in fits if s.changes.get("train.accumulate_grad_batches"))
        assert kept.effective_batch == {"h100": 64, "a100": 32}[card]  # accumulation keeps the lab's batch
    else:
        assert steps == {"sgd", "8-bit optimizer, small batch", "offload", "lora/qlora"}
        assert r.max_batch_size is None  # AdamW's state alone is over the card: no batch fits
    # Ranked: every "fits" before any "tight"; singles before combinations among the fits.
    verdicts = [s.verdict for s in r.suggestions]
    assert verdicts == sorted(verdicts, key=lambda v: v != "fits")
    sizes = [len(s.knobs) for s in fits]
    assert sizes == sorted(sizes)


@pytest.mark.parametrize("name", ["h100/baseline", "h100/flan-t5-xxl"])
def test_suggestions_give_the_same_peak_and_verdict_through_blipmon_estimate(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    r = fitted(name)
    picked = [r.suggestions[0], r.suggestions[-1]] + [s for s in r.suggestions if "batch" in s.knobs][:1]
    for s in picked:
        argv = ["estimate", name, "--json"]
        for k, v in s.changes.items():
            argv += ["--set", f"{k}={json.dumps(v)}"]
        assert cli.main(argv) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["peak_bytes"] == s.peak_bytes
        assert data["verdict"] == ("fits" if s.verdict in ("fits", "tight") else "oom")
        assert data["gpu_memory_bytes"] == r.capacity_bytes


# The out-of-memory rows (their fits are made above) and one fitting row of each kind: OPT-2.7B fp32 with
# accumulation, OPT-2.7B bf16-true, OPT-6.7B on the A100, FLAN-T5-XXL QLoRA. `benchmarks/fit_speed.py --check`
# holds all 30 presets to the same rule in one run.
EXACT = [*OOM_ROWS, "h100/grad-accum", "h100/bf16-true", "a100/opt-6.7b", "h100/qlora"]


@pytest.mark.parametrize("name", EXACT)
def test_largest_batch_is_exact(name: str) -> None:
    """At the largest batch ``judge`` (``blipmon estimate``'s verdict) says fits, at one more it says oom."""
    cfg = resolve(name)
    r = fitted(name)
    m = r.max_batch_size
    if m is None:
        assert judge(resolve(name, ["train.batch_size=1"])).verdict == "oom"
        return
    assert judge(resolve(name, [f"train.batch_size={m}"])).verdict == "fits"
    assert m < cfg["train"]["num_train_samples"]  # not bounded by the data set
    assert judge(resolve(name, [f"train.batch_size={m + 1}"])).verdict == "oom"
    assert (m >= cfg["train"]["batch_size"]) == (r.verdict != "oom")
    assert r.max_batch_note == ""


def test_fit_sweep_writes_the_suggestions_blipmon_sweep_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = fitted("h100/flan-t5-xxl")
    out = tmp_path / "fit"
    assert cli.main(["fit", "h100/flan-t5-xxl", "--sweep", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"sweep    {len(r.suggestions)} configurations written to {out}, best first" in text
    assert text.endswith(f"  blipmon sweep {out}\n")
    entries = expand([str(out)])
    assert [e.cfg["name"] for e in entries] == [
        f"h100/flan-t5-xxl-fit{i:02d}" for i in range(1, len(r.suggestions) + 1)
    ]
    for entry, s in zip(entries, r.suggestions, strict=True):
        applied = {k: get(entry.cfg, k) for k in s.changes}
        assert applied == s.changes
        assert judge(entry.cfg).peak_bytes == s.peak_bytes  # the file is the configuration fit judged
