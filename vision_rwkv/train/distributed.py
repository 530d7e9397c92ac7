"""The processes of a training run: torch.distributed under torchrun (WORLD_SIZE > 1), one process otherwise.

Training's collectives (the gradients' all-reduce, the loss sums) run on the default group, NCCL on GPUs, with
its usual timeout, so a hung rank is noticed; the waits for rank 0's one-time work (the BPE, the feature
cache, evaluation) run on a gloo group whose timeout covers a feature-cache build.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import VisionRWKVError
from ..launch import Launch, die_with_parent

SETUP_TIMEOUT = timedelta(hours=24)  # rank 0 alone builds the BPE and the feature cache, and evaluates


class Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), plain single-process otherwise.

    Training's collectives run on the default group (NCCL on GPUs) with its usual timeout, so a hung rank is
    noticed; the waits for rank 0's one-time work (share, wait_for_main) run on a gloo group whose timeout
    covers a feature-cache build.
    """

    def __init__(self, device_name: str):
        launch = Launch.from_env()
        self.world, self.rank, self.local_rank = launch.world, launch.rank, launch.local_rank
        self.device = launch.device(device_name, "trainer.device")
        self.slow = None
        if self.world > 1:
            die_with_parent()  # a torchrun agent killed with -9 takes its workers with it
            if not dist.is_initialized():
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.slow = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
        self.main = self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wait_for_main(self) -> None:
        """Every rank waits here while rank 0 does one-time work, however long it takes (up to a day)."""
        if self.world > 1:
            dist.barrier(group=self.slow)

    def share(self, value):
        """Rank 0's value, on every rank (any picklable value)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.slow)
        return box[0]

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class SharedError(VisionRWKVError):
    """Rank 0's error, raised on the other ranks too (entry scripts print it once, from rank 0)."""

    quiet = True
