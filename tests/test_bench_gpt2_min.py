"""bench/gpt2_min.py, the transformer baseline with a preallocated KV cache, against transformers' GPT-2."""

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpt2_min import MinimalGPT2  # noqa: E402


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@torch.no_grad()
def test_greedy_tokens_and_logits_are_transformers_own():
    hf = tiny_gpt2()
    prefix = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    mine = MinimalGPT2(hf, batch_size=3, max_len=12)
    logits = []
    tokens = mine.greedy(prefix, 7, logits)
    ids = torch.empty(3, 0, dtype=torch.long)
    for n in range(7):  # transformers without a cache: the whole sequence again for every token
        x = torch.cat([prefix, hf.transformer.wte(ids)], dim=1)
        want = hf(inputs_embeds=x).logits[:, -1]
        torch.testing.assert_close(logits[n], want, rtol=1e-4, atol=1e-4)
        ids = torch.cat([ids, want.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, ids)
    generated = hf.generate(inputs_embeds=prefix, attention_mask=torch.ones(3, 5, dtype=torch.long),
                            max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(tokens, generated[:, -7:])
    assert len(set(map(tuple, tokens.tolist()))) > 1, "every row decoded the same: the test would prove little"


def test_a_batch_that_does_not_fit_the_cache_is_refused():
    mine = MinimalGPT2(tiny_gpt2(), batch_size=2, max_len=8)
    with pytest.raises(ValueError, match="does not fit the cache"):
        mine.greedy(torch.zeros(2, 5, 64), 5)
    with pytest.raises(ValueError, match="over the model's 32 positions"):
        MinimalGPT2(tiny_gpt2(), batch_size=1, max_len=40)


@pytest.mark.slow
def test_the_compiled_model_decodes_the_same_tokens():
    """compile(): the prefill compiled, the step compiled for graph replay (on the CPU: compiled only)."""
    hf = tiny_gpt2()
    prefix = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    want = MinimalGPT2(hf, batch_size=3, max_len=12).greedy(prefix, 7)
    compiled = MinimalGPT2(hf, batch_size=3, max_len=12).compile()
    assert torch.equal(compiled.greedy(prefix, 7), want) and torch.equal(compiled.greedy(prefix, 7), want)
