"""Train a captioning model: Hydra config -> vision_rwkv.config.CaptionConfig -> vision_rwkv.train.

    python train_caption.py experiment=shapes_demo
    python train_caption.py experiment=coco_vitl14_rwkv7_0.4b init_decoder=/models/RWKV-x070-World-0.4B.pth
    python train_caption.py experiment=shapes_demo trainer.resume=true          # continue a stopped run
    torchrun --nproc_per_node=2 train_caption.py experiment=shapes_demo         # DistributedDataParallel

Configs live in conf/ (groups encoder, projector, decoder, data, sampling, optim, trainer, experiment).
A misspelt key or a wrong type fails at compose time: the schema is the CaptionConfig dataclass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vision_rwkv.config import CaptionConfig, caption_config_from_dict
from vision_rwkv.errors import VisionRWKVError, short_warnings

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
ConfigStore.instance().store(name="caption_schema", node=CaptionConfig)


def to_caption_config(cfg: DictConfig) -> CaptionConfig:
    """The composed Hydra config as the library's dataclass (resolved, no OmegaConf inside)."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    data.pop("hydra", None)
    return caption_config_from_dict(data)


def run(cfg: DictConfig) -> dict:
    import os

    from vision_rwkv.train import train

    caption_cfg = to_caption_config(cfg)
    last = train(caption_cfg)
    if os.environ.get("RANK", "0") == "0" and last:
        out = Path(caption_cfg.trainer.out_dir) / "checkpoints"
        latest = (out / "latest").read_text().strip() if (out / "latest").is_file() else None
        print(f"train_caption.py: step {last['step']} of {caption_cfg.trainer.max_steps}, loss {last['loss']:.4f}"
              + (f"; checkpoint {out / latest}" if latest else ""), file=sys.stderr)
    return last


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose(config_name="train", overrides=list(overrides))


def main(overrides: list[str] | None = None) -> int:
    """In-process entry point (tests): compose with these overrides and train. Returns the exit code."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        run(compose(overrides or []))
    except (VisionRWKVError, HydraException, OmegaConfBaseException) as e:
        print(f"train_caption.py: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


@hydra.main(config_path="conf", config_name="train", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    short_warnings("train_caption.py")
    try:
        run(cfg)
    except VisionRWKVError as e:
        print(f"train_caption.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _hydra_main()
