"""torchrun's process group, as pretraining and cohort prediction use it (``WORLD_SIZE`` > 1).

:func:`init_dist` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, joins the process group
(nccl on GPUs, gloo on CPUs) unless one exists, and returns a :class:`Dist`; a plain process is
rank 0 of 1 and every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def any_true(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)


def init_dist(device: torch.device | None) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Dist(rank, world, local, False)
    backend = "nccl" if (torch.cuda.is_available() and (device is None or device.type == "cuda")) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return Dist(rank, world, local, True)


__all__ = ["Dist", "init_dist"]
