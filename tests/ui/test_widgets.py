"""Widgets read through their pure line builders and through ``render_line``, as Textual calls it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from recorded import FrozenClock, gpu_events, write_run
from textual.app import App, ComposeResult

from blipmon.core.replay import ReplaySource
from blipmon.core.snapshot import Snapshot
from blipmon.runner.follow import FileFollowSource
from blipmon.ui.widgets.phase_bars import PhaseBars, phase_bar_lines
from blipmon.ui.widgets.run_header import banner_text, device_text, header_lines
from blipmon.ui.widgets.steps import step_lines
from blipmon.ui.widgets.timeline import TimelineChart, timeline_lines


def _snap(path: Path) -> Snapshot:
    return FileFollowSource(path).poll()


def test_timeline_has_legend_axis_capacity_phase_strip_and_time_labels(gpu_run: Path) -> None:
    rows = [s.text for s in timeline_lines(_snap(gpu_run), 120, 16)]
    assert len(rows) == 16
    assert rows[0].startswith("memory ") and "GPU 80.00 GiB" in rows[0] and "allocated" in rows[0]
    assert rows[1].lstrip().startswith("80G ┤")  # the axis reaches the GPU's capacity
    assert "⠉" in rows[1]  # ... where its line is drawn
    assert rows[-2].startswith("phase ") and "━" in rows[-2] and "┃" in rows[-2]
    assert "0s" in rows[-1] and "10s" in rows[-1]
    assert any("⣿" in r or "⡇" in r or "⢸" in r for r in rows[2:-2])


def test_timeline_keeps_the_peak_of_a_million_samples(tmp_path: Path) -> None:
    import numpy as np

    snap = _snap(write_run(tmp_path / "r", gpu_events(steps=2, oom_step=None)))
    n = 1_000_000
    t = np.linspace(0, 1000, n)
    alloc = np.full(n, 10.0 * 2**30)
    alloc[777_777] = 79.0 * 2**30  # one sample, 79 GiB
    nan = np.full(n, np.nan)
    big = Snapshot(**{**snap.__dict__, "samples": {"t": t, "alloc": alloc, "res": nan, "dev": nan, "rss": nan},
                      "phases": (), "now": 1000.0})  # fmt: skip
    rows = [s.text for s in timeline_lines(big, 100, 12)]
    top_plot_row = rows[1]
    assert any(ch != " " for ch in top_plot_row[7:])  # the spike reaches the top row


def test_cpu_timeline_says_why_there_is_no_gpu(cpu_run: Path) -> None:
    rows = [s.text for s in timeline_lines(_snap(cpu_run), 140, 10)]
    assert "host RSS" in rows[0] and "no NVIDIA GPU: no NVIDIA GPU visible to torch" in rows[0]
    assert "GPU 80" not in rows[0]


def test_phase_bars_stack_categories_with_peaks(gpu_run: Path) -> None:
    snap = _snap(gpu_run)
    rows = [s.text for s in phase_bar_lines(snap.latest_step(), snap.step_peaks(), 80, 6)]
    assert rows[0].startswith("phases (step 3)") and "params" in rows[0] and "acts" in rows[0]
    assert [r.split()[0] + " " + r.split()[1] for r in rows[1:]] == [
        "before fwd",
        "after fwd",
        "after bwd",
        "after opt",
    ]
    assert all("█" in r and "GiB" in r and "▲" in r for r in rows[1:])
    assert phase_bar_lines([], {}, 40, 3)[1].text.strip().startswith("waiting for the first step")


def test_phase_bars_say_when_they_show_the_newest_step_counted_in_full_not_the_newest(gpu_run: Path) -> None:
    snap = _snap(gpu_run)
    latest = snap.latest_step()
    assert snap.newest_complete_step() == 3  # every step of this recording is counted: no word about it
    bars = PhaseBars()
    bars.show(snap)
    assert bars.build(100, 6)[0].text.startswith("phases (step 3) ")
    title = phase_bar_lines(latest, snap.step_peaks(), 100, 6, newest=7)[0].text
    assert title.startswith("phases (step 3, the newest counted in full)")
    assert phase_bar_lines(latest, snap.step_peaks(), 100, 6, newest=3)[0].text.startswith("phases (step 3) ")


def test_step_charts(gpu_run: Path) -> None:
    snap = _snap(gpu_run)
    rows = [s.text for s in step_lines(snap.steps, 60, 5)]
    assert rows[0].startswith("step time 2.00 s") and "loss 6.1000" in rows[0]
    assert len(rows) == 5 and any(ch != " " for ch in "".join(rows[1:]))
    assert "no steps yet" in step_lines((), 40, 3)[1].text


def test_header_and_banner(gpu_run: Path, clock: FrozenClock) -> None:
    src = ReplaySource(gpu_run, clock=clock, background=False)
    src.seek_to(8.0)
    snap = src.poll()
    line1, line2 = (s.text for s in header_lines(snap, 160))
    assert "h100/reduced-batch" in line1 and "running" in line1 and "[replay]" in line1
    assert "GPU NVIDIA H100 80GB HBM3 (80.00 GiB)" in line1
    assert line2.startswith("▶ 1×") and "step 2/6" in line2 and "ETA" in line2 and "peak alloc" in line2
    assert banner_text(snap) is None
    src.seek_fraction(1.0)
    assert banner_text(src.poll()) == "OUT OF MEMORY at step 4, phase after_fwd, trying to allocate 20.00 GiB"
    assert device_text({}).startswith("device: waiting")
    assert device_text({"device": "cpu", "gpu_reason": "x"}) == "CPU · no NVIDIA GPU"


def test_timeline_through_render_line(gpu_run: Path) -> None:
    snap = _snap(gpu_run)

    class One(App[None]):
        def compose(self) -> ComposeResult:
            yield TimelineChart()

    async def main() -> list[str]:
        app = One()
        async with app.run_test(size=(90, 14)) as pilot:
            chart = app.query_one(TimelineChart)
            chart.show(snap)
            await pilot.pause()
            return [chart.render_line(y).text for y in range(chart.size.height)]

    lines = asyncio.run(main())
    assert lines[0].startswith("memory") or lines[0].startswith("━GPU")
    assert lines == [s.text for s in timeline_lines(snap, 90, 14)][: len(lines)]


def test_run_notes_come_first_in_the_log_pane(gpu_run: Path) -> None:
    """What blipmon noticed about the run (a batch without image placeholders, say) is shown, not only saved."""
    from blipmon.ui.live import log_lines

    snap = _snap(gpu_run)
    noted = Snapshot(**{**snap.__dict__, "notes": ("BLIP-2 batch without image placeholder tokens",), "log": ("x",)})
    assert log_lines(noted) == ("blipmon note: BLIP-2 batch without image placeholder tokens", "x")


def test_without_a_gpu_the_launcher_judges_against_the_labs_card_as_torch_reports_it() -> None:
    """An "80 GB" H100 holds 79.11 GiB: a verdict against 80 GiB would pass configurations the lab's card fails."""
    from blipmon.core.config import resolve
    from blipmon.ui.widgets.estimate import LAB_CARD, estimate_lines

    assert LAB_CARD < 80 * 2**30
    text = estimate_lines(resolve("tiny/blip2-opt", ["model.device_map=cuda"]))
    assert text.startswith("estimate: FITS — peak "), text
    assert "\n" not in text  # a training run on one GPU: one line
    assert "on cuda:0 against an 80 GB card, 79.11 GiB (no GPU here)" in text


def test_the_launcher_judges_as_blipmon_estimate_does_with_every_device_of_a_load() -> None:
    """A load job is estimated too (issue 13), each device on its own line, as ``blipmon estimate`` prints it."""
    from blipmon.core.config import resolve
    from blipmon.estimate.judge import judge
    from blipmon.ui.widgets.estimate import LAB_CARD, estimate_lines

    cfg = resolve("load/split-language-model", [])
    text = estimate_lines(cfg)
    expected = judge(cfg, gpu_memory=LAB_CARD)
    assert text.splitlines()[1:] == [f"  {line}" for line in expected.device_lines()]
    assert [line.split()[1] for line in text.splitlines()[1:]] == ["cuda:0", "cpu"]


def test_an_estimate_that_fails_is_one_line_never_an_exception() -> None:
    from blipmon.core.config import resolve
    from blipmon.ui.widgets.estimate import estimate_lines

    text = estimate_lines(resolve("tiny/blip2-opt", ["model.id=/nonexistent/model"]))
    assert text.startswith("estimate: not available (") and "\n" not in text, text


def test_the_oom_banner_names_the_module_that_was_running(gpu_run: Path, clock: FrozenClock) -> None:
    """Issue 12 item 3: the module and its pass beside step and phase, where the run recorded them."""
    src = ReplaySource(gpu_run, clock=clock, background=False)
    src.seek_fraction(1.0)
    snap = src.poll()
    oom = {**snap.oom, "module": "language_model.model.decoder.layers.1", "module_pass": "backward"}
    named = Snapshot(**{**snap.__dict__, "oom": oom})
    assert banner_text(named) == (
        "OUT OF MEMORY at step 4, phase after_fwd, trying to allocate 20.00 GiB, "
        "in language_model.model.decoder.layers.1 (backward)"
    )
    src.close()
