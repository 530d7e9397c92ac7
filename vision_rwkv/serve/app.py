"""The captioning server's ASGI app (Starlette): the page, the caption API, health and model info.

    app = create_app(Captioner.load(), ServeConfig())     # then: uvicorn.run(app, host=..., port=...)

Request bodies are read into memory up to max_body_bytes and never written to disk (multipart bodies are
parsed here, in memory, not spooled to temporary files). Errors are JSON
{"error": "one line"}: 400 for a bad field or a file that is not an image, 413 for a body over the size
limit or an image over the pixel limit, 503 with Retry-After when the queue is full or the server is
shutting down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from ..caption.images import TooManyPixels, decode_image_bytes
from ..config import SamplingConfig, ServeConfig, Strategy
from ..errors import VisionRWKVError, one_line
from .continuous import warm_up
from .scheduler import BatchScheduler, QueueFull, SchedulerClosed

# The request fields that choose decoding, and how each is read from a form's text.
SAMPLING_FIELDS = {"strategy": str, "num_beams": int, "num_return": int, "top_p": float, "top_a": float,
                   "temperature": float, "max_new_tokens": int, "seed": int}
DEFAULT_MAX_NEW_TOKENS = 48  # as the CLI's presets, so a default request captions as caption.py does
MAX_BEAMS = 16
RETRY_AFTER_S = 1
log = logging.getLogger(__name__)


class RequestError(VisionRWKVError):
    """A client's mistake: answered with `status` and the one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelCard:
    """What the HTTP side needs of the model, and nothing that runs it (it travels to HTTP processes that
    load no model): its description, and how an upload becomes the tensor the model takes."""

    info: dict  # name, device, dtype, encoder, projector, decoder (GET /v1/model, with the server's limits)
    pixels: Callable  # PIL image -> (3,H,W): uint8 pixels where the encoder's preprocess splits, else floats
    draft_size: int | None  # the side JPEGs are decoded down to (Captioner.draft_size)

    @classmethod
    def of(cls, captioner, name: str) -> ModelCard:
        preprocess = captioner.model.encoder.preprocess
        return cls(describe_model(captioner, name), getattr(preprocess, "pixels", preprocess), captioner.draft_size)


def create_app(captioner, cfg: ServeConfig | None = None, *, name: str = "demo") -> Starlette:
    """The app for a loaded Captioner, with the batching worker in this process. Its lifespan warms the model
    up on CUDA (continuous.warm_up), starts the worker and, at shutdown (after uvicorn has finished the
    requests in flight), drains the queue and stops it."""
    cfg = (cfg or ServeConfig()).validate()
    scheduler = BatchScheduler.from_config(captioner, cfg)
    # every graph a request can need, captured before the first one
    warm = (lambda: warm_up(captioner, cfg.max_batch)) if captioner.device.type == "cuda" else None
    return build_app(ModelCard.of(captioner, name), scheduler, cfg, warm)


def build_app(card: ModelCard, scheduler, cfg: ServeConfig, warm: Callable[[], None] | None = None) -> Starlette:
    """The app over any scheduler: BatchScheduler (the model in this process) or processes.EngineClient
    (the model in a process of its own). Either has start(), close(), submit(images, sampling) -> Future of
    a Captioned, queued_images and alive. The lifespan runs warm() if given, starts the scheduler and, at
    shutdown, closes it."""
    cfg = cfg.validate()
    # a few intake threads, not the thread pool's 40: each one parsing or preprocessing holds the GIL that
    # the worker thread needs between its CUDA launches (made at first use: it belongs to the running loop)
    intake_limiter = None

    @asynccontextmanager
    async def lifespan(app):
        if warm is not None:
            await run_in_threadpool(warm)
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.close)

    async def page(request: Request):
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text("utf-8"))

    async def healthz(request: Request):
        if not scheduler.alive:
            return JSONResponse({"status": "the model's worker has stopped", "queued_images": 0}, status_code=503)
        return JSONResponse({"status": "ok", "queued_images": scheduler.queued_images})

    async def model_info(request: Request):
        return JSONResponse({**card.info, "limits": limits(cfg)})

    async def caption(request: Request):
        nonlocal intake_limiter
        if intake_limiter is None:
            intake_limiter = anyio.CapacityLimiter(cfg.intake_threads)
        started = time.perf_counter()
        try:
            body = await read_body(request, cfg.max_body_bytes)
            named, sampling, future, decoded = await anyio.to_thread.run_sync(
                intake, request.headers.get("content-type", ""), body, limiter=intake_limiter)
            captioned = await asyncio.wrap_future(future)
        except RequestError as e:
            return error(e.status, str(e))
        except (QueueFull, SchedulerClosed) as e:
            return error(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)})
        except VisionRWKVError as e:  # sampling settings out of range, or not used by the strategy
            return error(400, one_line(e))
        except Exception as e:  # a bug or an out-of-memory in the worker: logged in full, answered in one line
            log.exception("captioning failed")
            return error(500, f"internal error while captioning ({type(e).__name__}); see the server's log")
        done = time.perf_counter()
        results = [{"name": n, "captions": [{"caption": text, "score": score} for text, score in caps]}
                   for (n, _), caps in zip(named, captioned.captions)]
        return JSONResponse({
            "results": results,
            "sampling": sampling_summary(sampling),
            "timings": {"decode_ms": round((decoded - started) * 1000, 2), "queue_ms": round(captioned.queue_ms, 2),
                        "compute_ms": round(captioned.compute_ms, 2), "total_ms": round((done - started) * 1000, 2),
                        "batch_images": captioned.batch_images},
        })

    def intake(content_type: str, body: bytes):
        """The body -> (named images, sampling, the Future of its captions, when it was decoded), in one trip
        to the thread pool: each trip costs the event loop and the GIL more than the parsing does. Submitting
        here keeps the event loop clear of it too (to a model process, it writes the pixels to a pipe)."""
        named, fields = parse_request(content_type, body)
        sampling = sampling_from_fields(fields, cfg.max_new_tokens)
        if not named:
            raise RequestError("no images in the request; send multipart files or JSON {\"images\": [base64]}")
        if len(named) > cfg.max_images:
            raise RequestError(f"{len(named)} images in one request; at most {cfg.max_images}", 413)
        images = preprocess(card, named, cfg.max_pixels)
        decoded = time.perf_counter()
        return named, sampling, scheduler.submit(images, sampling), decoded

    app = Starlette(routes=[Route("/", page), Route("/healthz", healthz), Route("/v1/model", model_info),
                            Route("/v1/caption", caption, methods=["POST"])],
                    lifespan=lifespan, exception_handlers={404: _not_found, 405: _not_allowed})
    if cfg.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type"])
    app.state.scheduler = scheduler
    return app


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _not_found(request, exc):
    return error(404, f"no such path {request.url.path}; the API is GET /, GET /healthz, GET /v1/model, "
                      "POST /v1/caption")


async def _not_allowed(request, exc):
    return error(405, f"{request.method} is not allowed on {request.url.path}")


# ---- reading a request --------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, in memory; 413 as soon as it is known to exceed limit (Content-Length or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body is {int(declared):,} bytes; the limit is {limit:,}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"request body is over the limit of {limit:,} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(content_type: str, body: bytes) -> tuple[list[tuple[str, bytes]], dict]:
    """-> ([(image name, encoded bytes)], the other fields). Multipart: every file part is an image, every
    other part a field. JSON: {"images": [base64 or {"name", "data"}], field: value, ...}."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        return _parse_multipart(content_type, body)
    if kind == "application/json":
        return _parse_json(body)
    raise RequestError(f"content type {kind or '(none)'!r}; expected multipart/form-data or application/json", 415)


_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))')
_MALFORMED = "malformed multipart body; expected parts separated by the boundary in Content-Type"


def _parse_multipart(content_type: str, body: bytes):
    """RFC 7578 form data with bytes.split and find: about 60x faster than the standard library's email
    parser on a one-image request (bench/serve_parse.py), all of whose time held the GIL the worker needs
    (tests/test_serve.py checks both give the same parts)."""
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise RequestError(_MALFORMED)
    dash = b"--" + (m.group(1) or m.group(2)).encode("latin-1")
    pieces = (b"\r\n" + body).split(b"\r\n" + dash)  # [preamble, part, ..., "--" + epilogue]
    if len(pieces) < 2 or not pieces[-1].startswith(b"--"):
        raise RequestError(_MALFORMED)
    images, fields = [], {}
    for piece in pieces[1:-1]:
        line_end = piece.find(b"\r\n")  # what follows the delimiter on its line: transport padding only
        head_end = piece.find(b"\r\n\r\n", line_end)
        if line_end < 0 or head_end < 0 or piece[:line_end].strip(b" \t"):
            raise RequestError(_MALFORMED)
        headers = _part_headers(piece[line_end + 2:head_end])
        data = _decode_transfer(headers.get("content-transfer-encoding", ""), piece[head_end + 4:])
        params = {k.lower(): v for k, v in _header_params(headers.get("content-disposition", ""))}
        filename = params.get("filename*") or params.get("filename")
        if filename is not None:
            images.append((filename, data))
        elif params.get("name"):
            fields[params["name"]] = data.decode("utf-8", errors="replace")
    return images, fields


def _part_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    name = None
    for line in block.decode("utf-8", errors="replace").split("\r\n"):
        if line[:1] in (" ", "\t") and name is not None:  # a folded continuation line
            headers[name] += " " + line.strip()
        elif ":" in line:
            name, value = line.split(":", 1)
            name = name.strip().lower()
            headers[name] = value.strip()
    return headers


def _header_params(value: str):
    """(name, value) of each parameter after the header's first token; quoted strings unescaped, and an
    RFC 5987 extended value (filename*=utf-8''...) percent-decoded."""
    for m in _PARAM.finditer(value):
        key, quoted, token = m.group(1), m.group(2), m.group(3)
        text = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else token.strip()
        if key.endswith("*") and "''" in text:
            charset, _, encoded = text.partition("''")
            text = urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="replace")
        yield key, text


def _decode_transfer(encoding: str, data: bytes) -> bytes:
    """A part's Content-Transfer-Encoding (RFC 7578 deprecates it; old clients may still send one)."""
    encoding = encoding.strip().lower()
    try:
        if encoding == "base64":
            return base64.b64decode(data)
        if encoding == "quoted-printable":
            return binascii.a2b_qp(data)
    except (binascii.Error, ValueError):
        raise RequestError(f"a part's {encoding} content does not decode") from None
    return data


def _parse_json(body: bytes):
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise RequestError("the JSON body must be an object: {\"images\": [base64, ...], field: value, ...}")
    items = doc.pop("images", [])
    if not isinstance(items, list):
        raise RequestError("\"images\" must be a list of base64 strings or {\"name\", \"data\"} objects")
    images = []
    for i, item in enumerate(items):
        name, data = f"image {i}", item
        if isinstance(item, dict):
            name, data = item.get("name", name), item.get("data")
        if not isinstance(data, str):
            raise RequestError(f"images[{i}] must be a base64 string (or an object with one in \"data\")")
        try:
            payload = data.split(",", 1)[-1] if data.startswith("data:") else data  # a data: URL from a page
            images.append((str(name), base64.b64decode(payload, validate=True)))
        except (binascii.Error, ValueError):
            raise RequestError(f"images[{i}] is not valid base64") from None
    return images, doc


def sampling_from_fields(fields: dict, max_new_tokens_limit: int) -> SamplingConfig:
    """The request's decoding settings, checked as the CLI checks them (SamplingConfig.validate)."""
    unknown = sorted(set(fields) - set(SAMPLING_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; expected any of {', '.join(SAMPLING_FIELDS)}")
    values = {}
    for key, value in fields.items():
        kind = SAMPLING_FIELDS[key]
        if value is None or value == "":
            continue
        try:
            if isinstance(value, bool) or (kind is str and not isinstance(value, str)):
                raise ValueError
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            values[key] = kind(value)
        except (TypeError, ValueError):
            expected = "an integer" if kind is int else kind.__name__
            raise RequestError(f"{key} is {value!r}; expected {expected}") from None
    kwargs = {("num_return_sequences" if k == "num_return" else k): v for k, v in values.items()}
    kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    sampling = SamplingConfig(**kwargs).validate()
    if sampling.max_new_tokens > max_new_tokens_limit:
        raise RequestError(f"max_new_tokens is {sampling.max_new_tokens}; this server allows at most "
                           f"{max_new_tokens_limit}")
    if sampling.num_beams > MAX_BEAMS or sampling.num_return_sequences > MAX_BEAMS:
        raise RequestError(f"num_beams and num_return may be at most {MAX_BEAMS}")
    if sampling.strategy == Strategy.beam and sampling.num_return_sequences > sampling.num_beams:
        raise RequestError(f"num_return is {sampling.num_return_sequences}; beam search returns at most num_beams "
                           f"({sampling.num_beams})")
    return sampling


def sampling_summary(sampling: SamplingConfig) -> dict:
    out = {"strategy": str(sampling.strategy), "max_new_tokens": sampling.max_new_tokens,
           "num_return": sampling.num_return_sequences}
    if sampling.strategy == Strategy.beam:
        out["num_beams"] = sampling.num_beams
    if sampling.strategy == Strategy.sample:
        out.update(temperature=sampling.temperature, top_p=sampling.top_p, top_a=sampling.top_a, seed=sampling.seed)
    return out


def preprocess(card: ModelCard, named: list[tuple[str, bytes]], max_pixels: int):
    """Decode and preprocess every image: (n,3,H,W), uint8 pixels where the encoder's preprocess splits (a
    quarter of the bytes while queued; Captioner.model_input normalises them on the device). 413 for one
    over the pixel limit, 400 for one that is not an image."""
    import torch

    tensors = []
    for name, data in named:
        try:
            # JPEGs decoded at the encoder's size as Captioner decodes files: the same tensors as caption.py
            tensors.append(card.pixels(decode_image_bytes(data, name, max_pixels, card.draft_size)))
        except TooManyPixels as e:
            raise RequestError(one_line(e), 413) from None
        except VisionRWKVError as e:
            raise RequestError(one_line(e)) from None
    return torch.stack(tensors)


def describe_model(captioner, name: str) -> dict:
    model = captioner.model
    dec = model.config.decoder
    return {
        "name": name,
        "device": str(captioner.device),
        "dtype": "bf16" if captioner.bf16 else "fp32",
        "encoder": {"model": model.config.encoder.model, "pretrained": model.config.encoder.pretrained},
        "projector": {"kind": str(model.config.projector.kind), "prefix_len": model.prefix_len},
        "decoder": {"arch": str(dec.arch), "n_layer": dec.n_layer, "n_embd": dec.n_embd,
                    **({"head_size": dec.head_size} if dec.arch == "rwkv7" else {}), "vocab_size": dec.vocab_size},
    }


def limits(cfg: ServeConfig) -> dict:
    return {"continuous": cfg.continuous, "overlap_joins": cfg.overlap_joins, "max_batch": cfg.max_batch,
            "max_wait_ms": cfg.max_wait_ms, "max_queue": cfg.max_queue, "max_body_bytes": cfg.max_body_bytes,
            "max_pixels": cfg.max_pixels, "max_images": cfg.max_images, "max_new_tokens": cfg.max_new_tokens,
            "intake_threads": cfg.intake_threads, "http_processes": cfg.http_processes}
