"""The frozen CLIP image encoder: the project's only open_clip import.

`ClipEncoder(cfg)` builds any open_clip model's image tower and returns, for a batch of preprocessed
images, its per-patch tokens (B, P, D_tokens) and its pooled, projected vector (B, D_pooled). The
model's own eval transform is `encoder.preprocess` (PIL image -> tensor).

A plain ViT whose weights do not come from an open_clip tag or file (random, or stored in our checkpoint,
as the demo model's are) is built by vision_rwkv.caption.vit, identical to open_clip's and without importing
it; everything else is built by open_clip, imported then.

Weights come from an open_clip pretrained tag (downloaded by open_clip into its cache), a local
checkpoint file, or a "local-dir:" folder given as the model name. `pretrained: ""` leaves the tower
randomly initialised: such an encoder cannot be re-created from its name, so checkpoints then store
its weights (see `CaptionModel.saved_state_dict`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..config import EncoderConfig
from ..errors import VisionRWKVError
from . import vit

CONFIG_DIR = vit.PROJECT_CONFIGS
_registered = False


def _register_project_configs() -> None:
    """Make the project's own small tower configs (vrwkv-*) known to open_clip by name."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def _create(cfg: EncoderConfig):
    """(image tower, preprocess) for the config."""
    model_cfg = None if cfg.model.startswith("local-dir:") else vit.model_config(cfg.model)
    if model_cfg is not None and not cfg.pretrained and vit.supports(model_cfg, cfg.image_size):
        tower = vit.ViTTower(model_cfg, cfg.image_size)
        return tower, vit.Preprocess(tower.image_size[0])
    return _create_with_open_clip(cfg)


def _create_with_open_clip(cfg: EncoderConfig):
    import open_clip

    _register_project_configs()
    pretrained = cfg.pretrained or None
    if cfg.model.startswith("local-dir:"):
        folder = cfg.model[len("local-dir:"):]
        if not (Path(folder) / "open_clip_config.json").is_file():
            raise VisionRWKVError(f"encoder.model {cfg.model!r}: expected a folder with open_clip_config.json")
        pretrained = None
    elif cfg.model not in open_clip.list_models():
        raise VisionRWKVError(
            f"encoder.model {cfg.model!r} is not an open_clip model; expected a name from "
            "open_clip.list_models() (e.g. ViT-B-16, ViT-L-14) or local-dir:/path"
        )
    if pretrained and not os.path.isfile(pretrained):
        tags = [t for m, t in open_clip.list_pretrained() if m == cfg.model]
        looks_like_file = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if pretrained not in tags and looks_like_file:
            raise VisionRWKVError(f"encoder.pretrained {pretrained!r} does not exist; expected a file or a tag")
        if pretrained not in tags:
            raise VisionRWKVError(
                f"encoder.pretrained {pretrained!r} is not a tag of {cfg.model}; expected one of {', '.join(tags)}"
                " or a checkpoint file"
            )
    # open_clip logs a warning for every randomly initialised model; ours are random on purpose.
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR if not pretrained else quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.model, pretrained=pretrained, force_image_size=cfg.image_size
        )
    except (RuntimeError, ValueError, FileNotFoundError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = f"{cfg.model!r} ({cfg.pretrained!r})"
        raise VisionRWKVError(f"cannot build the open_clip encoder {what}: {first}") from None
    finally:
        logging.getLogger().setLevel(quiet)
    return model.visual, preprocess


class ClipEncoder(nn.Module):
    """open_clip image tower -> (patch tokens (B,P,Dt), pooled (B,Dp)). Frozen unless cfg.freeze is False."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        visual, preprocess = _create(cfg)
        if not hasattr(visual, "output_tokens"):
            raise VisionRWKVError(
                f"encoder.model {cfg.model!r} has no per-patch token output; expected a ViT-style open_clip tower"
            )
        visual.output_tokens = True
        self.visual = visual
        self.preprocess = preprocess
        size = visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        with torch.no_grad():
            pooled, tokens = visual(torch.zeros(1, 3, *self.image_size))
        self.num_patches, self.token_dim = tokens.shape[1], tokens.shape[2]
        self.pooled_dim = pooled.shape[1]
        self.frozen = cfg.freeze
        if self.frozen:
            self.visual.requires_grad_(False)
            self.visual.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a frozen encoder stays in eval mode (no dropout, fixed norms) whatever the caller asks
            self.visual.eval()
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B,3,H,W), preprocessed -> tokens (B,P,Dt), pooled (B,Dp)."""
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            raise VisionRWKVError(
                f"encoder input must be (B, 3, {self.image_size[0]}, {self.image_size[1]}), got {tuple(images.shape)}"
            )
        dtype = next(self.visual.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if dtype in (torch.bfloat16, torch.float16):
                # A half-precision tower runs in its own dtype throughout, autocast or not: under autocast its
                # norms would return fp32, the residual stream would stay fp32, and every product would cast
                # its input back (a third of a ViT-B-16 forward at batch 256 on an H200).
                with torch.autocast(images.device.type, enabled=False):
                    pooled, tokens = self.visual(images.to(dtype))
            else:
                pooled, tokens = self.visual(images)
        return tokens, pooled

    def feature_key(self) -> str:
        """Names the features this encoder produces, for the feature cache: model, size and a digest of
        some weights (so a re-initialised or retrained random tower never reuses stale features)."""
        import hashlib

        digest = hashlib.sha256()
        params = list(self.visual.state_dict().values())
        for t in params[:4] + params[-4:]:
            digest.update(t.detach().float().cpu().numpy().tobytes())
        name = self.config.model.replace("/", "_").replace(":", "_")
        return f"{name}-{self.image_size[0]}x{self.image_size[1]}-{digest.hexdigest()[:16]}"
