"""`vision-rwkv serve` and `python serve.py`: serve captions over HTTP, with a web page (see USAGE).

Hydra composes the options from conf/serve.yaml, typed by ServeConfig; vision_rwkv.serve builds the app
and uvicorn serves it. SIGTERM or Ctrl-C stops taking connections, finishes the requests in flight and
drains the queue, then exits.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ..config import ServeConfig
from ..errors import EXIT_USAGE, VisionRWKVError, one_line, short_warnings
from . import without_shutdown_stall

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
PROG = "serve.py"

USAGE = """\
usage: python serve.py [key=value ...]

Serve image captions over HTTP: a web page at /, and a JSON API (needs the [serve] extra:
pip install 'vision_rwkv[serve]').

  GET  /             the page: drop images, read their captions
  POST /v1/caption   images as multipart/form-data files, or JSON {"images": [base64, ...]}; optional
                     fields strategy (greedy | sample | beam), num_beams, num_return, top_p, top_a,
                     temperature, max_new_tokens, seed
  GET  /healthz      liveness
  GET  /v1/model     the model's config summary, device and the server's limits

options (Hydra overrides, key=value; defaults in conf/serve.yaml):
  checkpoint=DIR          caption checkpoint folder; null (default): the shipped demo model
  host=HOST               127.0.0.1 (default: this machine only) | 0.0.0.0 (every interface)
  port=N                  8000 (default)
  device=DEVICE           auto (default) | cpu | cuda | cuda:N
  dtype=DTYPE             auto (default) | bf16 | fp32
  max_batch=N             images captioned together (default 32)
  max_wait_ms=MS          how long a batch waits for more images (default 5)
  continuous=BOOL         true (default): greedy and sampling rows join the running decode at the next
                          step and leave when they end (beam search is batched whole); false: every
                          request is batched whole
  overlap_joins=BOOL      true (default): on CUDA, new requests are encoded and prefilled on a second stream
                          while the running rows decode; false: the decode waits for each join
  max_queue=N             images waiting before requests get 503 with Retry-After (default 256)
  max_body_bytes=N        request body limit, 413 beyond it (default 20 MiB)
  max_pixels=N            image size limit, 413 beyond it (default 4096*4096)
  max_images=N            images in one request (default 16)
  max_new_tokens=N        the most a request may ask for (default 128)
  intake_threads=N        threads decoding and preprocessing uploads (default 4; each holds the GIL the
                          model's thread needs), per HTTP process
  http_processes=N        0 (default): HTTP and the model in one process; N: the model in a process of its
                          own, fed by N HTTP processes on the same port (more cores parse and decode uploads,
                          and none of it contends with the model's thread)
  cors_origins=[URL,...]  origins allowed to call the API from a browser (default: none, CORS off)
  --cfg                   print the composed configuration and exit
  -h, --help              print this text and exit

examples:
  python serve.py
  python serve.py checkpoint=runs/x/checkpoints/latest port=8080 device=cuda max_batch=128 http_processes=4
  curl -F image=@examples/shapes_test_3.png http://127.0.0.1:8000/v1/caption
"""

ConfigStore.instance().store(name="serve_cli_schema", node=ServeConfig)


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run as `python serve.py ARGS` would, in-process; returns the exit status when the server stops."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE.replace("python serve.py", prog), end="")
        return 0
    try:
        bad = [a for a in argv if a != "--cfg" and "=" not in a]
        if bad:
            raise VisionRWKVError(f"unexpected argument {bad[0]!r}; options are key=value (see --help)")
        cfg = compose([a for a in argv if a != "--cfg"])
        if "--cfg" in argv:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        return serve(OmegaConf.to_object(cfg).validate(), prog)
    except (VisionRWKVError, HydraException, OmegaConfBaseException) as e:
        hint = "" if isinstance(e, VisionRWKVError) else f" ({prog} --help lists the options)"
        print(f"{prog}: {one_line(e)}{hint}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_USAGE)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None, job_name="serve"):
        return hydra_compose(config_name="serve", overrides=list(overrides))


def serve(cfg: ServeConfig, prog: str = PROG) -> int:
    try:
        import uvicorn

        from ..serve import create_app
    except ImportError as e:
        raise VisionRWKVError(f"the server needs the [serve] extra ({e.name} is missing); "
                              "pip install 'vision_rwkv[serve]'") from None
    from ..caption.captioner import Captioner

    name = Path(cfg.checkpoint).name if cfg.checkpoint else "demo"
    if cfg.http_processes:
        return serve_in_processes(partial(Captioner.load, cfg.checkpoint, device=cfg.device, dtype=cfg.dtype),
                                  cfg, name, prog)
    captioner = Captioner.load(cfg.checkpoint, device=cfg.device, dtype=cfg.dtype)
    app = create_app(captioner, cfg, name=name)
    print(f"{prog}: serving {name} on {captioner.device} at http://{cfg.host}:{cfg.port}/", file=sys.stderr)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=60)
    return 0


def serve_in_processes(load, cfg: ServeConfig, name: str, prog: str = PROG) -> int:
    """The model in a process of its own behind cfg.http_processes HTTP processes, until SIGTERM or Ctrl-C;
    1 if a process died on its own."""
    import signal

    from ..serve.processes import ProcessServer

    server = ProcessServer(load, cfg, name)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.request_stop)
    server.start()
    print(f"{prog}: serving {name} on {server.card.info['device']} at http://{cfg.host}:{server.port}/ "
          f"({cfg.http_processes} HTTP processes, the model in its own)", file=sys.stderr)
    code = server.wait()
    if server.failure:
        print(f"{prog}: {server.failure}; stopped the server", file=sys.stderr)
    return code


def cli(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command line: the library's warnings as one line each, then main()."""
    short_warnings(prog)
    return without_shutdown_stall(main(argv, prog))
