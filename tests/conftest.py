import math
import os
from contextlib import contextmanager

import pytest
import torch

from vision_rwkv import RWKV7, RWKV7Config


@contextmanager
def interpreter():
    """TRITON_INTERPRET=1 without a GPU, for the duration: Triton reads it as it compiles kernels (and at
    launch), so the op tests run their kernels in its interpreter on the CPU."""
    before = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def _import_triton_interpreted() -> None:
    """Triton decides when triton.language is first imported whether its own library functions (tl.sum, ...)
    are interpreted, and open_clip, transformers or torch.compile may import it first, with the interpreter
    off: so import it here, before any test module, with the interpreter on. Without a GPU no compiled
    Triton kernel runs, so nothing else sees the difference."""
    with interpreter():
        try:
            import triton.language  # noqa: F401
        except ImportError:
            pass


if not torch.cuda.is_available():
    _import_triton_interpreted()


def tiny_config(**kw) -> RWKV7Config:
    base = dict(vocab_size=97, n_layer=3, n_embd=64, head_size=16, d_decay_lora=8, d_aaa_lora=8,
                d_mv_lora=8, d_gate_lora=16, dim_ffn=128)
    base.update(kw)
    return RWKV7Config(**base)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random. The official init zeroes output projections, which would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 2 and not name.endswith("r_k"):
            std = 1.0 / math.sqrt(p.shape[1])
            if name == "emb.weight":
                std = 1.0
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif (".ln" in name or name.startswith("ln_out")) and name.endswith("weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return randomize_(RWKV7(tiny_config()).eval())
