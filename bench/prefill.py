"""The image-prefix prefill (GPT mode over the prefix): plain eager, plain in a CUDA graph, and the fused
operations (what captioning runs), side by side in one run.

    python bench/prefill.py [--batch-sizes 1 8 32 64 256] [--reps 20]

Model: ViT-B-16's 196 patch tokens through the mlp projector (196 prefix embeddings) into RWKV-7
L12-D768 V65536, random weights in bf16 under bf16 autocast (what caption.py runs on CUDA). Times are
medians of CUDA-event timings of prefill_runner(lm)(x): "eager" with VISION_RWKV_CUDA_GRAPHS=0 (lm(...)'s
PyTorch operations), "graph" with VISION_RWKV_FUSED_STEP=0 (the same operations captured in a graph, up to
MAX_PREFILL_TOKENS tokens, eager above), "fused" the default (engine.StepEngine.prefill: in a graph up to
MAX_PREFILL_TOKENS, eagerly above), after warm-up (the capture happens in the warm-up).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption_throughput import build_model  # noqa: E402
from wkv7 import median_ms  # noqa: E402

from vision_rwkv.lm.graphs import prefill_runner  # noqa: E402


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64, 256])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    model = build_model("cuda").to(torch.bfloat16)
    lm = model.decoder
    K = model.prefix_len + len(model.prompt_ids)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; prefix {K} positions, "
          f"RWKV-7 L{lm.config.n_layer}-D{lm.config.n_embd}, bf16 weights and autocast")
    print(f"{'batch':>6}{'eager ms':>10}{'graph ms':>10}{'fused ms':>10}{'vs eager':>10}{'vs graph':>10}"
          f"{'fused ms/image':>16}")
    modes = {"eager": {"VISION_RWKV_CUDA_GRAPHS": "0", "VISION_RWKV_FUSED_STEP": "1"},
             "graph": {"VISION_RWKV_CUDA_GRAPHS": "1", "VISION_RWKV_FUSED_STEP": "0"},
             "fused": {"VISION_RWKV_CUDA_GRAPHS": "1", "VISION_RWKV_FUSED_STEP": "1"}}
    for B in args.batch_sizes:
        x = torch.randn(B, K, lm.config.n_embd, device="cuda", dtype=torch.bfloat16)
        row = {}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for mode, env in modes.items():
                os.environ.update(env)
                row[mode] = median_ms(lambda x=x: prefill_runner(lm)(x), reps=args.reps, warmup=3)
        print(f"{B:>6}{row['eager']:10.2f}{row['graph']:10.2f}{row['fused']:10.2f}"
              f"{row['eager'] / row['fused']:9.1f}x{row['graph'] / row['fused']:9.1f}x{row['fused'] / B:16.3f}")


if __name__ == "__main__":
    main()
