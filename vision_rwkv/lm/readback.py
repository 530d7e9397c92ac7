"""Small values between the host and the device without making either wait for the other.

A decoding step launches its kernels and returns before the device has run them. Reading a device value on
the host (`.item()`, `.tolist()`, `torch.tensor(..., device="cuda")`) waits until the device has finished
everything launched so far, and the device then idles while the host prepares and launches the next step.
So the decoding loops keep their bookkeeping on the device and read back only what tells them they may
stop or shrink, through LaggedRead: copied into pinned memory without blocking, and looked at a fixed
number of steps later, by when the device has long produced it.
"""

from __future__ import annotations

import warnings
from collections import deque

import torch

# How many steps late a CUDA value is read: the host then runs no more than about this many steps ahead of
# the device, and a decode may step this many times after its last row finished. Fixed rather than "as soon as ready",
# so the steps at which a batch shrinks, and with them the sampled draws, do not depend on timing.
LAG_STEPS = 2
# On the CPU a read costs nothing, so it is read at once; tests raise this to run the lagged logic there.
CPU_LAG_STEPS = 0


def to_device(values, device, dtype=torch.long) -> torch.Tensor:
    """A short list as a tensor on `device`, sent from pinned memory without waiting for the copy."""
    if torch.device(device).type != "cuda" or torch.compiler.is_compiling():  # traced: a constant
        return torch.tensor(values, dtype=dtype, device=device)
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Device tensors on the host, with one wait for all of them."""
    return HostCopy(*tensors).wait()


class HostCopy:
    """Device tensors' values as they are now, copied to the host without waiting: queued at construction
    (into pinned memory, on the current stream), waited for by wait(). What is launched in between runs on
    the device while the host waits only for the copy. CPU tensors are kept as they are (not copied)."""

    def __init__(self, *tensors: torch.Tensor):
        cuda = [t.device for t in tensors if t.device.type == "cuda"]
        self.event = None
        if not cuda:
            self.host = tuple(t.cpu() for t in tensors)
            return
        self.host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                          for t in tensors)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(cuda[0]))

    def wait(self) -> tuple[torch.Tensor, ...]:
        if self.event is not None:
            self.event.synchronize()
        return self.host


class LaggedRead:
    """A small device value pushed at every step and read on the host exactly `lag` steps later.

    push(v) at step n queues a non-blocking copy of v; read() then returns the value pushed at step n - lag
    (waiting, if need be, until the device has produced it; it has usually long done so), or None for the
    first lag steps. The loop acts a few steps late on what it learns: a stop flag or a live-row count,
    both of which only ever go one way, so a late value is still a safe bound.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.lag = LAG_STEPS if self.device.type == "cuda" else CPU_LAG_STEPS
        self.pending: deque = deque()  # (host copy, event or None), oldest first

    def push(self, value: torch.Tensor) -> None:
        if self.device.type != "cuda":
            self.pending.append((value.detach().clone(), None))
            return
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.pending.append((host, event))

    def read(self):
        """The value pushed lag steps ago, as a Python number, or None while fewer have been pushed."""
        if len(self.pending) <= self.lag:
            return None
        host, event = self.pending.popleft()
        if event is not None:
            event.synchronize()
        return host.item()


def count_syncs(fn) -> int:
    """How many times fn() makes the host wait for a CUDA device, as torch's sync debug mode flags them
    (a D2H copy, .item(), a synchronize; a wait on an event, as LaggedRead.read's, is not flagged)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)
