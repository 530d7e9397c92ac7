"""Hugging Face layouts, converted to and from the official (BlinkDL) one: RWKV-7 as flash-linear-attention
(fla) keeps it, and RWKV-4 as transformers' RwkvForCausalLM keeps it.

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

A transformers RWKV-4 folder has config.json with model_type "rwkv" (RwkvConfig) and the weights under
transformers' names, in the official shapes:

    official (BlinkDL)                  transformers
    emb.weight, ln_out.*, head.weight   rwkv.embeddings.weight, rwkv.ln_out.*, head.weight
    blocks.i.ln0 / ln1 / ln2            rwkv.blocks.i.pre_ln / ln1 / ln2
    blocks.i.att.*                      rwkv.blocks.i.attention.*
    blocks.i.ffn.*                      rwkv.blocks.i.feed_forward.*
    time_mix_k / time_mix_v / time_mix_r    time_mix_key / time_mix_value / time_mix_receptance
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .._fs import atomic_folder
from ..errors import VisionRWKVError

MODEL_TYPE = "rwkv7"
MODEL_TYPE_RWKV4 = "rwkv"
_TOP = {"model.embeddings.weight": "emb.weight", "model.norm.weight": "ln_out.weight",
        "model.norm.bias": "ln_out.bias", "lm_head.weight": "head.weight"}
_NORMS = {"pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}
_PROJ = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output", "g_norm": "ln_x"}
_LORA = {"0.weight": "1", "2.weight": "2", "2.bias": "0"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(\w+)\.(.+)")
_ATT_VECTORS = {"x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_k", "k_a", "r_k"}
_FFN = {"x_k", "key.weight", "value.weight"}


def model_type(path: Path) -> str | None:
    """config.json's model_type in a folder, or None when there is none to read."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_hf_folder(path: Path) -> bool:
    """A folder with an fla RWKV-7 config.json."""
    return model_type(path) == MODEL_TYPE


def is_hf_rwkv4_folder(path: Path) -> bool:
    """A folder with a transformers RWKV-4 (RwkvForCausalLM) config.json."""
    return model_type(path) == MODEL_TYPE_RWKV4


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
    """The tensors of an fla RWKV-7 or a transformers RWKV-4 folder under their official names and shapes
    (up to squeezed vectors)."""
    folder = Path(folder)
    sd = _read_weights(folder)
    if model_type(folder) == MODEL_TYPE_RWKV4:
        return _read_rwkv4(folder, sd)
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
    raise VisionRWKVError(f"{folder} has an RWKV config.json but no model*.safetensors or pytorch_model.bin")


def save_hf(model, folder) -> Path:
    """Write a decoder in its Hugging Face layout (config.json + model.safetensors): fla's for RWKV-7 (for
    transformers + fla users), transformers' RwkvForCausalLM for RWKV-4."""
    from safetensors.torch import save_file

    c = model.config
    if c.arch.value == "rwkv4":
        return _save_rwkv4(model, folder)
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


# ---- RWKV-4: transformers' RwkvForCausalLM ------------------------------------------------------------

_RWKV4_TOP = {"rwkv.embeddings.weight": "emb.weight", "rwkv.ln_out.weight": "ln_out.weight",
              "rwkv.ln_out.bias": "ln_out.bias", "head.weight": "head.weight"}
_RWKV4_PART = {"pre_ln": "ln0", "ln1": "ln1", "ln2": "ln2", "attention": "att", "feed_forward": "ffn"}
_RWKV4_MIX = {"time_mix_key": "time_mix_k", "time_mix_value": "time_mix_v", "time_mix_receptance": "time_mix_r"}
_RWKV4_LAYER = re.compile(r"rwkv\.blocks\.(\d+)\.(\w+)\.(.+)")


def rwkv4_official_name(name: str) -> str:
    """The official name of a transformers RWKV-4 tensor (KeyError for one RWKV-4 does not have)."""
    if name in _RWKV4_TOP:
        return _RWKV4_TOP[name]
    match = _RWKV4_LAYER.fullmatch(name)
    if match is None or match.group(2) not in _RWKV4_PART:
        raise KeyError(name)
    i, part, rest = match.groups()
    return f"blocks.{i}.{_RWKV4_PART[part]}.{_RWKV4_MIX.get(rest, rest)}"


def rwkv4_hf_name(name: str) -> str:
    """The inverse of rwkv4_official_name."""
    top = {v: k for k, v in _RWKV4_TOP.items()}
    if name in top:
        return top[name]
    i, part, rest = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(.+)", name).groups()
    parts, mixes = {v: k for k, v in _RWKV4_PART.items()}, {v: k for k, v in _RWKV4_MIX.items()}
    return f"rwkv.blocks.{i}.{parts[part]}.{mixes.get(rest, rest)}"


def _read_rwkv4(folder: Path, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    config = json.loads((folder / "config.json").read_text())
    hidden, attention = config.get("hidden_size"), config.get("attention_hidden_size")
    if attention is not None and attention != hidden:
        raise VisionRWKVError(f"{folder}: attention_hidden_size {attention} differs from hidden_size {hidden}; "
                              "expected RWKV-4's usual equal widths")
    out = {}
    for name, tensor in sd.items():
        try:
            out[rwkv4_official_name(name)] = tensor
        except KeyError:
            raise VisionRWKVError(f"{folder}: {name} is not a tensor of transformers' RWKV-4 (rwkv.embeddings, "
                                  "rwkv.blocks.N.attention/feed_forward/..., rwkv.ln_out, head)") from None
    return out


def _save_rwkv4(model, folder) -> Path:
    from safetensors.torch import save_file

    c = model.config
    sd = {rwkv4_hf_name(name): t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    # rescale_every 0: transformers then computes exactly what we do (lm/rwkv4.py says why we never rescale)
    config = {"model_type": MODEL_TYPE_RWKV4, "architectures": ["RwkvForCausalLM"], "vocab_size": c.vocab_size,
              "context_length": 1024, "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer,
              "attention_hidden_size": c.n_embd, "intermediate_size": c.dim_ffn, "layer_norm_epsilon": 1e-5,
              "rescale_every": 0, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
              "torch_dtype": str(model.emb.weight.dtype).replace("torch.", "")}
    with atomic_folder(folder) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(folder)
