"""The CLIP vision transformer and its eval preprocessing, with no open_clip import.

open_clip is the reference: `ViTTower` has the parameters, the names, the initialisation and the forward
pass of open_clip's VisionTransformer for plain ViT configs (tests/test_vit.py holds the two side by side),
so open_clip weights load into it as they are, and `Preprocess` gives the same tensors as open_clip's eval
transform. Building the tower this way skips open_clip's import (torchvision models, timm, transformers:
about 2.6 s on a 2-core CPU) and its text tower, which a captioner never runs.

A config this module does not cover (timm or ResNet towers, attentional pooling, custom attention blocks,
sin-cos position embeddings) is built by open_clip instead: see `supports`.
"""

from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import VisionRWKVError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PROJECT_CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "clip_configs"

# vision_cfg keys and the values this tower builds; any other value falls back to open_clip
_PLAIN = {"timm_model_name": None, "attentional_pool": False, "block_type": (None, "default"), "qk_norm": False,
          "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
          "scale_fc": False, "pos_embed_type": "learnable", "act_kwargs": None, "norm_kwargs": None,
          "patch_dropout": 0.0}
_KNOWN = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "ls_init_value", "no_ln_pre",
          "final_ln_after_pool", "pool_type", "output_tokens", "attn_pooler_queries", "attn_pooler_heads", *_PLAIN}


# ---- model configs ----------------------------------------------------------------------------------


def model_config(name: str) -> dict | None:
    """An open_clip model config by name (the project's own vrwkv-* configs, then open_clip's), read from its
    JSON file without importing open_clip; None when there is no such file."""
    for folder in (PROJECT_CONFIGS, _open_clip_configs()):
        if folder is not None and (folder / f"{name}.json").is_file():
            return json.loads((folder / f"{name}.json").read_text())
    return None


def _open_clip_configs() -> Path | None:
    spec = importlib.util.find_spec("open_clip")  # locates the package; runs none of it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model_configs"


def supports(model_cfg: dict, image_size=None) -> bool:
    """True when ViTTower builds this open_clip model config exactly."""
    vision = model_cfg.get("vision_cfg", {})
    if not isinstance(vision.get("layers", 12), int) or set(vision) - _KNOWN:
        return False
    for key, plain in _PLAIN.items():
        ok = plain if isinstance(plain, tuple) else (plain,)
        if vision.get(key, ok[0]) not in ok:
            return False
    if vision.get("pool_type", "tok") not in ("tok", "avg"):
        return False
    size = image_size if image_size is not None else vision.get("image_size", 224)
    return _square(size) is not None


def _square(size) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    return None


# ---- the tower --------------------------------------------------------------------------------------


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in the input's dtype's promotion with the weights, returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm self-attention and MLP, each added back to the residual stream (optionally layer-scaled)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, ls_init: float | None, act: type[nn.Module]):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = LayerScale(width, ls_init) if ls_init is not None else nn.Identity()
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act()),
                                              ("c_proj", nn.Linear(hidden, width))]))
        self.ls_2 = LayerScale(width, ls_init) if ls_init is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,L,W)
        h = self.ln_1(x)
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Blocks(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, ls_init: float | None, act):
        super().__init__()
        self.resblocks = nn.ModuleList([Block(width, heads, mlp_ratio, ls_init, act) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ViTTower(nn.Module):
    """images (B,3,S,S) -> (pooled (B,D), patch tokens (B,P,W)) when output_tokens, else pooled only.

    Modules are made in open_clip's order, so a seeded random tower is open_clip's random tower too.
    """

    def __init__(self, model_cfg: dict, image_size: int | None = None):
        super().__init__()
        v = model_cfg.get("vision_cfg", {})
        size = _square(image_size if image_size is not None else v.get("image_size", 224))
        patch = int(v.get("patch_size", 16))
        width = int(v.get("width", 768))
        self.image_size = (size, size)
        self.output_tokens = bool(v.get("output_tokens", False))
        self.pool_type = v.get("pool_type", "tok")
        self.final_ln_after_pool = bool(v.get("final_ln_after_pool", False))
        grid = size // patch
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.Identity() if v.get("no_ln_pre", False) else LayerNorm(width)
        act = QuickGELU if model_cfg.get("quick_gelu", False) else nn.GELU
        self.transformer = Blocks(width, int(v.get("layers", 12)), width // int(v.get("head_width", 64)),
                                  float(v.get("mlp_ratio", 4.0)), v.get("ls_init_value"), act)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, int(model_cfg.get("embed_dim", 512))))

    def forward(self, images: torch.Tensor):
        x = self.conv1(images)  # (B,W,g,g)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B,P,W)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B,1+P,W)
        x = self.transformer(self.ln_pre(x))
        if self.final_ln_after_pool:
            pooled, tokens = self._pool(x)
            pooled = self.ln_post(pooled)
        else:
            pooled, tokens = self._pool(self.ln_post(x))
        pooled = pooled @ self.proj  # (B,D)
        return (pooled, tokens) if self.output_tokens else pooled

    def _pool(self, x: torch.Tensor):
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1), x[:, 1:]
        return x[:, 0], x[:, 1:]


# ---- preprocessing ----------------------------------------------------------------------------------


class Preprocess:
    """PIL image -> (3,S,S) float tensor: open_clip's eval transform (resize the shortest side with PIL's
    antialiased bicubic or bilinear filter and centre-crop, or squash to the size; scale to [0,1], normalise),
    without torchvision. The defaults are open_clip's for a model without pretrained weights."""

    def __init__(self, size: int, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation: str = "bicubic",
                 resize_mode: str = "shortest"):
        from PIL import Image

        self.size, self.resize_mode = size, resize_mode
        self.mean = torch.tensor(_three(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(_three(std), dtype=torch.float32).view(3, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.filter = Image.BILINEAR if interpolation == "bilinear" else Image.BICUBIC

    def __getstate__(self) -> dict:  # loader workers and the server's HTTP processes get no device copies
        return {**self.__dict__, "_on_device": {}}

    def __call__(self, image) -> torch.Tensor:
        return self.normalize(self.pixels(image))

    def pixels(self, image) -> torch.Tensor:
        """The resize and crop only: PIL image -> (3,S,S) uint8. A quarter of the float tensor's bytes, so
        loaders hand these over and normalize() runs where the model is (the same values: the same
        operations, each exactly rounded)."""
        s = self.size
        if self.resize_mode == "squash":
            image = image.resize((s, s), self.filter)
        else:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s * long / short)
            if (short, long) != (s, new_long):
                image = image.resize((s, new_long) if w <= h else (new_long, s), self.filter)
            image = _center_crop(image, s)
        x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8, copy=True))
        return x.permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (3,S,S) or (B,3,S,S), on any device -> the float32 tensor __call__ gives."""
        if pixels.dtype != torch.uint8 or pixels.dim() not in (3, 4) or pixels.shape[-3:] != (3, self.size, self.size):
            raise VisionRWKVError(f"normalize takes uint8 pixels (3, {self.size}, {self.size}) or "
                                  f"(B, 3, {self.size}, {self.size}) from pixels(); got {pixels.dtype} "
                                  f"{tuple(pixels.shape)}")
        x = pixels.float().div_(255)
        mean, std = self._constants(x.device)
        return x.sub_(mean).div_(std)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std on device, copied there once: a copy at every call would make the host wait for the
        device each time (a blocking host-to-device copy), stalling whoever launches the encoder."""
        device = torch.device(device)
        cached = self._on_device.get(device)
        if cached is None:
            cached = self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return cached


def _center_crop(image, size: int):
    w, h = image.size
    if w < size or h < size:  # pad with black, as torchvision does, then crop
        from PIL import Image

        canvas = Image.new(image.mode, (max(w, size), max(h, size)))
        canvas.paste(image, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        image, (w, h) = canvas, canvas.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _three(values) -> tuple:
    return tuple(values) if isinstance(values, (list, tuple)) else (values,) * 3
