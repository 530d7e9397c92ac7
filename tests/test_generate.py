"""Text generation in RNN mode after a GPT-mode prompt."""

import torch
from conftest import randomize_, tiny_config

from vision_rwkv import RWKV7, SamplingConfig, generate
from vision_rwkv.lm.generate import decode_loop


class CharTokenizer:
    """96 printable characters as ids 1..96, id 0 is end-of-text."""

    vocab_size, eos_id = 97, 0

    def encode(self, text):
        return [ord(c) - 31 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 31) for i in ids if i)


def model():
    return randomize_(RWKV7(tiny_config()).eval(), seed=11)


def test_greedy_generation_matches_argmax_over_full_gpt_passes():
    lm, tok = model(), CharTokenizer()
    prompt = "a small red circle"
    cfg = SamplingConfig(strategy="greedy", max_new_tokens=12)
    text = generate(lm, tok, prompt, sampling=cfg)
    ids = tok.encode(prompt)
    expected = []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(lm(torch.tensor([ids]))[0][0, -1].argmax())
            if nxt == 0:
                break
            expected.append(nxt)
            ids.append(nxt)
    assert text == tok.decode(expected) and len(text) > 0


def test_batched_prompts_equal_one_by_one():
    lm, tok = model(), CharTokenizer()
    prompts = ["a blue", "two large green squares", "x"]
    cfg = SamplingConfig(strategy="greedy", max_new_tokens=10)
    batched = generate(lm, tok, prompts, sampling=cfg)
    assert batched == [generate(lm, tok, p, sampling=cfg) for p in prompts]


def test_seeded_sampling_reproducible():
    lm, tok = model(), CharTokenizer()
    cfg = SamplingConfig(strategy="sample", temperature=1.5, top_p=0.95, seed=7, max_new_tokens=15)
    assert generate(lm, tok, "hello", sampling=cfg) == generate(lm, tok, "hello", sampling=cfg)


def test_stop_tokens_and_min_new_tokens():
    lm = model()
    logits = torch.zeros(2, 97)
    logits[:, 5] = 10.0  # the model would always pick 5 first
    state = lm.init_state(2)
    out = decode_loop(lm, logits, state, SamplingConfig(max_new_tokens=6), stop_ids=[5])
    assert out == [[], []]  # stopped at once; the stop token is not part of the output
    out = decode_loop(lm, logits, state, SamplingConfig(max_new_tokens=6, min_new_tokens=3), stop_ids=[5])
    assert all(len(o) >= 3 and 5 not in o[:3] for o in out)
    assert all(len(o) <= 6 for o in out)
