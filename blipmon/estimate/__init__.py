"""Memory estimates before a run: per-phase prediction, peak, fit/OOM verdict, and predicted beside measured.

``estimate(cfg)`` answers "will this configuration fit, and where will it run out?" in seconds, without a GPU or
weights: parameters, gradients and optimizer state are counted exactly from the architecture on the meta device,
activations are measured by running the training step of a shortened copy of the model on fake tensors. See
docs/memory-model.md for the model and its sources. UI-free: nothing here imports Textual.
"""

from blipmon.estimate.compare import (
    predict_for_run,
    predicted_vs_measured,
    render_predicted_vs_measured,
    render_verdict_line,
)
from blipmon.estimate.timeline import (
    PHASES,
    Estimate,
    EstimateError,
    PhaseEstimate,
    clear_cache,
    estimate,
)

__all__ = [
    "PHASES",
    "Estimate",
    "EstimateError",
    "PhaseEstimate",
    "clear_cache",
    "estimate",
    "predict_for_run",
    "predicted_vs_measured",
    "render_predicted_vs_measured",
    "render_verdict_line",
]
