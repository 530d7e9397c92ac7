"""Decoder checkpoints: official RWKV-7 and RWKV-4 .pth files and this project's own folders.

Our own format is a folder holding ``model.safetensors`` and ``config.yaml`` (plus ``tokenizer.json``
when the tokenizer is a file). Keys in model.safetensors are the official names, so conversion in
either direction is a rename-free copy. Folders are written to a temporary sibling and renamed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from .._fs import atomic_file, atomic_folder
from ..config import DecoderArch, DecoderConfig
from ..errors import VisionRWKVError
from .decoder import Decoder, build_decoder_model
from .tokenizer import check_fits

FORMAT = "vision_rwkv.decoder"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"

# Keys that identify other architectures, so a wrong file gets a name rather than a key list.
_OTHER_ARCHS = [
    ("blocks.0.att.time_maa_x", "RWKV-6 (x060), a generation this project does not support (RWKV-7 and RWKV-4 only)"),
    ("blocks.0.att.time_faaaa", "RWKV-5 (x052), a generation this project does not support (RWKV-7 and RWKV-4 only)"),
    ("transformer.h.0.attn.c_attn.weight", "GPT-2"),
    ("model.layers.0.self_attn.q_proj.weight", "a Llama-style transformer"),
    ("model.layers.0.attn.r_proj.weight", "a flash-linear-attention (Hugging Face) RWKV-7, not the official layout"),
    ("rwkv.blocks.0.attention.time_decay", "a transformers (Hugging Face) RWKV-4, not the official layout"),
]
# Layer 0 makes v_first and never reads its value-residual adapter; official files may omit it.
_OPTIONAL = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def _layers(sd) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit())


def infer_config(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> DecoderConfig:
    """The generation and shape (layers, width, head size, low-rank dims, ffn size, vocabulary) off the tensors."""
    for key, arch in _OTHER_ARCHS:
        if key in sd:
            raise VisionRWKVError(f"{source} is {arch} (it has {key}); expected an RWKV-7 or RWKV-4 checkpoint")
    if "blocks.0.att.time_first" in sd:
        return _infer_rwkv4(sd, source)
    for key in ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.ffn.key.weight"):
        if key not in sd:
            raise VisionRWKVError(f"{source} is not an RWKV-7 (x070) or RWKV-4 checkpoint: missing key {key}")
    n_layer = _layers(sd)
    _, head_size = sd["blocks.0.att.r_k"].shape
    vocab_size, n_embd = sd["emb.weight"].shape

    def lora_dim(name: str):  # the first layer that has this adapter tells its rank
        key = next((f"blocks.{i}.att.{name}" for i in range(n_layer) if f"blocks.{i}.att.{name}" in sd), None)
        return None if key is None else int(sd[key].shape[1])

    return DecoderConfig(
        vocab_size=int(vocab_size),
        n_layer=n_layer,
        n_embd=int(n_embd),
        head_size=int(head_size),
        dim_ffn=int(sd["blocks.0.ffn.key.weight"].shape[0]),
        d_decay_lora=lora_dim("w1"),
        d_aaa_lora=lora_dim("a1"),
        d_mv_lora=lora_dim("v1"),
        d_gate_lora=lora_dim("g1"),
    )


def _infer_rwkv4(sd, source: str) -> DecoderConfig:
    for key in ("blocks.0.att.ln_x.weight", "blocks.0.att.gate.weight"):
        if key in sd:  # RWKV-5.0 / 5.1 kept RWKV-4's time_first, and added a head norm and a gate
            raise VisionRWKVError(f"{source} is RWKV-5 (it has time_first and {key}), a generation this project "
                                  "does not support; expected an RWKV-7 or RWKV-4 checkpoint")
    for key in ("emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight"):
        if key not in sd:
            raise VisionRWKVError(f"{source} is not a complete RWKV-4 checkpoint: missing key {key}")
    vocab_size, n_embd = sd["emb.weight"].shape
    attention = sd["blocks.0.att.key.weight"].shape[0]
    if attention != n_embd:
        raise VisionRWKVError(f"{source}: the attention width {attention} differs from the embedding width {n_embd}; "
                              "expected RWKV-4's usual equal widths")
    return DecoderConfig(arch=DecoderArch.rwkv4, vocab_size=int(vocab_size), n_layer=_layers(sd), n_embd=int(n_embd),
                         dim_ffn=int(sd["blocks.0.ffn.key.weight"].shape[0]))


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise one line naming the first missing key, unexpected key or mismatched shape."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in sd and key not in _OPTIONAL:
            raise VisionRWKVError(f"{source} is missing key {key} (shape {tuple(tensor.shape)})")
    for key in sd:
        if key not in expected:
            raise VisionRWKVError(f"{source} has unexpected key {key}; it does not fit {_shape_name(model)}")
    for key, tensor in sd.items():
        want = tuple(expected[key].shape)
        if tuple(tensor.shape) != want:
            raise VisionRWKVError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, expected {want} for {_shape_name(model)}"
            )


def _shape_name(model) -> str:
    c = getattr(model, "config", None)
    return c.describe() if isinstance(c, DecoderConfig) else type(model).__name__


def _normalise(sd: dict[str, torch.Tensor], model: Decoder) -> dict[str, torch.Tensor]:
    """Accept the squeezed shapes some converters write (C,) for (1,1,C); fill layer 0's unused adapter."""
    expected = model.state_dict()
    out = {}
    for key, t in sd.items():
        want = expected.get(key)
        if want is not None and t.shape != want.shape and t.numel() == want.numel() and t.dim() < want.dim():
            t = t.reshape(want.shape)
        out[key] = t
    for key in _OPTIONAL:
        if key not in out and key in expected:
            out[key] = torch.zeros_like(expected[key])
    return out


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds here; the user needs the first line only
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise VisionRWKVError(f"cannot read {path} as a PyTorch checkpoint: {first}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VisionRWKVError(f"{path} does not hold a state dict of tensors; expected an official RWKV-7 or "
                              "RWKV-4 .pth")
    return sd


def load_official(path, *, device=None, dtype=None, wkv_impl: str = "auto") -> Decoder:
    """Load an official RWKV-7 or RWKV-4 .pth (BlinkDL key names and shapes) as an RWKV7 or RWKV4 module."""
    path = Path(path)
    sd = _read_pth(path)
    cfg = infer_config(sd, str(path))
    cfg.wkv_impl = wkv_impl
    return build_decoder(cfg, sd, str(path), device, dtype)


def build_decoder(cfg: DecoderConfig, sd, source: str, device, dtype) -> Decoder:
    model = build_decoder_model(cfg, init=False)
    sd = _normalise(sd, model)
    check_state_dict(model, sd, source)
    # Keep the stored dtype unless asked otherwise (official files are usually bf16).
    model.to(dtype=dtype or sd["emb.weight"].dtype)
    model.load_state_dict(sd)
    if device is not None:
        model.to(device)
    return model.eval()


def save_official(model: Decoder, path) -> None:
    """Write the official .pth layout of the model's generation (bf16 by default in RWKV-LM; we keep the
    model's dtype)."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(path) as tmp:
        torch.save(sd, tmp)


def save_decoder(model: Decoder, folder, *, tokenizer=None, extra_config: dict | None = None) -> Path:
    """Write our own format: model.safetensors + config.yaml (+ tokenizer), atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "decoder": model.config.to_dict()}
    if extra_config:
        config.update(extra_config)
    with atomic_folder(folder) as tmp:
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        if tokenizer is not None:
            check_fits(tokenizer, model.config.vocab_size)
            config["tokenizer"] = tokenizer.save(tmp)
        (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def read_folder_config(folder: Path) -> dict:
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise VisionRWKVError(f"{folder} has no {CONFIG}; expected a vision_rwkv checkpoint folder")
    try:
        config = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as e:
        raise VisionRWKVError(f"{cfg_path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict) or "decoder" not in config:
        raise VisionRWKVError(f"{cfg_path} has no 'decoder' section; expected a vision_rwkv checkpoint config")
    return config


def load_folder(folder, *, device=None, dtype=None, wkv_impl: str | None = None) -> Decoder:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_folder_config(folder)
    cfg = DecoderConfig.from_dict(config["decoder"])
    if wkv_impl is not None:
        cfg.wkv_impl = wkv_impl
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise VisionRWKVError(f"{folder} has no {WEIGHTS}")
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise VisionRWKVError(f"cannot read {weights}: {str(e).splitlines()[0]}") from None
    if any(k.startswith("decoder.") for k in sd):  # a captioning checkpoint: take its decoder
        sd = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    return build_decoder(cfg, sd, str(weights), device, dtype)
