"""Several ranks: what torchrun tells each child, and the process group it needs.

blipmon does not launch ranks itself; ``torch.distributed.run`` does (see ``launch.py``), and
each rank records its own phases into the shared event stream with its ``rank``. torch is imported
only where it is used: reading the ranks from the environment must not cost the child its first
second (the child writes its header first, so a run stopped at once is still a run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def multi(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def writes_run(self) -> bool:
        """The rank that writes its node's run summary (config, load, plan, steps): local rank 0.

        On one machine that is global rank 0; in a several-machine job every node writes its own
        run directory, so each needs its own writer. The others write ``rank_*`` records.
        """
        return self.local_rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        def num(name: str, default: int) -> int:
            try:
                return int(os.environ.get(name, default))
            except ValueError:
                return default

        return cls(rank=num("RANK", 0), local_rank=num("LOCAL_RANK", 0), world=num("WORLD_SIZE", 1))

    def init(self, cuda: bool) -> None:
        """nccl between GPUs, gloo on CPUs."""
        import torch

        if not self.multi or torch.distributed.is_initialized():
            return
        if cuda:
            torch.cuda.set_device(self.local_rank)
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")

    def close(self) -> None:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
