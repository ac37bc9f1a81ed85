"""``python -m blipmon.estimate.predict CONFIG.json``: a run's prediction, printed as JSON (``null`` if none).

The child starts this beside its loading, in a process of its own: building a model is not thread-safe
(accelerate's and transformers' empty-weight contexts patch ``torch.nn.Module`` for the whole process), so
an estimate traced in a thread while the real model loads could change either. A process shares nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m blipmon.estimate.predict CONFIG.json", file=sys.stderr)
        return 2
    cfg = json.loads(Path(args[0]).read_text(encoding="utf-8"))  # a resolved configuration, read as data
    from blipmon.estimate import predict_for_run

    print(json.dumps(predict_for_run(cfg)))  # never raises; None when no estimate can be made
    return 0


if __name__ == "__main__":
    sys.exit(main())
