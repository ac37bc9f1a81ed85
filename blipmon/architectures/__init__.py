"""Real-size architectures that ship inside blipmon.

Each ``*.json`` file here is the Hugging Face ``config.json`` of one checkpoint (``Salesforce/blip2-opt-2.7b`` is
stored as ``Salesforce--blip2-opt-2.7b.json``). The memory of a model depends on its architecture and dtypes, not
on its weight values, so these files are all ``weights = "random"`` needs to build any of them at full size with no
network. ``catalog`` turns them into configs, parameter counts and byte sizes; ``build.build_random`` builds a
random-weight model (quantized or not) that allocates what ``from_pretrained`` would. See docs/architectures.md for
where every file comes from.
"""

from blipmon.architectures.build import build_random
from blipmon.architectures.catalog import (
    architecture_config,
    describe,
    known_ids,
    meta_model,
    param_bytes,
    param_count,
    untie_like_checkpoint,
    upcast_like_pretrained,
)

__all__ = [
    "architecture_config",
    "build_random",
    "describe",
    "known_ids",
    "meta_model",
    "param_bytes",
    "param_count",
    "untie_like_checkpoint",
    "upcast_like_pretrained",
]
