"""The official RWKV-7 initialisation and the optimizer parameter groups."""

import math

import torch
from conftest import tiny_config

from vision_rwkv import RWKV7


def test_official_init_values():
    cfg = tiny_config(n_layer=4)
    m = RWKV7(cfg)
    C, L = cfg.n_embd, cfg.n_layer
    for i, block in enumerate(m.blocks):
        att = block.att
        assert att.output.weight.abs().max() == 0 and block.ffn.value.weight.abs().max() == 0
        assert att.w1.abs().max() == 0 and att.a1.abs().max() == 0 and att.g1.abs().max() == 0
        torch.testing.assert_close(att.ln_x.weight, torch.full((C,), ((1 + i) / L) ** 0.7))
        assert torch.allclose(att.k_a, torch.full_like(att.k_a, 1.02))
        assert torch.allclose(att.r_k, torch.full_like(att.r_k, -0.04))
        # x_r = 1 - (i/C)^(0.2 * (1 - layer/L)): the first channel mixes fully, later ones less
        assert att.x_r[0, 0, 0] == 1.0 and att.x_r[0, 0, -1] < att.x_r[0, 0, 1]
        # the decay logits start in the official range: w0 = www + 0.5 + 2.5 * zigzag
        assert att.w0.min() > -6 + 0.5 - 2.5 - 1e-4 and att.w0.max() < 0.5 + 2.5 + 1e-4
        # ortho 0.1 on the up-projections of the adapters: singular values 0.1 * gain
        sv = torch.linalg.svdvals(att.w2)
        assert torch.allclose(sv, torch.full_like(sv, 0.1), atol=1e-5)
        sv = torch.linalg.svdvals(att.key.weight)
        assert torch.allclose(sv, torch.full_like(sv, 0.1), atol=1e-5)
    assert m.emb.weight.abs().max() <= 1e-4
    sv = torch.linalg.svdvals(m.head.weight)
    assert torch.allclose(sv, torch.full_like(sv, 0.5 * math.sqrt(cfg.vocab_size / C)), rtol=1e-4)


def test_param_groups_decay_only_projection_matrices():
    m = RWKV7(tiny_config())
    groups = {g["name"]: g for g in m.param_groups(weight_decay=0.1)}
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert "head.weight" in decayed and "blocks.0.att.receptance.weight" in decayed
    assert "blocks.2.ffn.value.weight" in decayed
    assert "emb.weight" not in decayed and "blocks.0.att.w1" not in decayed and "blocks.0.ln1.weight" not in decayed
    assert all(p.dim() == 2 for p in groups["decay"]["params"])
    assert {names[id(p)] for p in groups["w0"]["params"]} == {f"blocks.{i}.att.w0" for i in range(3)}
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(m.parameters()))
    torch.optim.AdamW(list(groups.values()), lr=1e-3)  # the groups are valid AdamW groups
