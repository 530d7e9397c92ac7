"""The one table of decoder checkpoint formats: what a path holds, and how it becomes a decoder (RWKV7 or RWKV4).

    load_decoder(path_or_hub_name)      the format is recognised from the content, in the order of FORMATS

| format | recognised by |
|---|---|
| vision_rwkv folder (decoder or caption checkpoint) | config.yaml beside model.safetensors |
| Hugging Face RWKV-7, flash-linear-attention layout | config.json with model_type "rwkv7" |
| Hugging Face RWKV-4, transformers' RwkvForCausalLM | config.json with model_type "rwkv" |
| official RWKV-7 or RWKV-4 .pth (BlinkDL) | any other file: a PyTorch state dict, the generation from its keys |

RWKV-5 and RWKV-6 files are recognised by their keys and refused by name.
A name that is not a local path but looks like "org/name" is fetched from the Hugging Face Hub first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import VisionRWKVError
from ..hub import resolve
from .checkpoint import CONFIG, WEIGHTS, build_decoder, infer_config, load_folder, load_official
from .decoder import Decoder
from .hf import is_hf_folder, is_hf_rwkv4_folder, read_hf


def _is_our_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def _is_our_weights(path: Path) -> bool:
    return path.is_file() and path.name == WEIGHTS and (path.parent / CONFIG).is_file()


def load_hf(path: Path, *, device=None, dtype=None, wkv_impl=None) -> Decoder:
    sd = read_hf(path)
    cfg = infer_config(sd, str(path))
    cfg.wkv_impl = wkv_impl or "auto"
    return build_decoder(cfg, sd, str(path), device, dtype)


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[Path], bool]
    load: Callable[..., Decoder]  # (path, *, device, dtype, wkv_impl) -> Decoder


FORMATS = [
    Format("vision_rwkv checkpoint folder", _is_our_folder, load_folder),
    Format("vision_rwkv model.safetensors", _is_our_weights, lambda p, **kw: load_folder(p.parent, **kw)),
    Format("Hugging Face RWKV-7 (flash-linear-attention layout)", is_hf_folder, load_hf),
    Format("Hugging Face RWKV-4 (transformers' RwkvForCausalLM)", is_hf_rwkv4_folder, load_hf),
    Format("official RWKV-7 or RWKV-4 .pth", Path.is_file,
           lambda p, wkv_impl=None, **kw: load_official(p, wkv_impl=wkv_impl or "auto", **kw)),
]


def detect(path: Path) -> Format:
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt
    names = "; ".join(f.name for f in FORMATS)
    raise VisionRWKVError(f"{path} is a folder of no known decoder format; expected one of: {names}")


def load_decoder(path, *, device=None, dtype=None, wkv_impl: str | None = None) -> Decoder:
    """Load an RWKV-7 or RWKV-4 decoder from any format of FORMATS, a local path or a Hugging Face Hub name.

    The weights keep their stored dtype unless `dtype` is given; `device` defaults to the CPU.
    """
    path = resolve(path, "an RWKV-7 or RWKV-4 .pth file, a checkpoint folder or a Hugging Face Hub model")
    return detect(path).load(path, device=device, dtype=dtype, wkv_impl=wkv_impl)
