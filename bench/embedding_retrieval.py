"""Free sentence embeddings and caption scoring, measured on held-out shapes scenes with the demo model.

    python bench/embedding_retrieval.py [--scenes 200] [--seed 2026] [--device cpu] [--checkpoint DIR]

Retrieval: each scene's caption (shapes named left to right) is a query; the keys are every scene's caption
with its parts named in another order (right to left, or a lone shape's place first). recall@1 is the share
of queries whose nearest key (cosine) describes the same scene, for each pooling of
vision_rwkv.lm.embedding; chance is 1 / scenes. It decides the default pooling. A second figure uses a
same-order paraphrase as the keys ("there is " before the caption), an easier task.

Matching: Captioner.score ranks, per image, the true caption among hard candidates (exactly one attribute
of one shape changed: colour, kind, size or position) and among random candidates (other scenes' captions),
with the length-normalised score (mean log-prob per token) and with the plain sum. The scenes come from
random streams make_shapes.py never uses, so the demo model never saw them.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch

from vision_rwkv.caption.captioner import Captioner
from vision_rwkv.lm.embedding import POOLS, embed_texts
from vision_rwkv.synthetic.candidates import (
    hard_negatives,
    held_out_scenes,
    other_order_caption,
    true_caption,
    write_scene_images,
)
from vision_rwkv.synthetic.shapes import make_captions


def retrieval_recall(lm, tokenizer, scenes, pool: str, keys_from=other_order_caption) -> float:
    """recall@1 of same-scene retrieval across word orders (see the module docstring); keys_from(objects)
    gives the key captions."""
    queries = embed_texts(lm, tokenizer, [true_caption(s) for s in scenes], pool=pool)  # (N,C), unit rows
    keys = embed_texts(lm, tokenizer, [keys_from(s) for s in scenes], pool=pool)
    best = (queries @ keys.T).argmax(dim=1)
    return float((best == torch.arange(len(scenes))).float().mean())


def same_order_paraphrase(objects) -> str:
    """The true caption after "there is " / "there are ": another wording, the same order."""
    return make_captions(objects)[1 if len(objects) == 1 else 4]


def candidate_sets(scenes, kind: str, n_random: int = 19, seed: int = 0) -> list[list[str]]:
    """Per scene, its true caption first, then the hard negatives (kind="hard") or n_random other scenes'
    true captions (kind="random")."""
    truths = [true_caption(s) for s in scenes]
    if kind == "hard":
        return [[truths[i]] + hard_negatives(s) for i, s in enumerate(scenes)]
    rng = random.Random(seed)
    out = []
    for i in range(len(scenes)):
        others = rng.sample([j for j in range(len(scenes)) if truths[j] != truths[i]], n_random)
        out.append([truths[i]] + [truths[j] for j in others])
    return out


def matching_accuracy(captioner, paths, candidates, normalize: bool = True) -> float:
    """Share of images whose true caption (first of its candidates) gets the highest score."""
    pairs = [(p, c) for p, cands in zip(paths, candidates) for c in cands]
    scores = captioner.score([p for p, _ in pairs], [c for _, c in pairs], normalize=normalize, batch_size=64)
    hits, start = 0, 0
    for cands in candidates:
        hits += int(scores[start:start + len(cands)].argmax()) == 0
        start += len(cands)
    return hits / len(candidates)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=2026, help="held-out stream; make_shapes.py never uses it")
    ap.add_argument("--checkpoint", default=None, help="a caption checkpoint; default: the demo model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-score", action="store_true", help="only the retrieval figures")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    captioner = Captioner.load(args.checkpoint, device=args.device, dtype="fp32")
    lm, tokenizer = captioner.model.decoder, captioner.model.tokenizer
    scenes = held_out_scenes(args.scenes, args.seed)
    print(f"{args.scenes} held-out shapes scenes (seed {args.seed}), device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for pool in POOLS:
        t = time.perf_counter()
        r = retrieval_recall(lm, tokenizer, scenes, pool)
        p = retrieval_recall(lm, tokenizer, scenes, pool, same_order_paraphrase)
        print(f"retrieval recall@1, pool={pool}: another order {r:.3f}, same-order paraphrase {p:.3f} "
              f"(chance {1 / args.scenes:.3f}; {time.perf_counter() - t:.1f} s)")
    if args.no_score:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_scene_images(scenes, tmp)
        for kind in ("hard", "random"):
            candidates = candidate_sets(scenes, kind)
            mean = sum(map(len, candidates)) / len(candidates)
            for normalize in (True, False):
                t = time.perf_counter()
                acc = matching_accuracy(captioner, paths, candidates, normalize)
                print(f"true caption ranked first among {kind} candidates ({mean:.1f} per image), "
                      f"{'mean log-prob per token' if normalize else 'summed log-prob'}: {acc:.3f} "
                      f"(chance {1 / mean:.3f}; {time.perf_counter() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
