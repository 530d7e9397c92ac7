"""The COCO recipe at its real size, measured on synthetic COCO-shaped data, and its own wall time (issue 19).

    python bench/coco_recipe.py [--train-images 2048 --test-images 256 --steps 30 --big 1.5b,2.9b] [--json F]
    python bench/coco_recipe.py --device cpu --smoke          # a tiny encoder and decoder: the code path only

The recipe is experiment=coco_vitl14_rwkv7_0.4b (ViT-L/14 frozen, a resampler to 32 prefix tokens, RWKV-7
0.4B, batch 64, 5,000 projector-only steps then 25,000 with everything trained, an evaluation every 2,000
steps), with random weights: none can be downloaded here. Its data are data_prep/make_coco_synthetic.py's
640x480 JPEGs with 5 captions each, in a Karpathy JSON. Stages, in one process, through the library's own
code (the config composed as train_caption.py composes it):

  cache     feature_cache() of the training split: JPEG decoding, ViT-L/14, fp16 tokens written with
            datasets (cache_features.py's work); images/s
  train     Trainer._train_step on the cached features, in each stage of the recipe (projector only, then
            all): samples/s (median over --steps steps after 3 untimed ones) and peak GPU memory
  eval      Captioner.caption_paths of the test split with beam 3 (what eval_coco.py runs with --num-beams 3),
            bf16 weights, batch 64: images/s
  big       with decoder=rwkv7_1.5b and rwkv7_2.9b, everything trained, with and without
            trainer.activation_checkpointing: samples/s and peak GPU memory (--big; '' skips it)

From these, the recipe's wall time: caching the Karpathy training split (113,287 images), 5,000 projector
steps and 25,000 full steps of 64 samples (30,000 x 64 = 1.92M samples, about 3.4 epochs of the 566,747
(image, caption) pairs), and its 15 evaluations of data.val_subset images at the beam-3 rate (the recipe's
validation decodes with its own sampling config; beam 3 is the figure asked for). Figures are one run's;
the projection is arithmetic on them, not a measured run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch

from vision_rwkv import Captioner, SamplingConfig  # noqa: E402
from vision_rwkv.caption.encoder import ClipEncoder  # noqa: E402
from vision_rwkv.cli.prep import make_coco_synthetic  # noqa: E402
from vision_rwkv.cli.train import compose, to_caption_config  # noqa: E402
from vision_rwkv.train.data import get_split, load_source  # noqa: E402
from vision_rwkv.train.features import feature_cache  # noqa: E402
from vision_rwkv.train.trainer import Trainer, seed_everything  # noqa: E402

KARPATHY_TRAIN_IMAGES = 113_287  # train + restval
KARPATHY_TRAIN_PAIRS = 566_747
SMOKE = ["encoder=tiny", "decoder=rwkv7_tiny", "decoder.vocab_size=65536", "projector.prefix_len=4",
         "data.batch_size=4"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train-images", type=int, default=2048)
    p.add_argument("--test-images", type=int, default=256)
    p.add_argument("--steps", type=int, default=30, help="timed training steps per stage")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers (cache and eval)")
    p.add_argument("--big", default="1.5b,2.9b", help="larger decoders for the memory figures: conf/decoder's "
                                                       "rwkv7_<size> ('' : none)")
    p.add_argument("--workdir", default=None, help="where the data and the cache go (default: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="a tiny encoder and decoder (tests and CPU runs)")
    p.add_argument("--json", default=None, help="write every figure to this file")
    args = p.parse_args(argv)
    if min(args.train_images, args.test_images, args.steps) < 1 or args.workers < 0:
        p.error("--train-images, --test-images and --steps must be at least 1, --workers at least 0")
    args.big_list = [b.strip() for b in args.big.split(",") if b.strip()]
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def quick_init():
    """RWKV-7's official init makes its matrices orthogonal by QR, which takes minutes on a CPU for a 2.9B
    decoder; the memory and speed figures do not depend on the values, so the larger decoders get small
    normal values instead (the recipe's own 0.4B decoder keeps the official init)."""
    from vision_rwkv.lm import rwkv7

    def small_normal_(model):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        return model

    real = rwkv7.init_official_
    rwkv7.init_official_ = small_normal_
    try:
        yield
    finally:
        rwkv7.init_official_ = real


def config(root: Path, args, *extra):
    overrides = ["experiment=coco_vitl14_rwkv7_0.4b", "init_decoder=", "encoder.pretrained=",
                 f"data.path={root / 'dataset_coco.json'}", f"data.image_root={root / 'images'}",
                 f"data.feature_cache={root / 'features'}", f"data.num_workers={args.workers}",
                 f"trainer.out_dir={root / 'run'}", "trainer.overwrite=true", f"trainer.device={args.device}",
                 "trainer.progress=false", *(SMOKE if args.smoke else []), *extra]
    return to_caption_config(compose(overrides))


def cache_stage(cfg, device) -> dict:
    seed_everything(cfg.trainer.seed)
    encoder = ClipEncoder(cfg.encoder).to(device).eval()
    rows = get_split(load_source(cfg.data), cfg.data.train_split)
    sync(device)
    start = time.perf_counter()
    feature_cache(encoder, rows, cfg.data.feature_cache, cfg.data.train_split, device=device,
                  num_workers=cfg.data.num_workers)
    sync(device)
    seconds = time.perf_counter() - start
    folder = Path(cfg.data.feature_cache) / encoder.feature_key() / cfg.data.train_split
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    del encoder
    return {"images": len(rows), "seconds": seconds, "images_per_s": len(rows) / seconds,
            "bytes_per_image": size / len(rows)}


def train_stages(cfg, device, steps: int, stages=("projector", "all")) -> tuple[dict, Trainer]:
    """samples/s and peak memory of each stage's steps; -> (figures, the trainer, still open)."""
    trainer = Trainer(cfg)
    batches = trainer._batches()
    out = {}
    for stage in stages:
        trainer._set_stage(stage)
        for _ in range(3):  # untimed: kernels, allocator, optimizer state
            trainer._train_step(batches)
        reset_peak(device)
        times, samples = [], 0
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            _, _, seen = trainer._train_step(batches)
            sync(device)
            times.append(time.perf_counter() - start)
            samples = seen
        out[stage] = {"samples_per_s": samples / statistics.median(times), "batch": samples,
                      "peak_gib": peak_gib(device)}
    return out, trainer


def eval_stage(model, cfg, device, workers: int) -> dict:
    rows = get_split(load_source(cfg.data), cfg.data.test_split)
    paths = list(rows["image"])  # absolute paths (train.data's columns)
    cuda = device.type == "cuda"
    model = model.eval().to(torch.bfloat16) if cuda else model.eval()
    captioner = Captioner(model, device, autocast=cuda)
    sampling = SamplingConfig(strategy="beam", num_beams=3, max_new_tokens=cfg.sampling.max_new_tokens)
    list(captioner.caption_paths(paths[:64], sampling, batch_size=64, num_workers=workers))  # warm-up
    sync(device)
    start = time.perf_counter()
    results = list(captioner.caption_paths(paths, sampling, batch_size=64, num_workers=workers))
    sync(device)
    seconds = time.perf_counter() - start
    assert all(r.error is None for r in results)
    return {"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds,
            "max_new_tokens": sampling.max_new_tokens,
            "mean_tokens": statistics.mean(len(r.caption.split()) for r in results)}


def projection(cfg, cache, train, evaluation) -> dict:
    t = cfg.trainer
    batch = cfg.data.batch_size * cfg.optim.grad_accum
    proj_steps, all_steps = t.projector_steps, t.max_steps - t.projector_steps
    evals = t.max_steps // t.eval_every if t.eval_every else 0
    out = {"cache_s": KARPATHY_TRAIN_IMAGES / cache["images_per_s"],
           "projector_s": proj_steps * batch / train["projector"]["samples_per_s"],
           "all_s": all_steps * batch / train["all"]["samples_per_s"],
           "eval_s": evals * cfg.data.val_subset / evaluation["images_per_s"],
           "samples": t.max_steps * batch, "epochs": t.max_steps * batch / KARPATHY_TRAIN_PAIRS,
           "evaluations": evals, "val_subset": cfg.data.val_subset}
    out["total_s"] = out["cache_s"] + out["projector_s"] + out["all_s"] + out["eval_s"]
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="coco_recipe_") as tmp:
        root = Path(args.workdir or tmp)
        start = time.perf_counter()
        make_coco_synthetic.main(["--out", str(root), "--train", str(args.train_images), "--val", "8",
                                  "--test", str(args.test_images)])
        print(f"synthetic COCO: {args.train_images} train / {args.test_images} test JPEGs (640x480) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        cfg = config(root, args)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"device {name}, torch {torch.__version__}; encoder {cfg.encoder.model}, projector "
              f"{cfg.projector.kind}, decoder L{cfg.decoder.n_layer}-D{cfg.decoder.n_embd} V{cfg.decoder.vocab_size}, "
              f"batch {cfg.data.batch_size}, random weights", flush=True)
        report = {"device": name, "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items()
                                                                          if k != "big_list"}}
        report["cache"] = cache = cache_stage(cfg, device)
        print(f"cache: {cache['images']} images in {cache['seconds']:.1f} s, {cache['images_per_s']:.1f} "
              f"images/s, {cache['bytes_per_image']:,.0f} bytes an image on disk", flush=True)
        train, trainer = train_stages(cfg, device, args.steps)
        report["train"] = train
        for stage, r in train.items():
            mem = f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
            print(f"train, stage {stage}: {r['samples_per_s']:.1f} samples/s (batch {r['batch']}){mem}", flush=True)
        model = trainer.model
        trainer.close()
        report["eval"] = ev = eval_stage(model, cfg, device, args.workers)
        print(f"eval, beam 3, batch 64: {ev['images']} images in {ev['seconds']:.1f} s, {ev['images_per_s']:.1f} "
              f"images/s", flush=True)
        del model, trainer
        report["projection"] = p = projection(cfg, cache, train, ev)
        print(f"the recipe's wall time, projected: cache {p['cache_s'] / 3600:.2f} h + projector stage "
              f"{p['projector_s'] / 3600:.2f} h + full stage {p['all_s'] / 3600:.2f} h + {p['evaluations']} "
              f"evaluations of {p['val_subset']} images {p['eval_s'] / 3600:.2f} h = {p['total_s'] / 3600:.2f} h "
              f"({p['samples']:,} samples, {p['epochs']:.2f} epochs)", flush=True)
        report["big"] = []
        for size in args.big_list:
            for ac in (False, True):
                reset_peak(device)
                cfg_big = config(root, args, f"decoder=rwkv7_{size}",
                                 f"trainer.activation_checkpointing={str(ac).lower()}")
                with quick_init():
                    figures, big = train_stages(cfg_big, device, max(3, args.steps // 3), stages=("all",))
                big.close()
                del big
                row = {"decoder": size, "activation_checkpointing": ac, **figures["all"]}
                report["big"].append(row)
                mem = f", peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else ""
                print(f"decoder {size}, everything trained, activation checkpointing {ac}: "
                      f"{row['samples_per_s']:.1f} samples/s{mem}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
