"""Serving captions over HTTP: an ASGI app (create_app) and the batching worker that owns the model.

    from vision_rwkv import Captioner
    from vision_rwkv.serve import create_app
    app = create_app(Captioner.load())          # uvicorn.run(app) serves it; `vision-rwkv serve` does both

The model can also run in a process of its own behind several HTTP processes
(vision_rwkv.serve.processes.ProcessServer; `vision-rwkv serve http_processes=N`).
Needs the [serve] extra (starlette, uvicorn).
"""

from .app import create_app
from .scheduler import BatchScheduler, Captioned, QueueFull, SchedulerClosed

__all__ = ["create_app", "BatchScheduler", "Captioned", "QueueFull", "SchedulerClosed"]
