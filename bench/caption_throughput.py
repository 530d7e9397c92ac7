"""Captioning throughput on a folder of JPEGs: images/s end to end, and where the time goes.

    python bench/caption_throughput.py [--images 2000] [--batch-sizes 1 32 256] [--workers 8] [--dtype bf16]

The model is the size the README's real recipe uses at the small end: open_clip ViT-B-16 (random
weights: 196 patch tokens of width 768), the mlp projector (one prefix embedding per patch), and an
RWKV-7 L12-D768 decoder with the 65,536-token World vocabulary (random official init). Every caption
is exactly --new-tokens tokens (end-of-text is banned until then), so every run does the same work.
Weights are bf16 under bf16 autocast on CUDA (caption.py's default; --dtype fp32 keeps fp32 weights
under autocast, as caption.py ran before 2026-11-26); the GPT-2 baseline gets the same weight dtype.

Three measurements per batch size, in one process:
  end to end   Captioner.caption_paths over the folder, exactly what caption.py runs (DataLoader
               workers decode JPEGs while the GPU works), timed from the first call to the last result.
  stages       the same loop with a device sync between stages: waiting for decoded images, encoder,
               prefill (projector + GPT-mode pass over the prefix, a CUDA graph up to 4,096 prefix tokens),
               decoding (RNN mode, one token a step).
  baseline     decoding the same captions without a recurrent state: every new token re-runs GPT mode
               over the whole prefix + caption so far (what a decoder without a cache must do), at
               batch 32 on the first --baseline-images images; also checks both give the same tokens.
  eager        the stages again with CUDA graphs off (VISION_RWKV_CUDA_GRAPHS=0): the prefill and every
               RNN step launched kernel by kernel from Python, as before graphs.
  GPT-2        when `transformers` is installed: a GPT-2 decoder of the same size (L12-D768, vocabulary
               65,536, random weights) decoding the same prefix embeddings greedily, the same number of
               new tokens, at every batch size, three ways: generate() with its default (dynamic) KV
               cache, generate() with its static cache, and bench/gpt2_min.py (a preallocated cache,
               compiled, the step replayed as a CUDA graph: the transformer at its best, like against
               our graph-replayed RNN step).
Image decoding alone (the DataLoader with --workers, no model) is timed too, as the ceiling it sets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2_min import MinimalGPT2  # noqa: E402

from vision_rwkv.caption.captioner import Captioner, _collate, _ImageFiles  # noqa: E402
from vision_rwkv.caption.model import build_caption_model  # noqa: E402
from vision_rwkv.config import (  # noqa: E402
    CaptionConfig,
    EncoderConfig,
    ProjectorConfig,
    RWKV7Config,
    SamplingConfig,
)
from vision_rwkv.lm.beam import beam_search  # noqa: E402
from vision_rwkv.lm.generate import decode_loop  # noqa: E402
from vision_rwkv.lm.graphs import prefill_runner  # noqa: E402


def make_jpegs(folder: Path, n: int, seed: int = 0, processes: int = 1) -> list[Path]:
    """n photo-sized JPEGs (640x480, smooth colour fields plus noise, quality 90), written once; image i
    depends only on (seed, i)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.jpg" for i in range(n)]
    todo = [(p, seed, i) for i, p in enumerate(paths) if not p.exists()]
    if processes > 1 and len(todo) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(processes) as pool:  # before any CUDA use; works from stdin
            pool.map(_write_jpeg, todo, chunksize=64)
    else:
        for job in todo:
            _write_jpeg(job)
    return paths


def _write_jpeg(job) -> None:
    path, seed, i = job
    rng = np.random.default_rng([seed, i])
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((640, 480), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, size=(480, 640, 3))
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(tmp, format="JPEG", quality=90)
    tmp.replace(path)


def build_model(device):
    cfg = CaptionConfig(
        encoder=EncoderConfig(model="ViT-B-16", pretrained=""),
        projector=ProjectorConfig(kind="mlp"),
        decoder=RWKV7Config(vocab_size=65536, n_layer=12, n_embd=768, head_size=64),
        tokenizer="world",
    )
    torch.manual_seed(0)
    return build_caption_model(cfg).to(device).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def end_to_end(captioner, paths, sampling, batch_size, workers) -> dict:
    sync(captioner.device)
    t = time.perf_counter()
    results = list(captioner.caption_paths(paths, sampling, batch_size=batch_size, num_workers=workers))
    sync(captioner.device)
    seconds = time.perf_counter() - t
    assert len(results) == len(paths) and all(r.error is None for r in results)
    return {"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds}


@torch.no_grad()
def stages(captioner, paths, sampling, batch_size, workers) -> dict:
    model, device = captioner.model, captioner.device
    loader = torch.utils.data.DataLoader(captioner.image_files([str(p) for p in paths]),  # as Captioner loads
                                         batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                         pin_memory=device.type == "cuda")
    totals = dict.fromkeys(("waiting for images", "encoder", "prefill", "decoding"), 0.0)
    stop = [model.eos_id]
    sync(device)
    start = t = time.perf_counter()
    for batch in loader:
        now = time.perf_counter()
        totals["waiting for images"] += now - t
        images = captioner.model_input(batch.images)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=captioner.bf16):
            tokens, pooled = model.encode(images)
            sync(device)
            t1 = time.perf_counter()
            logits, state = prefill_runner(model.decoder)(model.prefix(tokens, pooled))  # as caption_features
            sync(device)
            t2 = time.perf_counter()
            if sampling.strategy == "beam":
                beam_search(model.decoder, logits, state, sampling, stop)
            else:
                decode_loop(model.decoder, logits, state, sampling, stop)
            sync(device)
            t = time.perf_counter()
        totals["encoder"] += t1 - now
        totals["prefill"] += t2 - t1
        totals["decoding"] += t - t2
    seconds = time.perf_counter() - start
    n = len(paths)
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds,
            "ms_per_image": {k: 1000 * v / n for k, v in totals.items()}}


def decode_only(captioner, paths, batch_size, workers) -> dict:
    loader = torch.utils.data.DataLoader(captioner.image_files([str(p) for p in paths]),
                                         batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    t = time.perf_counter()
    n = sum(len(b.good) for b in loader)
    seconds = time.perf_counter() - t
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


@torch.no_grad()
def baseline(captioner, paths, new_tokens, batch_size) -> dict:
    """Greedy decoding with no recurrent state: GPT mode over prefix + caption-so-far for every token."""
    model, device = captioner.model, captioner.device
    lm = model.decoder
    loader = torch.utils.data.DataLoader(_ImageFiles([str(p) for p in paths], model.encoder.preprocess),
                                         batch_size=batch_size, collate_fn=_collate)
    cached_s = uncached_s = 0.0
    same = total = 0
    sampling = SamplingConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    for batch in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=captioner.bf16):
            tokens, pooled = model.encode(batch.images.to(device))
            prefix = model.prefix(tokens, pooled)
            sync(device)
            t = time.perf_counter()
            logits, state = lm(inputs_embeds=prefix, last_only=True)
            cached = decode_loop(lm, logits, state, sampling, [model.eos_id])
            sync(device)
            cached_s += time.perf_counter() - t
            t = time.perf_counter()
            ids = torch.empty(prefix.shape[0], 0, dtype=torch.long, device=device)
            for n in range(new_tokens):
                x = torch.cat([prefix, lm.embed(ids).to(prefix.dtype)], dim=1)
                logits, _ = lm(inputs_embeds=x, last_only=True)
                if n < new_tokens - 1:  # end-of-text is banned until the last token, as min_new_tokens does
                    logits[:, model.eos_id] = float("-inf")
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            sync(device)
            uncached_s += time.perf_counter() - t
        for a, b in zip(cached, ids.tolist()):
            same += sum(x == y for x, y in zip(a, b))
            total += new_tokens
    n = len(paths)
    return {"images": n, "batch_size": batch_size, "rnn_mode_ms_per_image": 1000 * cached_s / n,
            "gpt_rerun_ms_per_image": 1000 * uncached_s / n, "speedup": uncached_s / cached_s,
            "same_tokens": same / max(total, 1)}


@torch.no_grad()
def gpt2_baseline(captioner, paths, new_tokens, batch_size, kind: str = "dynamic") -> dict | None:
    """Decoding time per image (prefill included) of a same-size GPT-2 from the same prefix embeddings.
    kind: "dynamic" (transformers' generate() with its default cache), "static" (generate() with
    cache_implementation="static") or "minimal" (bench/gpt2_min.py: a preallocated cache, compiled, the
    step replayed as a CUDA graph). The first batch of each warms up (and compiles)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    model, device = captioner.model, captioner.device
    cfg = GPT2Config(vocab_size=65536, n_positions=512, n_embd=768, n_layer=12, n_head=12)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(cfg).to(device, model.decoder.emb.weight.dtype).eval()
    loader = torch.utils.data.DataLoader(captioner.image_files([str(p) for p in paths]), batch_size=batch_size,
                                         collate_fn=_collate, drop_last=True)
    minimal = None
    skips_before = MinimalGPT2.cudagraph_skips()
    seconds, n = 0.0, 0
    for i, batch in enumerate(loader):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=captioner.bf16):
            prefix = model.prefix(*model.encode(captioner.model_input(batch.images)))
            mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=device)
            sync(device)
            t = time.perf_counter()
            if kind == "minimal":
                if minimal is None:
                    minimal = MinimalGPT2(gpt2, prefix.shape[0], prefix.shape[1] + new_tokens).compile()
                minimal.greedy(prefix.to(gpt2.dtype), new_tokens)
            else:
                extra = {"cache_implementation": "static"} if kind == "static" else {}
                gpt2.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                              **extra)
            sync(device)
        if i:  # the first batch warms up
            seconds += time.perf_counter() - t
            n += prefix.shape[0]
    if not n:
        return None
    import transformers

    out = {"kind": kind, "images": n, "batch_size": batch_size, "transformers": transformers.__version__,
           "ms_per_image": 1000 * seconds / n, "tokens_per_s": n * new_tokens / seconds}
    if kind == "minimal":  # the step must really replay as a graph for the comparison to be like against like
        out["cudagraph_skips"] = MinimalGPT2.cudagraph_skips() - skips_before
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--batch1-images", type=int, default=200, help="batch size 1 runs on this many images")
    ap.add_argument("--baseline-images", type=int, default=64)
    ap.add_argument("--eager-images", type=int, default=512, help="images for the graphs-off and GPT-2 runs")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--num-beams", type=int, default=1,
                    help="1: greedy; more: beam search with this many beams (our runs only: implies --no-baselines)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--folder", default=None, help="where the JPEGs go (default: a temporary folder)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weights (autocast on CUDA either way)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--no-baselines", action="store_true",
                    help="our runs only: skip the graphs-off, GPT-2 and GPT-mode re-run baselines")
    args = ap.parse_args()

    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="caption_bench_"))
    t = time.perf_counter()
    paths = make_jpegs(folder, args.images, processes=args.workers)
    print(f"{len(paths)} JPEGs (640x480) in {folder}, written in {time.perf_counter() - t:.1f} s", flush=True)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model = build_model(device)
    captioner = Captioner(model.to(torch.bfloat16) if args.dtype == "bf16" else model, device)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    if args.num_beams > 1:
        sampling = SamplingConfig(strategy="beam", num_beams=args.num_beams, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens)
        args.no_baselines = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report = {"device": name, "torch": torch.__version__, "workers": args.workers, "new_tokens": args.new_tokens,
              "dtype": args.dtype, "num_beams": args.num_beams,
              "model": "ViT-B-16 (random) + mlp projector + RWKV-7 L12-D768 V65536", "runs": []}
    print(f"device {name}, torch {torch.__version__}, {args.dtype} weights, {args.workers} decode workers, "
          f"{args.new_tokens} new tokens per caption, " + (f"beam search, {args.num_beams} beams" if
                                                          args.num_beams > 1 else "greedy"), flush=True)

    end_to_end(captioner, paths[:64], sampling, 32, args.workers)  # warm-up: kernel build, allocator, cuDNN
    dec = decode_only(captioner, paths, 32, args.workers)
    report["decode_only"] = dec
    print(f"image decoding alone ({args.workers} workers, draft size {captioner.draft_size}): "
          f"{dec['images_per_s']:.0f} images/s", flush=True)
    for bs in args.batch_sizes:
        subset = paths[: args.batch1_images] if bs == 1 else paths
        captioner.caption_images(captioner.model_input(torch.zeros(bs, 3, *captioner.model.encoder.image_size,
                                                                   dtype=torch.uint8)), sampling)  # graphs at bs
        e2e = end_to_end(captioner, subset, sampling, bs, args.workers)
        st = stages(captioner, subset, sampling, bs, args.workers)
        report["runs"].append({"batch_size": bs, "end_to_end": e2e, "stages": st})
        ms = st["ms_per_image"]
        print(f"batch {bs:4d} ({len(subset)} images): {e2e['images_per_s']:8.1f} images/s end to end | "
              f"with syncs {st['images_per_s']:8.1f} images/s; ms/image: "
              + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()), flush=True)
    if args.no_baselines:
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
        return
    os.environ["VISION_RWKV_CUDA_GRAPHS"] = "0"
    report["eager"] = []
    for bs in [b for b in args.batch_sizes if b > 1]:
        st = stages(captioner, paths[: args.eager_images], sampling, bs, args.workers)
        report["eager"].append({"batch_size": bs, "stages": st})
        print(f"eager RNN steps (graphs off), batch {bs} ({st['images']} images): {st['images_per_s']:.1f} "
              f"images/s with syncs; ms/image: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                          st["ms_per_image"].items()), flush=True)
    os.environ.pop("VISION_RWKV_CUDA_GRAPHS")
    base = baseline(captioner, paths[: args.baseline_images], args.new_tokens, 32)
    report["baseline"] = base
    print(f"baseline, batch 32 ({base['images']} images), decoding {args.new_tokens} tokens: RNN mode "
          f"{base['rnn_mode_ms_per_image']:.3f} ms/image (prefill included) vs GPT mode re-run per token "
          f"{base['gpt_rerun_ms_per_image']:.3f} ms/image: {base['speedup']:.1f}x; "
          f"same tokens {100 * base['same_tokens']:.1f}%", flush=True)
    names = {"dynamic": "generate(), dynamic cache", "static": "generate(), static cache",
             "minimal": "bench/gpt2_min.py, preallocated cache, compiled"
                        + (", step in a CUDA graph" if device.type == "cuda" else "")}
    for bs in args.batch_sizes:
        for kind in ("dynamic", "static", "minimal"):
            try:
                g2 = gpt2_baseline(captioner, paths[: max(args.eager_images, 2 * bs)], args.new_tokens, bs, kind)
            except Exception as e:  # a baseline that fails is reported, not fatal
                print(f"GPT-2 ({names[kind]}), batch {bs}: failed: {type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}", flush=True)
                continue
            if g2 is not None:
                report.setdefault("gpt2", []).append(g2)
                print(f"GPT-2 L12-D768 V65536 ({names[kind]}; transformers {g2['transformers']}), batch {bs} "
                      f"({g2['images']} images): decoding {g2['ms_per_image']:.3f} ms/image, prefill included; "
                      f"{g2['tokens_per_s']:.0f} tokens/s"
                      + (f"; inductor skipped CUDA graphs {g2['cudagraph_skips']} times"
                         if g2.get("cudagraph_skips") else ""), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
