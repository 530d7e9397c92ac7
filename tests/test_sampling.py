"""Each sampling filter on hand-made logits, row by row."""

import math

import pytest
import torch

from vision_rwkv import SamplingConfig, VisionRWKVError
from vision_rwkv.lm.sampling import (
    TokenChooser,
    apply_penalties,
    ban_tokens,
    draw,
    filter_logits,
    top_a_mask,
    top_k_mask,
    top_p_mask,
)


def probs_of(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_top_k_keeps_k_per_row():
    p = probs_of([0.1, 0.4, 0.2, 0.3], [0.7, 0.1, 0.1, 0.1])
    keep = top_k_mask(p, 2)
    assert keep.tolist() == [[False, True, False, True], [True, True, True, True]]  # row 2: a 3-way tie at k
    assert top_k_mask(p, 0).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = probs_of([0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02])
    assert top_p_mask(p, 0.7).tolist() == [[True, True, False, False], [False, True, False, False]]
    assert top_p_mask(p, 0.8).tolist() == [[True, True, False, False], [False, True, False, False]]
    assert top_p_mask(p, 0.81).tolist() == [[True, True, True, False], [False, True, False, False]]
    assert top_p_mask(p, 1e-6).sum(-1).tolist() == [1, 1]  # always at least one


def test_top_a_uses_p_max_squared():
    # row 1: p_max 0.5 -> threshold 0.2 * 0.25 = 0.05; row 2: p_max 0.9 -> 0.2 * 0.81 = 0.162
    p = probs_of([0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02])
    assert top_a_mask(p, 0.2).tolist() == [[True, True, True, True], [False, True, False, False]]
    p2 = probs_of([0.5, 0.3, 0.15, 0.049, 0.001])
    assert top_a_mask(p2, 0.2).tolist() == [[True, True, True, False, False]]


def test_temperature_applies_after_the_filters():
    logits = torch.log(probs_of([0.5, 0.3, 0.15, 0.05]))
    out = filter_logits(logits, SamplingConfig(strategy="sample", top_p=0.7, temperature=0.5))
    assert torch.isinf(out[0, 2:]).all()
    kept = torch.softmax(out, -1)[0, :2]
    expected = torch.tensor([0.5**2, 0.3**2]) / (0.5**2 + 0.3**2)
    torch.testing.assert_close(kept, expected)


def test_penalties_and_bans():
    logits = torch.zeros(2, 4)
    counts = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    out = apply_penalties(logits, counts, presence=0.5, frequency=0.25)
    torch.testing.assert_close(out, torch.tensor([[0, -0.75, -1.0, 0], [-0.625, 0, 0, 0]]))
    banned = ban_tokens(logits, [1, 3])
    assert torch.isinf(banned[:, [1, 3]]).all() and (banned[:, [0, 2]] == 0).all()
    assert torch.equal(ban_tokens(logits, torch.tensor([3, 1])), banned)  # ids already on the device
    assert (logits == 0).all()  # the input is left alone


def test_penalty_counts_decay_per_row():
    cfg = SamplingConfig(strategy="greedy", frequency_penalty=1.0, penalty_decay=0.5)
    chooser = TokenChooser(cfg, batch_size=2, vocab_size=4, device="cpu")
    chooser.update(torch.tensor([1, 2]))
    chooser.update(torch.tensor([1, 3]))
    torch.testing.assert_close(chooser.counts, torch.tensor([[0, 1.5, 0, 0], [0, 0, 0.5, 1.0]]))


def test_greedy_respects_bans_and_extra_bans():
    cfg = SamplingConfig(strategy="greedy", banned_tokens=[2])
    chooser = TokenChooser(cfg, 2, 4, "cpu")
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0], [3.0, 0.0, 4.0, 1.0]])
    assert chooser.choose(logits).tolist() == [3, 0]
    assert chooser.choose(logits, extra_banned=[3, 0]).tolist() == [1, 1]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    cfg = SamplingConfig(strategy="sample", seed=123, top_k=2)
    logits = torch.log(probs_of(*[[0.6, 0.3, 0.1]] * 4000))
    a = TokenChooser(cfg, 4000, 3, "cpu").choose(logits)
    b = TokenChooser(cfg, 4000, 3, "cpu").choose(logits)
    assert torch.equal(a, b)
    assert (a != 2).all()  # top-k 2 removed the third token
    frac0 = (a == 0).float().mean().item()
    assert math.isclose(frac0, 2 / 3, abs_tol=0.03)  # renormalised 0.6 / 0.9


def test_bad_sampling_config():
    with pytest.raises(VisionRWKVError, match="top_p must be in"):
        SamplingConfig(top_p=0).validate()
    with pytest.raises(VisionRWKVError, match="strategy is 'nucleus'"):
        SamplingConfig(strategy="nucleus").validate()


@pytest.mark.parametrize("fields, strategy, preset", [
    (dict(top_p=0.9), "greedy", "sampling=nucleus"),
    (dict(temperature=0.7), "greedy", "sampling=nucleus"),
    (dict(top_a=0.2), "greedy", "sampling=nucleus"),
    (dict(num_beams=5), "greedy", "sampling=beam"),
    (dict(num_return_sequences=3), "greedy", "sampling=beam (strategy beam) or sampling=nucleus"),
    (dict(temperature=0.5), "beam", "sampling=nucleus"),
    (dict(presence_penalty=0.5), "beam", "greedy or sampling"),
    (dict(length_penalty=0.8), "sample", "sampling=beam"),
])
def test_a_field_the_strategy_does_not_use_is_an_error_naming_the_preset(fields, strategy, preset):
    name, value = next(iter(fields.items()))
    with pytest.raises(VisionRWKVError) as e:
        SamplingConfig(strategy=strategy, **fields).validate()
    message = str(e.value)
    assert message.startswith(f"sampling.{name}={value} has no effect with strategy {strategy}; expected")
    assert preset in message and "\n" not in message


def test_fields_each_strategy_uses_are_accepted():
    SamplingConfig(strategy="greedy", temperature=0, presence_penalty=0.5, penalty_decay=0.9, seed=1).validate()
    SamplingConfig(strategy="sample", top_p=0.9, top_k=5, top_a=0.1, temperature=0.7, num_return_sequences=3,
                   frequency_penalty=0.2).validate()
    SamplingConfig(strategy="beam", num_beams=5, length_penalty=0.8, num_return_sequences=2, seed=0).validate()


def test_strategy_is_a_choice_that_saves_as_a_string():
    import yaml

    from vision_rwkv.config import Strategy, plain

    cfg = SamplingConfig(strategy="beam")
    assert cfg.strategy is Strategy.beam and cfg.strategy == "beam" and f"{cfg.strategy}" == "beam"
    assert yaml.safe_load(yaml.safe_dump(plain(cfg)))["strategy"] == "beam"


def test_draw_is_torch_multinomial_without_its_checks():
    probs = torch.softmax(3 * torch.randn(6, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    for seed in range(4):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(3):
            assert torch.equal(draw(probs, g1), torch.multinomial(probs, 1, generator=g2).squeeze(-1))
