"""What each projector costs at captioning time, at a size where launch noise does not dominate.

    python bench/projector_speed.py --batches 1,256 --tokens 16

A ViT-B-16-sized encoder (open_clip ViT-B-16, random weights, 224 px) and an RWKV-7 L12-D768 decoder
(vocabulary 65,536, random weights) in bf16 under autocast, as caption.py runs them on CUDA. For each
projector: its parameters; the time to first token at batch 1 (a preprocessed image on the GPU to the
first token's id: encoder, projector, GPT-mode prefill of the prefix, which is a single position for the
state projector, and the argmax); and images per second at each batch size for a whole greedy caption of
exactly --tokens tokens (min_new_tokens = max_new_tokens, so every projector decodes the same number of
steps), the prefill in a CUDA graph where it fits and every RNN step in one. The baseline is the best
prefix projector of the same run; the ratio column compares with it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vision_rwkv.caption.generate import caption_features  # noqa: E402
from vision_rwkv.caption.model import CaptionModel  # noqa: E402
from vision_rwkv.config import (  # noqa: E402
    CaptionConfig,
    DecoderConfig,
    EncoderConfig,
    ProjectorConfig,
    SamplingConfig,
)
from vision_rwkv.lm.tokenizer import world_tokenizer  # noqa: E402

KINDS = ("linear", "mlp", "clipcap", "resampler", "state", "state_prefix")
PREFIX = {"clipcap": 10, "resampler": 32, "state_prefix": 4}


def build(kind: str, device) -> CaptionModel:
    cfg = CaptionConfig(encoder=EncoderConfig(model="ViT-B-16", pretrained=""),
                        projector=ProjectorConfig(kind=kind, prefix_len=PREFIX.get(kind, 10)),
                        decoder=DecoderConfig(n_layer=12, n_embd=768, head_size=64, vocab_size=65536))
    torch.manual_seed(0)
    model = CaptionModel(cfg, world_tokenizer())
    return model.to(device=device, dtype=torch.bfloat16).eval()


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs, after two warm-up runs (graph captures happen there)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure(kind: str, batches: list[int], tokens: int, reps: int) -> dict:
    device = torch.device("cuda")
    model = build(kind, device)
    size = model.encoder.image_size
    sampling = SamplingConfig(max_new_tokens=tokens, min_new_tokens=tokens)
    row = {"kind": kind, "params": sum(p.numel() for p in model.projector.parameters()),
           "prefix": model.prefix_len}

    def first_token(images):
        logits, _ = model.prefill(*model.encode(images))
        return logits.argmax(-1)

    with torch.autocast("cuda", dtype=torch.bfloat16):
        one = torch.randn(1, 3, *size, device=device, dtype=torch.bfloat16)
        row["ttft_ms"] = 1e3 * timed(lambda: first_token(one), reps)
        for B in batches:
            images = torch.randn(B, 3, *size, device=device, dtype=torch.bfloat16)
            seconds = timed(lambda x=images: caption_features(model, *model.encode(x), sampling), max(3, reps // 4))
            row[f"img_s_{B}"] = B / seconds
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("projector_speed.py: needs a CUDA device", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ViT-B-16 (224 px) + RWKV-7 L12-D768, bf16, "
          f"{args.tokens} tokens per caption")
    rows = []
    for kind in args.kinds.split(","):
        rows.append(measure(kind, batches, args.tokens, args.reps))
        torch.cuda.empty_cache()  # the last model's memory, before the next is built
    prefix_rows = [r for r in rows if not r["kind"].startswith("state")]
    best = min(prefix_rows, key=lambda r: r["ttft_ms"]) if prefix_rows else None
    head = "| projector | parameters | prefix | first token, B=1 (ms) | " + \
        " | ".join(f"images/s, B={B}" for B in batches) + " |"
    print(head)
    print("|---" * (4 + len(batches)) + "|")
    for r in rows:
        ratio = f" ({best['ttft_ms'] / r['ttft_ms']:.2f}x {best['kind']})" if best and r is not best else ""
        print(f"| {r['kind']} | {r['params']:,} | {r['prefix']} | {r['ttft_ms']:.2f}{ratio} | "
              + " | ".join(f"{r[f'img_s_{B}']:,.0f}" for B in batches) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
