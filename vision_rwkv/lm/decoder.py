"""The decoder interface: what every RWKV generation offers, and the one place a decoder is built.

    lm = build_decoder_model(DecoderConfig(arch="rwkv4", n_layer=12, n_embd=768, vocab_size=50277))
    logits, state = lm(tokens)                       # GPT mode: (B,T) -> (B,T,V), the state after T tokens
    logits, state = lm.step(tokens[:, -1], state)    # RNN mode: (B,) -> (B,V), one step further

The contract that generation, beam search, CUDA graphs, the captioner, the server and a state projector
rely on, and nothing more:

- ``config`` (a DecoderConfig: ``arch``, ``vocab_size``, ``n_layer``, ``n_embd``, ...);
- ``emb`` (nn.Embedding), ``ln_out`` (nn.LayerNorm) and ``head`` (nn.Linear, (V, C)): the token
  embedding, the final norm and the output head, whose weights training reads directly (the fused
  cross-entropy) and whose device and dtype are the model's;
- ``init_state(B)`` a fresh state; ``state_for(state, B)`` a fresh one for None, else the given one after
  checking it fits (one clear line if not). States are DecoderState dataclasses (lm/state.py) whose
  tensors are all (L, B, ...), so rows can be selected, reordered and joined without knowing the kind;
- ``forward(tokens | inputs_embeds=, state=, last_only=)`` and ``hidden(...)`` (GPT mode, up to the head
  or up to ln_out), ``step(tokens, state)`` and ``step_unchecked`` (RNN mode, the latter without the
  checks that read values back to the host). GPT mode's final state equals RNN mode's after the same
  tokens, and a gradient flows into the initial state;
- ``embed(tokens)`` the token embedding after the id checks; ``checked_inputs``;
- training: ``param_groups(weight_decay)``, ``unused_parameters()``, ``activation_checkpointing``.

Each generation implements ``_run(x, state, rnn)`` (the blocks over (B,T,C) embeddings), ``init_state``
and ``state_shapes``; the rest is shared here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import DecoderArch, DecoderConfig
from ..errors import VisionRWKVError
from .state import DecoderState


class Decoder(nn.Module):
    """The shared half of every RWKV decoder (see the module docstring for the contract)."""

    STATE: type[DecoderState]  # the generation's state class
    LR_SCALES: dict[str, float] = {}  # parameter-name suffix -> learning-rate multiple (its own AdamW group)

    def __init__(self, cfg: DecoderConfig, blocks: nn.ModuleList):
        super().__init__()
        self.config = cfg
        # registered in this order (emb, blocks, ln_out, head): the order of named_parameters, and so of
        # the optimizer's parameter lists in saved trainer states
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = blocks
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.check_inputs = True  # range-check token ids (one device sync per call)
        # GPT mode with autograd: recompute each block in the backward pass rather than keep its activations
        self.activation_checkpointing = False

    # ---- what each generation provides ------------------------------------------------------------

    def _run(self, x: torch.Tensor, state: DecoderState, rnn: bool) -> tuple[torch.Tensor, DecoderState]:
        """x (B,T,C) embeddings -> (ln_out output (B,T,C), the state after T tokens)."""
        raise NotImplementedError

    def init_state(self, batch_size: int, device=None) -> DecoderState:
        raise NotImplementedError

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters no forward pass reads (training freezes them: DistributedDataParallel requires every
        trained parameter to get a gradient)."""
        return []

    # ---- state -------------------------------------------------------------------------------------

    def state_for(self, state: DecoderState | None, batch_size: int) -> DecoderState:
        """A fresh state for None, else `state` after checking it fits this model and batch (one clear line)."""
        if state is None:
            return self.init_state(batch_size)
        if not isinstance(state, self.STATE):
            raise VisionRWKVError(f"state must be an {self.STATE.__name__} (the state of an {self.STATE.KIND} "
                                  f"decoder), got {type(state).__name__}")
        state.check_shapes(self.state_shapes(batch_size), f"this model ({self.config.describe()}) "
                                                          f"with batch {batch_size}")
        if state.device != self.emb.weight.device:
            raise VisionRWKVError(f"state is on {state.device}, but the model is on {self.emb.weight.device}")
        return state

    # ---- inputs ------------------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,T) token ids -> (B,T,C) embeddings (before ln0), after checking the ids."""
        self._check_ids(tokens)
        return self.emb(tokens)

    def _check_ids(self, tokens) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise VisionRWKVError(f"tokens must be an integer (Long) tensor, got {describe(tokens)}")
        # a traced graph (torch.compile, torch.export) cannot stop on a value: the check runs eagerly only
        if self.check_inputs and tokens.numel() and not torch.compiler.is_compiling():
            lo, hi = int(tokens.min()), int(tokens.max())
            V = self.config.vocab_size
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                raise VisionRWKVError(f"token id {bad} is outside this model's vocabulary: expected ids in [0, {V})")

    def checked_inputs(self, tokens, inputs_embeds) -> torch.Tensor:
        """The embeddings GPT mode runs on, (B,T,C), after the checks forward() makes on its inputs."""
        if (tokens is None) == (inputs_embeds is None):
            raise VisionRWKVError("give exactly one of tokens (B,T) or inputs_embeds (B,T,C)")
        if tokens is not None:
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] == 0:
                raise VisionRWKVError(f"tokens must have shape (B, T) with T >= 1, got {describe(tokens)}")
            return self.embed(tokens)
        C = self.config.n_embd
        x = inputs_embeds
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != C or x.shape[1] == 0:
            raise VisionRWKVError(f"inputs_embeds must have shape (B, T, {C}) with T >= 1, got {describe(x)}")
        return x.to(self.emb.weight.dtype) if not torch.is_autocast_enabled() else x

    # ---- the two modes -----------------------------------------------------------------------------

    def hidden(self, tokens=None, state=None, *, inputs_embeds=None):
        """GPT mode up to ln_out: (B,T,C) hidden states and the final state."""
        x = self.checked_inputs(tokens, inputs_embeds)
        return self._run(x, self.state_for(state, x.shape[0]), rnn=False)

    def forward(self, tokens=None, state=None, *, inputs_embeds=None, last_only: bool = False):
        """GPT mode. tokens (B,T) or inputs_embeds (B,T,C), optional initial state.

        Returns logits (B,T,V) (or (B,V) for the last position with last_only=True) and the final state.
        """
        h, state = self.hidden(tokens, state, inputs_embeds=inputs_embeds)
        if last_only:
            h = h[:, -1]
        return self.head(h), state

    def step(self, tokens: torch.Tensor, state: DecoderState | None = None):
        """RNN mode: tokens (B,) -> logits (B,V) and the updated state."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            raise VisionRWKVError(f"step() takes one token per row, shape (B,), got {describe(tokens)}")
        self._check_ids(tokens)
        return self.step_unchecked(tokens, self.state_for(state, tokens.shape[0]))

    def step_unchecked(self, tokens: torch.Tensor, state: DecoderState):
        """step() without the input checks, which read values back to the host (CUDA graphs capture this)."""
        h, state = self._run(self.emb(tokens.unsqueeze(1)), state, rnn=True)
        return self._logits_one_row(h[:, 0]) if h.shape[0] == 1 else self.head(h[:, 0]), state

    def _logits_one_row(self, h: torch.Tensor) -> torch.Tensor:
        """The head for one row. On the CPU, without autograd, it reads a transposed copy of the head's weight:
        a (1,C) x (C,V) product over contiguous rows runs about twice as fast there as F.linear over the
        (V,C) weight (BENCHMARKS.md, the CPU decoder), and the head is most of a step's bytes. The copy is
        made on first use and again whenever the weight changes."""
        w = self.head.weight
        if h.device.type != "cpu" or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
            return self.head(h)
        key = (w.data_ptr(), w._version, w.dtype)
        if getattr(self, "_head_t_key", None) != key:
            self._head_t = w.detach().t().contiguous()
            self._head_t_key = key
        return h.to(w.dtype) @ self._head_t

    # ---- training ----------------------------------------------------------------------------------

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on the 2-D projection matrices (every nn.Linear weight) only.

        Embedding, norms and per-channel vectors get none; the parameters named in LR_SCALES train at
        their own multiple of the base rate, each group named after its suffix.
        """
        linear = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        decay, no_decay = [], []
        scaled: dict[str, list] = {suffix: [] for suffix in self.LR_SCALES}
        for name, p in self.named_parameters():
            suffix = next((s for s in self.LR_SCALES if name.endswith(s)), None)
            if suffix is not None:
                scaled[suffix].append(p)
            elif id(p) in linear and p.dim() == 2:
                decay.append(p)
            else:
                no_decay.append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
        ]
        for suffix, params in scaled.items():
            groups.append({"params": params, "weight_decay": 0.0, "lr_scale": self.LR_SCALES[suffix],
                           "name": suffix.rpartition(".")[2]})
        return groups


def build_decoder_model(cfg: DecoderConfig, init: bool = True) -> Decoder:
    """The decoder of cfg.arch, with the official initialisation (or uninitialised for loading weights)."""
    if cfg.arch == DecoderArch.rwkv4:
        from .rwkv4 import RWKV4

        return RWKV4(cfg, init=init)
    from .rwkv7 import RWKV7

    return RWKV7(cfg, init=init)


def token_shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """(B,T,C), (B,C) -> (B,T,C): each position sees the previous token's x (prev for t=0)."""
    return torch.cat([prev.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
