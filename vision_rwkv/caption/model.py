"""CaptionModel: frozen CLIP encoder -> projector -> RWKV decoder (RWKV-7 or RWKV-4), and its checkpoint folder.

Training sequence, one row per (image, caption), right-padded:

    [ prefix (K) | prompt (Lp) | caption (n) ]        the inputs
                 predict:  caption_0 ... caption_{n-1}, eos   from positions K+Lp-1 ... K+Lp+n-1

Only caption and end-of-text positions count in the loss. Padding sits after every real position, and
the recurrence is causal, so it changes no real position's output; decoding never starts from a
padded state (every row of a decoding batch has the same prefix + prompt length).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from .._fs import atomic_folder
from ..config import CaptionConfig, caption_config_from_dict, caption_config_to_dict
from ..errors import VisionRWKVError
from ..hub import model_card, push_folder, resolve
from ..lm.checkpoint import CONFIG, WEIGHTS, build_decoder
from ..lm.decoder import Decoder, build_decoder_model
from ..lm.formats import load_decoder
from ..lm.graphs import encoder_runner, prefill_runner
from ..lm.readback import to_device
from ..lm.state import DecoderState
from ..lm.tokenizer import check_fits, load_tokenizer
from ..ops.linear_ce import linear_cross_entropy
from .encoder import ClipEncoder
from .projector import build_projector, param_groups, prefix_length

PROVENANCE = "provenance.json"
CAPTION_FORMAT = "vision_rwkv.caption"
CAPTION_FORMAT_VERSION = 1
IGNORE = -100


class CaptionModel(nn.Module):
    def __init__(self, cfg: CaptionConfig, tokenizer, decoder: Decoder | None = None):
        super().__init__()
        self.config = cfg
        self.tokenizer = tokenizer
        self.provenance: dict | None = None  # where it came from (provenance.json), set by training
        self.encoder = ClipEncoder(cfg.encoder)
        self.decoder = decoder if decoder is not None else build_decoder_model(cfg.decoder)
        self.config.decoder = self.decoder.config  # the resolved shape (e.g. read from an official .pth)
        check_fits(tokenizer, self.decoder.config.vocab_size)
        d_model = self.decoder.config.n_embd
        self.projector = build_projector(cfg.projector, self.encoder.token_dim, self.encoder.pooled_dim, d_model,
                                         self.decoder.config)
        self.prefix_len = prefix_length(cfg.projector, self.encoder.num_patches)
        self.prompt_ids = tokenizer.encode(cfg.prompt) if cfg.prompt else []
        self.eos_id = tokenizer.eos_id

    @property
    def device(self) -> torch.device:
        return self.decoder.emb.weight.device

    # ---- the prefix ------------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,3,H,W) preprocessed images -> patch tokens (B,P,Dt), pooled (B,Dp). A CUDA graph on CUDA for
        small batches (lm.graphs.encoder_runner)."""
        return encoder_runner(self.encoder)(images)

    def condition(self, tokens: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, DecoderState | None]:
        """Encoder features -> what the decoder starts from: its input embeddings (B, K + Lp, C), the image
        prefix then the prompt, and its initial state (None, a fresh one, unless the projector is a state
        projector)."""
        dtype = self.projector_dtype()
        out = self.projector(tokens.to(dtype), pooled.to(dtype))
        x, state = out if isinstance(out, tuple) else (out, None)  # (B,K,C), DecoderState or None
        if self.prompt_ids:
            ids = to_device(self.prompt_ids, x.device)  # not torch.tensor(..., device=): that waits for the device
            prompt = self.decoder.emb(ids).to(x.dtype)  # (Lp,C)
            x = torch.cat([x, prompt.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        return x, state

    def prefix(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The input embeddings of condition() (B, K + Lp, C), for callers that need no state."""
        return self.condition(tokens, pooled)[0]

    def prefill(self, tokens: torch.Tensor, pooled: torch.Tensor):
        """GPT mode over the image prefix and prompt, from the projector's state: the last position's logits
        (B,V) and the state decoding continues from. A CUDA graph on CUDA (lm.graphs.prefill_runner)."""
        x, state = self.condition(tokens, pooled)
        return prefill_runner(self.decoder)(x, state)

    def prefill_images(self, images: torch.Tensor, chunk: int | None = None):
        """encode() then prefill() of (B,3,H,W) preprocessed images, `chunk` images at a time (all at once when
        None): (B,V) logits and the state. The graph runners are taken, and the weights checked, once for
        every chunk; a chunk of a size the graphs take runs as two replays and a few small operations (the
        captioning server's joins, serve.continuous)."""
        encode, prefill = encoder_runner(self.encoder), prefill_runner(self.decoder)
        parts = []
        for part in images.split(chunk or max(images.shape[0], 1)):
            parts.append(prefill(*self.condition(*encode(part))))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([logits for logits, _ in parts]), DecoderState.cat([state for _, state in parts])

    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    # ---- training --------------------------------------------------------------------------------------

    def token_logprobs(self, tokens, pooled, captions: torch.Tensor, lengths: torch.Tensor):
        """Per-position log-probabilities of each caption and its end-of-text, in GPT mode.

        captions (B,L) token ids, right-padded (any id past lengths[i]); lengths (B,).
        Returns logits at the target positions (N,V), targets (N,), and row ids (N,) for the N real targets.
        """
        h, targets, rows = self.token_hidden(tokens, pooled, captions, lengths)
        return self.decoder.head(h), targets, rows  # (N,V): only where a target exists

    def loss_sum(self, tokens, pooled, captions, lengths) -> torch.Tensor:
        """Summed cross-entropy over caption and end-of-text tokens, through the chunked head + loss op
        (vision_rwkv.ops.linear_ce): the (N, V) logits never exist at once. What training optimises."""
        h, targets, _ = self.token_hidden(tokens, pooled, captions, lengths)
        return linear_cross_entropy(h, self.decoder.head.weight, targets)

    def token_hidden(self, tokens, pooled, captions: torch.Tensor, lengths: torch.Tensor):
        """As token_logprobs, with the decoder's final hidden states (N,C) in place of the logits."""
        B, L = captions.shape
        prefix, state = self.condition(tokens, pooled)  # (B,K',C), the initial state or None
        k = prefix.shape[1]
        pos = torch.arange(L + 1, device=captions.device)
        real = pos.unsqueeze(0) <= lengths.unsqueeze(1)  # (B,L+1): caption tokens and the eos
        ids = captions.masked_fill(pos[:L].unsqueeze(0) >= lengths.unsqueeze(1), 0)  # padding -> a valid id
        x = torch.cat([prefix, self.decoder.embed(ids).to(prefix.dtype)], dim=1)  # (B,K'+L,C)
        h, _ = self.decoder.hidden(inputs_embeds=x, state=state)
        h = h[:, k - 1:]  # (B,L+1,C): the positions that predict caption_0 .. eos
        targets = torch.cat([ids, ids.new_zeros(B, 1)], dim=1)
        targets = targets.scatter(1, lengths.unsqueeze(1), self.eos_id)  # (B,L+1)
        rows = torch.arange(B, device=captions.device).unsqueeze(1).expand(B, L + 1)
        return h[real], targets[real], rows[real]

    def loss(self, tokens, pooled, captions, lengths) -> torch.Tensor:
        """Mean cross-entropy over caption and end-of-text tokens (padding and prefix excluded)."""
        logits, targets, _ = self.token_logprobs(tokens, pooled, captions, lengths)
        return F.cross_entropy(logits.float(), targets)

    @torch.no_grad()
    def score(self, tokens, pooled, captions: list[list[int]], ended: list[bool] | None = None) -> torch.Tensor:
        """GPT-mode log-probability of each caption, followed by end-of-text where ended[i] (default all): (B,)."""
        captions_t, lengths = pad_captions(captions, self.device)
        logits, targets, rows = self.token_logprobs(tokens, pooled, captions_t, lengths)
        lp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        if ended is not None:  # drop the end-of-text term of rows that were cut, not ended
            is_eos = torch.zeros_like(lp, dtype=torch.bool)
            ends = torch.cumsum(lengths + 1, 0) - 1  # each row's eos target is its last one
            is_eos[ends] = True
            cut = ~torch.tensor(ended, device=lp.device)[rows]
            lp = lp.masked_fill(is_eos & cut, 0.0)
        return torch.zeros(len(captions), device=lp.device).index_add_(0, rows, lp)

    def param_groups(self, weight_decay: float, *, train_decoder: bool) -> list[dict]:
        groups = param_groups(self.projector, weight_decay)
        if train_decoder:
            groups += self.decoder.param_groups(weight_decay)
        if not self.encoder.frozen:
            groups += [{"params": list(self.encoder.parameters()), "weight_decay": weight_decay,
                        "lr_scale": 0.1, "name": "encoder"}]
        return [g for g in groups if g["params"]]

    # ---- checkpoints -----------------------------------------------------------------------------------

    def save_pretrained(self, folder, *, dtype: torch.dtype | None = None, repo_id: str | None = None) -> Path:
        """A checkpoint folder with its model card (README.md, from the config and the provenance record);
        repo_id names the model in the card's examples. Loads with Captioner.from_pretrained(folder)."""
        return save_caption_model(self, folder, dtype=dtype, card=repo_id or str(folder))

    def push_to_hub(self, repo_id: str, *, dtype: torch.dtype | None = None, private: bool | None = None,
                    token: str | None = None, commit_message: str = "Upload vision_rwkv caption model") -> str:
        """save_pretrained into a temporary folder, then one commit to the Hugging Face Hub model repo_id
        (created when missing). Returns the commit's URL."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", dtype=dtype, repo_id=repo_id)
            return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    def stores_encoder(self) -> bool:
        enc = self.config.encoder
        if enc.store_weights is not None:
            return enc.store_weights
        return not enc.freeze or (not enc.pretrained and not enc.model.startswith("local-dir:"))

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        sd.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        if self.stores_encoder():
            sd.update({f"encoder.{k}": v for k, v in self.encoder.visual.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def pad_captions(captions: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of token ids -> (B,L) right-padded with 0, and lengths (B,)."""
    lengths = torch.tensor([len(c) for c in captions], dtype=torch.long)
    out = torch.zeros(len(captions), max(1, int(lengths.max()) if len(captions) else 1), dtype=torch.long)
    for i, c in enumerate(captions):
        out[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return out.to(device), lengths.to(device)


# ---- building and loading ---------------------------------------------------------------------------


def build_caption_model(cfg: CaptionConfig, tokenizer=None, captions_for_bpe=None) -> CaptionModel:
    """A new model from its config: the decoder from scratch or from cfg.init_decoder, the tokenizer named
    by cfg.tokenizer ("train" trains a BPE on captions_for_bpe)."""
    from ..lm.tokenizer import train_bpe

    cfg = dataclasses.replace(cfg)
    if tokenizer is None:
        if cfg.tokenizer == "train":
            if not captions_for_bpe:
                raise VisionRWKVError("tokenizer 'train' needs training captions to learn a BPE from")
            tokenizer = train_bpe(captions_for_bpe, cfg.tokenizer_vocab_size)
        else:
            tokenizer = load_tokenizer(cfg.tokenizer)
    decoder = None
    if cfg.init_decoder:
        decoder = load_decoder(cfg.init_decoder, dtype=torch.float32, wkv_impl=cfg.decoder.wkv_impl)
    else:
        vocab = getattr(tokenizer, "vocab_size", None)
        if vocab is not None and cfg.tokenizer == "train":
            cfg.decoder = dataclasses.replace(cfg.decoder, vocab_size=vocab)
    return CaptionModel(cfg, tokenizer, decoder)


def save_caption_model(model: CaptionModel, folder, *, extra=None, dtype: torch.dtype | None = None,
                       card: str | None = None) -> Path:
    """Write a checkpoint folder atomically: model.safetensors, config.yaml, the tokenizer, provenance.json
    (when the model has a record), README.md (a model card, when `card` names the model: "org/name" or a
    path), and whatever `extra(tmp_folder)` adds (the trainer's state). dtype casts floating weights (e.g.
    bf16 for shipping)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    cfg = caption_config_to_dict(model.config)
    with atomic_folder(folder) as tmp:
        sd = model.saved_state_dict()
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": CAPTION_FORMAT})
        cfg["tokenizer"] = model.tokenizer.save(tmp)
        cfg["init_decoder"] = ""  # the weights are here now
        header = {"format": CAPTION_FORMAT, "format_version": CAPTION_FORMAT_VERSION}
        (tmp / CONFIG).write_text(yaml.safe_dump({**header, **cfg}, sort_keys=False))
        if model.provenance:
            (tmp / PROVENANCE).write_text(json.dumps(model.provenance, indent=1) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(model_card(cfg, model.provenance, card))
        if extra is not None:
            extra(tmp)
    return folder


def read_caption_config(folder: Path) -> CaptionConfig:
    path = folder / CONFIG
    if not path.is_file():
        raise VisionRWKVError(f"{folder} has no {CONFIG}; expected a vision_rwkv caption checkpoint folder")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise VisionRWKVError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("format") != CAPTION_FORMAT:
        raise VisionRWKVError(f"{path} is not a caption checkpoint (format {CAPTION_FORMAT!r} expected)")
    data = {k: v for k, v in data.items() if k not in ("format", "format_version")}
    return caption_config_from_dict(data)


def load_caption_model(path, *, device=None, dtype: torch.dtype | None = torch.float32) -> CaptionModel:
    """Load a caption checkpoint folder (model.safetensors + config.yaml + tokenizer), the folder a training
    run's <out_dir>/checkpoints/latest names, or a Hugging Face Hub model ("org/name", see vision_rwkv.hub)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve(path, "a caption checkpoint folder or a Hugging Face Hub model")
    if folder.is_file() and folder.name in (WEIGHTS, CONFIG):
        folder = folder.parent
    if folder.is_file() and folder.name == "latest":  # a training run's pointer: <run>/checkpoints/latest
        folder = folder.parent / folder.read_text().strip()
    if not folder.is_dir():
        raise VisionRWKVError(f"{folder} does not exist; expected a caption checkpoint folder")
    cfg = read_caption_config(folder)
    weights = folder / WEIGHTS
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise VisionRWKVError(f"cannot read {weights}: {str(e).splitlines()[0]}") from None
    parts = {p: {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
             for p in ("encoder", "projector", "decoder")}
    if parts["encoder"]:
        cfg.encoder = dataclasses.replace(cfg.encoder, pretrained="")  # the stored weights replace any download
    decoder = build_decoder(cfg.decoder, parts["decoder"], str(weights), None, dtype)
    model = CaptionModel(cfg, load_tokenizer(folder), decoder)
    _load_part(model.projector, parts["projector"], "projector", weights)
    if parts["encoder"]:
        _load_part(model.encoder.visual, parts["encoder"], "encoder", weights)
    model.projector.to(dtype or torch.float32)
    model.encoder.to(dtype or torch.float32)
    if device is not None:
        model.to(device)
    model.provenance = _read_provenance(folder)
    return model.eval()


def _read_provenance(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _load_part(module: nn.Module, sd: dict, name: str, source) -> None:
    expected = module.state_dict()
    for key, value in expected.items():
        if key not in sd:
            raise VisionRWKVError(f"{source}: missing key {name}.{key}; the checkpoint does not match its config")
        if sd[key].shape != value.shape:
            raise VisionRWKVError(
                f"{source}: {name}.{key} has shape {tuple(sd[key].shape)}, expected {tuple(value.shape)}"
            )
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise VisionRWKVError(f"{source}: unexpected key {name}.{extra[0]}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()})
