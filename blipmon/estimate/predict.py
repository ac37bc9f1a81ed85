"""``python -m blipmon.estimate.predict CONFIG.json``: a run's prediction, printed as JSON (``null`` if none).

The child starts this beside its loading, in a process of its own: building a model is not thread-safe
(accelerate's and transformers' empty-weight contexts patch ``torch.nn.Module`` for the whole process), so
an estimate traced in a thread while the real model loads could change either. A process shares nothing.

With ``runtime.module_depth`` above 0 the prediction carries ``modules``: the estimate's phases split by module
(``estimate.modules.predict_modules``, the rows as ``estimate --json --modules`` prints them), which ``show
--modules`` and the dashboard's module view put beside the measured figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m blipmon.estimate.predict CONFIG.json", file=sys.stderr)
        return 2
    cfg = json.loads(Path(args[0]).read_text(encoding="utf-8"))  # a resolved configuration, read as data
    from blipmon.estimate import predict_for_run

    prediction = predict_for_run(cfg)  # never raises; None when no estimate can be made
    if prediction is not None:
        modules = with_modules(cfg)
        if modules:
            prediction["modules"] = modules
    print(json.dumps(prediction))
    return 0


def with_modules(cfg: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The prediction's per-module rows (JSON objects), or None: attribution off, not a training run, or the split
    failed. Never raises: the phases alone are still worth saving.

    The device is the one ``predict_for_run``'s estimate chose (``timeline.target_device``, the same rule), so the
    rows split those very phases.
    """
    try:
        from blipmon.core import config as config_mod
        from blipmon.estimate import timeline
        from blipmon.estimate.modules import predict_modules, rows_json

        cfg = config_mod.validate(cfg)
        if cfg["job"]["kind"] != "train" or int(cfg["runtime"]["module_depth"]) <= 0:
            return None
        return rows_json(predict_modules(cfg, device=timeline.target_device(cfg, None, None)))
    except Exception:  # noqa: BLE001 - best effort by design, as the prediction itself
        return None


if __name__ == "__main__":
    sys.exit(main())
