"""This process's place in a torchrun launch, and the device it works on.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process; run directly, none is set and the
process is rank 0 of 1. train_caption.py and caption.py both read them here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import VisionRWKVError


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Launch:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        defaults = ("0", "1", "0")
        values = [os.environ.get(name, default) for name, default in zip(names, defaults)]
        try:
            rank, world, local_rank = (int(v) for v in values)
        except ValueError:
            shown = ", ".join(f"{n}={v!r}" for n, v in zip(names, values))
            raise VisionRWKVError(f"{shown}: expected integers, as torchrun sets them (or none of them)") from None
        if world < 1 or not 0 <= rank < world or local_rank < 0:
            raise VisionRWKVError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}: expected "
                                  "0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, as torchrun sets them")
        return cls(rank, world, local_rank)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, name: str, setting: str = "device") -> torch.device:
        """auto: this process's GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU; cuda means
        cuda:LOCAL_RANK; cpu and cuda:N are kept. `setting` names the config key in errors."""
        try:
            device = torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
        except (RuntimeError, ValueError):
            raise VisionRWKVError(f"{setting} is {name!r}, not a device name; expected auto, cpu, cuda or "
                                  "cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise VisionRWKVError(f"{setting} is {name!r} but no CUDA device is available; use auto or cpu")
            if device.index is None:
                device = torch.device(f"cuda:{self.local_rank}")
            if device.index >= torch.cuda.device_count():
                raise VisionRWKVError(f"{setting} is {name!r} but this process (LOCAL_RANK={self.local_rank}) "
                                      f"would use {device}, and only {torch.cuda.device_count()} CUDA device(s) "
                                      "exist")
        return device


def die_with_parent(poll_seconds: float = 1.0) -> None:
    """End this process (SIGTERM) when the process that started it is gone.

    torchrun forwards SIGTERM to its workers, but an agent killed with -9 cannot, and its workers would run
    to the end unseen. A daemon thread watches the parent and follows it.
    """
    import signal
    import threading
    import time

    parent = os.getppid()
    if parent <= 1:
        return

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="die_with_parent", daemon=True).start()
