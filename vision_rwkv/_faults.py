"""Named points where the fault-injection tests stop a run exactly as kill -9 would, or hang it.

    VISION_RWKV_FAULT=NAME            SIGKILL this process the first time it reaches fault_point(NAME)
    VISION_RWKV_FAULT=NAME:N          ... the N-th time
    VISION_RWKV_FAULT=NAME:N@R        ... only in the process of torchrun rank R
    VISION_RWKV_FAULT=NAME:N=hang     sleep there for good instead (a process to signal from outside)

Without the variable a fault point costs one environment lookup. Points in the code:
caption.batch_written (a batch's rows are durable), eval.batch_written (the same in eval_coco.py's
journal), train.step_done (an optimizer step has run),
checkpoint.files_written (a checkpoint's files are in its temporary folder, not yet renamed).
"""

from __future__ import annotations

import os
import signal
import time

ENV = "VISION_RWKV_FAULT"
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    spec, _, action = spec.partition("=")
    target, _, rest = spec.partition(":")
    if target != name:
        return
    count, _, rank = rest.partition("@")
    if rank and os.environ.get("RANK", "0") != rank:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] < int(count or 1):
        return
    if action == "hang":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
