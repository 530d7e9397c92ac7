"""The RWKV-4 decoder: its two modes against each other, and against two implementations not written here.

- GPT mode = RNN mode, and a prefix's state continued = the whole sequence (fp32, 1e-5);
- transformers' RwkvForCausalLM, random weights loaded into ours through its own saved folder: the same
  logits and final states for both of its modes, with rescale_every off; with it on, the difference is
  LayerNorm's eps alone (lm/rwkv4.py says why we never rescale);
- the `rwkv` package's RWKV-4 path on a random official-layout .pth (in a subprocess: it sets global
  TorchScript flags at import).
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vision_rwkv import (
    RWKV4,
    DecoderConfig,
    DecoderState,
    RWKV4State,
    RWKVState,
    VisionRWKVError,
    build_decoder_model,
    load_decoder,
    save_decoder,
    save_official,
)
from vision_rwkv.lm.hf import save_hf

V, L, C, F = 61, 4, 48, 96


def rwkv4_config(**kw) -> DecoderConfig:
    return DecoderConfig(**{**dict(arch="rwkv4", vocab_size=V, n_layer=L, n_embd=C, dim_ffn=F), **kw})


@torch.no_grad()
def randomize_(model, seed=0):
    """Every parameter random (the initialisation zeroes whole projections, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("time_mix_k", "time_mix_v", "time_mix_r")) or "time_mix" in name:
            p.copy_(torch.rand(p.shape, generator=g))
        elif name.endswith("time_decay"):
            p.copy_(torch.randn(p.shape, generator=g) - 1)
        elif p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]) * (3.0 if "emb" in name else 1.0))
        elif name.endswith("weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def model():
    return randomize_(RWKV4(rwkv4_config()).eval(), seed=3)


def tokens(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_states_close(a, b, **tol):
    assert type(a) is type(b)
    for name, x, y in zip(a.names(), a.tensors(), b.tensors()):
        torch.testing.assert_close(x, y, msg=f"state.{name}", **tol)


@torch.no_grad()
def test_gpt_mode_equals_rnn_mode(model):
    x = tokens(3, 23)
    logits, state = model(x)
    s, steps = None, []
    for t in range(x.shape[1]):
        out, s = model.step(x[:, t], s)
        steps.append(out)
    assert logits.abs().max() > 1.0
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=1e-5, atol=1e-5)
    assert_states_close(state, s, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("split", [1, 7, 22])
def test_chunks_with_the_state_carried_equal_the_whole(model, split):
    x = tokens(2, 23, seed=1)
    whole, s_whole = model(x)
    first, s = model(x[:, :split])
    rest, s = model(x[:, split:], s)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=1e-5, atol=1e-5)
    assert_states_close(s, s_whole, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_batched_equals_one_by_one(model):
    x = tokens(4, 11, seed=2)
    logits, state = model(x)
    for b in range(4):
        one, s = model(x[b:b + 1])
        torch.testing.assert_close(one[0], logits[b], rtol=1e-5, atol=1e-5)
        assert_states_close(s, state[b], rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter_and_the_initial_state(model):
    model.train()
    state = model.init_state(2)
    state.num.normal_()
    state.den.uniform_(0.5, 1.5)
    state.max.normal_()
    for t in state.tensors():
        t.requires_grad_(True)
    logits, _ = model(tokens(2, 9), state)
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, t in zip(state.names(), state.tensors()):
        assert t.grad is not None and t.grad.abs().sum() > 0, name


def test_the_state_kind_and_shape_are_checked(model):
    with pytest.raises(VisionRWKVError, match="state must be an RWKV4State .*RWKV-4.* got RWKVState"):
        model.step(torch.tensor([1]), RWKVState.zeros(L, 1, C, 16))
    with pytest.raises(VisionRWKVError, match=r"state.att_shift has shape \(4, 2, 48\), but this model "
                                              r"\(RWKV-4 L4-D48 \(vocab 61\)\) with batch 1 expects \(4, 1, 48\)"):
        model.step(torch.tensor([1]), model.init_state(2))


def test_a_saved_state_loads_as_its_kind(model, tmp_path):
    _, state = model(tokens(1, 5))
    state.save(tmp_path / "s.safetensors")
    back = DecoderState.load(tmp_path / "s.safetensors")
    assert isinstance(back, RWKV4State)
    assert_states_close(back, state, rtol=0, atol=0)
    with pytest.raises(VisionRWKVError, match="holds an RWKV-4 state, not an RWKV-7 one"):
        RWKVState.load(tmp_path / "s.safetensors")


def test_config_choices():
    assert build_decoder_model(rwkv4_config()).config.dim_ffn == F
    assert build_decoder_model(rwkv4_config(dim_ffn=None)).config.dim_ffn == 4 * C
    assert DecoderConfig.from_dict({"n_layer": 2}).arch.value == "rwkv7"  # configs from before RWKV-4
    with pytest.raises(VisionRWKVError, match="decoder.arch is 'rwkv5'; expected one of rwkv7, rwkv4"):
        DecoderConfig(arch="rwkv5")
    with pytest.raises(VisionRWKVError, match="wkv_impl is chunked, which only RWKV-7 has"):
        build_decoder_model(rwkv4_config(wkv_impl="chunked"))


# ---- checkpoints ----------------------------------------------------------------------------------------


def test_official_pth_and_our_folder_round_trip(model, tmp_path):
    save_official(model, tmp_path / "m.pth")
    sd = torch.load(tmp_path / "m.pth", weights_only=True)
    assert sd["blocks.0.att.time_first"].shape == (C,) and "blocks.0.ln0.weight" in sd
    sd["blocks.1.att.time_mix_k"] = sd["blocks.1.att.time_mix_k"].reshape(C)  # some files keep mixes squeezed
    torch.save(sd, tmp_path / "squeezed.pth")
    x = tokens(1, 9)
    want, _ = model(x)
    for path in (tmp_path / "m.pth", tmp_path / "squeezed.pth"):
        lm = load_decoder(path)
        assert isinstance(lm, RWKV4) and lm.config.describe() == "RWKV-4 L4-D48 (vocab 61)"
        torch.testing.assert_close(lm(x)[0], want, rtol=0, atol=0)
    save_decoder(load_decoder(tmp_path / "m.pth"), tmp_path / "folder")
    torch.testing.assert_close(load_decoder(tmp_path / "folder")(x)[0], want, rtol=0, atol=0)


def test_rwkv5_files_are_named(model, tmp_path):
    sd = model.state_dict()
    sd["blocks.0.att.ln_x.weight"] = torch.ones(C)
    torch.save(sd, tmp_path / "v5.pth")
    with pytest.raises(VisionRWKVError, match="is RWKV-5 .*does not support; expected an RWKV-7 or RWKV-4"):
        load_decoder(tmp_path / "v5.pth")


# ---- transformers ---------------------------------------------------------------------------------------


def _transformers_model(rescale_every=0, seed=5):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RwkvConfig(vocab_size=V, context_length=64, hidden_size=C, num_hidden_layers=L,
                                  attention_hidden_size=C, intermediate_size=F, rescale_every=rescale_every)
    torch.manual_seed(seed)
    hf = transformers.RwkvForCausalLM(cfg)
    with torch.no_grad():  # ours randomised, then renamed into transformers' layout by its own loader
        ours = randomize_(RWKV4(rwkv4_config()), seed=seed)
        from vision_rwkv.lm.hf import rwkv4_hf_name

        hf.load_state_dict({rwkv4_hf_name(k): v for k, v in ours.state_dict().items()})
    return hf.eval()


def _their_state_as_ours(state) -> RWKV4State:
    """transformers keeps [ffn x, att x, num, den, max], each (B, C, L)."""
    ffn, att, num, den, mx = (s.permute(2, 0, 1).float() for s in state)
    return RWKV4State(att, num, den, mx, ffn)


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_logits_and_states_match_transformers(tmp_path, fmt):
    hf = _transformers_model()
    hf.save_pretrained(tmp_path / "hf")
    if fmt == "bin":  # the Hub's RWKV-4 Pile folders hold pytorch_model.bin (transformers 5 writes safetensors)
        from safetensors.torch import load_file

        weights = tmp_path / "hf" / "model.safetensors"
        torch.save(load_file(str(weights)), tmp_path / "hf" / "pytorch_model.bin")
        weights.unlink()
    ours = load_decoder(tmp_path / "hf")
    assert isinstance(ours, RWKV4)
    x = tokens(2, 17, seed=4)

    out = hf(x, use_cache=True)  # GPT mode
    logits, state = ours(x)
    assert logits.abs().max() > 1.0
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)
    assert_states_close(state, _their_state_as_ours(out.state), rtol=1e-5, atol=1e-5)

    # RNN mode, one row at a time: transformers' single-token path broadcasts a (B,C) shift against (B,1,C)
    # hidden states, which is right only at batch 1. It also updates its state in place.
    for row in range(2):
        their_state = [s[row:row + 1].clone() for s in out.state]
        mine_state = state[row]
        for t in [3, 9, 0]:
            theirs = hf(torch.tensor([[t]]), state=their_state, use_cache=True)
            their_state = theirs.state
            mine, mine_state = ours.step(torch.tensor([t]), mine_state)
            torch.testing.assert_close(mine, theirs.logits[:, 0], rtol=1e-5, atol=1e-5)
        assert_states_close(mine_state, _their_state_as_ours(their_state), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_transformers_rescaling_changes_only_what_layernorm_eps_sees(tmp_path):
    """rescale_every=2 halves transformers' hidden state after blocks 2 and 4 in eval mode; every LayerNorm
    undoes the scale but for its eps, so the logits move by a little, not by the factor."""
    x = tokens(2, 17, seed=4)
    plain = _transformers_model(rescale_every=0)(x).logits
    rescaled = _transformers_model(rescale_every=2)(x).logits
    hf = _transformers_model(rescale_every=0)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_decoder(tmp_path / "hf")(x)[0]
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    gap = (ours - rescaled).abs().max() / rescaled.abs().max()
    assert 1e-7 < gap < 1e-3, gap


def test_save_hf_loads_in_transformers(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_hf(model, tmp_path / "out")
    hf = transformers.RwkvForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf(x).logits, rtol=1e-5, atol=1e-5)


# ---- the rwkv package -----------------------------------------------------------------------------------

REFERENCE = textwrap.dedent(
    """
    import json, sys, torch
    from rwkv.model import RWKV
    path, toks, extra = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    model = RWKV(model=path, strategy="cpu fp32")
    assert int(model.version) == 4, model.version
    seq, state = model.forward(toks, None, full_output=True)
    steps = []
    for t in extra:
        out, state = model.forward([t], state)
        steps.append(out)
    torch.save({"seq": seq, "steps": torch.stack(steps)}, path + ".out")
    """
)


def test_logits_match_the_rwkv_package(model, tmp_path):
    pytest.importorskip("rwkv")
    save_official(model, tmp_path / "model.pth")
    toks = tokens(1, 30, seed=6)[0].tolist()
    extra = [5, 17, 60, 0]
    env = {**os.environ, "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"}
    env.pop("RWKV_V7_ON", None)
    proc = subprocess.run([sys.executable, "-c", REFERENCE, str(tmp_path / "model"), json.dumps(toks),
                           json.dumps(extra)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = torch.load(tmp_path / "model.out")
    with torch.no_grad():
        logits, state = model(torch.tensor([toks]))
        steps = []
        for t in extra:
            out, state = model.step(torch.tensor([t]), state)
            steps.append(out[0])
    assert logits.abs().max() > 1.0
    torch.testing.assert_close(logits[0], ref["seq"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(steps), ref["steps"], rtol=1e-4, atol=1e-4)
    # decoding's own path: rnn_stepper (on the CPU the C++ step, lm/engine4.py, where it builds)
    from vision_rwkv.lm.graphs import rnn_stepper

    with torch.no_grad():
        _, state = model(torch.tensor([toks]))
        step, steps = rnn_stepper(model), []
        for t in extra:
            out, state = step(torch.tensor([t]), state)
            steps.append(out[0])
    torch.testing.assert_close(torch.stack(steps), ref["steps"], rtol=1e-4, atol=1e-4)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(model, tmp_path):
    from vision_rwkv import build_caption_model
    from vision_rwkv.config import CaptionConfig, EncoderConfig

    world = pytest.importorskip("vision_rwkv.lm.tokenizer").world_tokenizer()
    with pytest.raises(VisionRWKVError, match="the tokenizer has 65536 ids but the decoder's vocabulary is 61; "
                                              "expected the decoder's own tokenizer"):
        save_decoder(model, tmp_path / "out", tokenizer=world)
    assert not (tmp_path / "out").exists()
    cfg = CaptionConfig(encoder=EncoderConfig(model="vrwkv-ViT-tiny"), decoder=rwkv4_config(vocab_size=50277))
    with pytest.raises(VisionRWKVError, match="65536 ids but the decoder's vocabulary is 50277"):
        build_caption_model(cfg, tokenizer=world)
