"""RWKV-7 in the Hugging Face layout of flash-linear-attention (fla), converted to and from the official one.

An fla checkpoint is a folder: config.json (model_type "rwkv7", RWKV7Config's fields) and the weights
(model.safetensors, shards with an index, or pytorch_model.bin) under fla's names:

    official (BlinkDL)                  fla (Hugging Face)
    emb.weight                          model.embeddings.weight
    ln_out.*, head.weight               model.norm.*, lm_head.weight
    blocks.i.ln0 / ln1 / ln2            model.layers.i.pre_norm / attn_norm / ffn_norm
    blocks.i.att.receptance/key/value/output.weight
                                        model.layers.i.attn.r_proj/k_proj/v_proj/o_proj.weight
    blocks.i.att.ln_x                   model.layers.i.attn.g_norm
    blocks.i.att.X1 (C,r), X2 (r,C), X0 (1,1,C)   for X in w, a, v, g
                                        model.layers.i.attn.X_lora.lora.0.weight (r,C), lora.2.weight (C,r),
                                        lora.2.bias (C)   (fla's Linear layers hold them transposed)
    blocks.i.att.x_*, k_k, k_a, r_k     model.layers.i.attn.x_*, k_k, k_a, r_k  (k_k, k_a squeezed to (C))
    blocks.i.ffn.x_k, key, value        model.layers.i.ffn.x_k (C), key, value

The names come from fla's own model and its official-to-fla converter (fla/layers/rwkv7.py,
utils/convert_from_rwkv7.py). Layer 0 has no v_lora in fla (its value residual is never read).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .._fs import atomic_folder
from ..errors import VisionRWKVError

MODEL_TYPE = "rwkv7"
_TOP = {"model.embeddings.weight": "emb.weight", "model.norm.weight": "ln_out.weight",
        "model.norm.bias": "ln_out.bias", "lm_head.weight": "head.weight"}
_NORMS = {"pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}
_PROJ = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output", "g_norm": "ln_x"}
_LORA = {"0.weight": "1", "2.weight": "2", "2.bias": "0"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(\w+)\.(.+)")
_ATT_VECTORS = {"x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_k", "k_a", "r_k"}
_FFN = {"x_k", "key.weight", "value.weight"}


def is_hf_folder(path: Path) -> bool:
    """A folder with an fla RWKV-7 config.json."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def official_name(name: str) -> tuple[str, bool]:
    """(the official name of an fla tensor, whether it is stored transposed)."""
    if name in _TOP:
        return _TOP[name], False
    match = _LAYER.fullmatch(name)
    if match is None:
        raise KeyError(name)
    i, part, rest = match.groups()
    if part in _NORMS and rest in ("weight", "bias"):
        return f"blocks.{i}.{_NORMS[part]}.{rest}", False
    if part == "ffn" and rest in _FFN:
        return f"blocks.{i}.ffn.{rest}", False
    if part != "attn":
        raise KeyError(name)
    lora = re.fullmatch(r"([wavg])_lora\.lora\.(\d\.\w+)", rest)
    if lora:
        which, tail = lora.groups()
        if tail not in _LORA:
            raise KeyError(name)
        return f"blocks.{i}.att.{which}{_LORA[tail]}", tail.endswith("weight")
    head, _, tail = rest.partition(".")
    if head in _PROJ and tail in ("weight", "bias"):
        return f"blocks.{i}.att.{_PROJ[head]}.{tail}", False
    if rest in _ATT_VECTORS:
        return f"blocks.{i}.att.{rest}", False
    raise KeyError(name)


def fla_name(name: str) -> tuple[str | None, bool]:
    """The inverse of official_name: (fla's name, or None for a tensor fla does not keep; transposed)."""
    if name in {v: k for k, v in _TOP.items()}:
        return {v: k for k, v in _TOP.items()}[name], False
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(.+)", name)
    if match is None:
        raise KeyError(name)
    i, part, rest = match.groups()
    layer = f"model.layers.{i}"
    if part in _NORMS.values():
        return f"{layer}.{[k for k, v in _NORMS.items() if v == part][0]}.{rest}", False
    if part == "ffn":
        return f"{layer}.ffn.{rest}", False
    lora = re.fullmatch(r"([wavg])([012])", rest)
    if lora:
        which, num = lora.groups()
        if which == "v" and i == "0":
            return None, False
        return f"{layer}.attn.{which}_lora.lora.{[k for k, v in _LORA.items() if v == num][0]}", num != "0"
    head, _, tail = rest.partition(".")
    inverse = {v: k for k, v in _PROJ.items()}
    if head in inverse:
        return f"{layer}.attn.{inverse[head]}{'.' + tail if tail else ''}", False
    return f"{layer}.attn.{rest}", False


def read_hf(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of an fla RWKV-7 folder under their official names and shapes (up to squeezed vectors)."""
    folder = Path(folder)
    sd = _read_weights(folder)
    out = {}
    for name, tensor in sd.items():
        try:
            official, transposed = official_name(name)
        except KeyError:
            raise VisionRWKVError(f"{folder}: {name} is not a tensor of flash-linear-attention's RWKV-7 "
                                  "(model.layers.N.attn/ffn/..., model.embeddings, model.norm, lm_head)") from None
        out[official] = tensor.t().contiguous() if transposed else tensor
    for key in [k for k in out if re.fullmatch(r"blocks\.\d+\.att\.[wavg]0", k)]:
        out[key] = out[key].reshape(1, 1, -1)  # fla keeps the LoRA's bias as a vector
    return out


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    shards = sorted(folder.glob("model*.safetensors"))
    try:
        if shards:
            sd = {}
            for shard in shards:
                sd.update(load_file(str(shard)))
            return sd
        if (folder / "pytorch_model.bin").is_file():
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise VisionRWKVError(f"cannot read the weights in {folder}: {str(e).splitlines()[0]}") from None
    raise VisionRWKVError(f"{folder} has an RWKV-7 config.json but no model*.safetensors or pytorch_model.bin")


def save_hf(model, folder) -> Path:
    """Write a decoder in fla's layout (config.json + model.safetensors), e.g. for transformers + fla users."""
    from safetensors.torch import save_file

    c = model.config
    sd = {}
    for name, tensor in model.state_dict().items():
        target, transposed = fla_name(name)
        if target is None:
            continue
        t = tensor.detach().cpu()
        t = t.t() if transposed else t
        if not re.search(r"\.attn\.x_\w$", target) and t.dim() == 3 and t.shape[:2] == (1, 1):
            t = t.reshape(-1)  # fla keeps these as vectors, all but the token-shift mixes
        sd[target] = t.contiguous()
    config = {"model_type": MODEL_TYPE, "architectures": ["RWKV7ForCausalLM"], "vocab_size": c.vocab_size,
              "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "head_dim": c.head_size,
              "num_heads": c.n_head, "intermediate_size": c.dim_ffn, "hidden_ratio": c.dim_ffn / c.n_embd,
              "decay_low_rank_dim": c.d_decay_lora, "a_low_rank_dim": c.d_aaa_lora,
              "v_low_rank_dim": c.d_mv_lora, "gate_low_rank_dim": c.d_gate_lora,
              "value_dim": [c.n_embd] * c.n_layer, "norm_eps": 1e-5, "norm_bias": True, "hidden_act": "sqrelu",
              "tie_word_embeddings": False, "torch_dtype": str(model.emb.weight.dtype).replace("torch.", "")}
    with atomic_folder(folder) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(folder)
