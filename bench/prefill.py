"""The image-prefix prefill (GPT mode over the prefix), eager against a CUDA graph, side by side in one run.

    python bench/prefill.py [--batch-sizes 1 8 32 64] [--reps 20]

Model: ViT-B-16's 196 patch tokens through the mlp projector (196 prefix embeddings) into RWKV-7
L12-D768 V65536, random weights in bf16 under bf16 autocast (what caption.py runs on CUDA). Times are
medians of CUDA-event timings of prefill_runner(lm)(x) with graphs on and with VISION_RWKV_CUDA_GRAPHS=0,
after warm-up (the capture happens in the warm-up).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption_throughput import build_model  # noqa: E402
from wkv7 import median_ms  # noqa: E402

from vision_rwkv.lm.graphs import prefill_runner  # noqa: E402


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    model = build_model("cuda").to(torch.bfloat16)
    lm = model.decoder
    K = model.prefix_len + len(model.prompt_ids)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; prefix {K} positions, "
          f"RWKV-7 L{lm.config.n_layer}-D{lm.config.n_embd}, bf16 weights and autocast")
    print(f"{'batch':>6}{'eager ms':>10}{'graph ms':>10}{'speed-up':>10}{'graph ms/image':>16}")
    for B in args.batch_sizes:
        x = torch.randn(B, K, lm.config.n_embd, device="cuda", dtype=torch.bfloat16)
        row = {}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for mode in ("0", "1"):
                os.environ["VISION_RWKV_CUDA_GRAPHS"] = mode
                row[mode] = median_ms(lambda x=x: prefill_runner(lm)(x), reps=args.reps, warmup=3)
        print(f"{B:>6}{row['0']:10.2f}{row['1']:10.2f}{row['0'] / row['1']:9.1f}x{row['1'] / B:16.3f}")


if __name__ == "__main__":
    main()
