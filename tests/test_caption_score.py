"""Captioner.score (log p(caption | image)) and Captioner.embed_images: batched = one by one, the score is
what training maximises, computed independently here, and bad input is one line."""

import sys
from pathlib import Path

import pytest
import torch
from test_captioner import make_checkpoint, write_images

from vision_rwkv.caption.captioner import Captioner
from vision_rwkv.caption.images import load_image
from vision_rwkv.errors import VisionRWKVError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import embedding_retrieval  # noqa: E402

CAPTIONS = ["a small red circle", "a large blue square to the left of a small green triangle", "red",
            "a large orange square in the center", "  a small yellow triangle  "]


@pytest.fixture(scope="module", params=["mlp", "state"])
def tiny(tmp_path_factory, request):
    """A prefix projector's model, and a state projector's (its image enters as the decoder's initial state)."""
    folder = tmp_path_factory.mktemp("score")
    captioner = Captioner.load(make_checkpoint(folder / "ckpt", request.param), device="cpu", dtype="fp32")
    return captioner, [str(p) for p in write_images(folder / "images", 3)]


def pairs_of(paths):
    """Five pairs over three images, the first image three times, captions of different lengths."""
    return [paths[0], paths[1], paths[0], paths[2], paths[0]], CAPTIONS


@torch.no_grad()
def reference_score(model, path, caption):
    """Sum of log-probs of caption + eos from one GPT-mode pass over [prefix | prompt | caption | eos]."""
    ids = model.tokenizer.encode(caption.strip())
    image = model.encoder.preprocess(load_image(path)).unsqueeze(0)
    prefix, start = model.condition(*model.encode(image))  # (1,K',C), the initial state (None: a fresh one)
    targets = torch.tensor(ids + [model.eos_id])
    x = torch.cat([prefix, model.decoder.emb(targets).unsqueeze(0)], dim=1)
    logits, _ = model.decoder(inputs_embeds=x, state=start)  # (1,K'+n+1,V)
    k = prefix.shape[1]
    lp = torch.log_softmax(logits[0, k - 1:k - 1 + len(targets)].float(), dim=-1)  # predicts caption_0 .. eos
    return float(lp.gather(1, targets.unsqueeze(1)).sum()), len(targets)


def test_score_is_the_log_prob_of_caption_and_eos_after_the_prefix(tiny):
    captioner, images = tiny
    paths, captions = pairs_of(images)
    got = captioner.score(paths, captions)
    want = [reference_score(captioner.model, p, c) for p, c in zip(paths, captions)]
    torch.testing.assert_close(got, torch.tensor([s for s, _ in want]), rtol=1e-5, atol=1e-4)
    per_token = captioner.score(paths, captions, normalize=True)
    torch.testing.assert_close(per_token, torch.tensor([s / n for s, n in want]), rtol=1e-5, atol=1e-4)
    assert len(set(got.tolist())) == len(captions)  # the scores differ, so the check above means something


def test_score_batched_equals_one_by_one(tiny):
    captioner, images = tiny
    paths, captions = pairs_of(images)
    alone = torch.cat([captioner.score([p], [c]) for p, c in zip(paths, captions)])
    for batch_size in (1, 2, 64):
        torch.testing.assert_close(captioner.score(paths, captions, batch_size=batch_size), alone,
                                   rtol=1e-5, atol=1e-4)


def test_score_agrees_with_the_training_loss_path(tiny):
    captioner, images = tiny
    model = captioner.model
    image = torch.stack([model.encoder.preprocess(load_image(images[1]))] * 2)
    ids = [model.tokenizer.encode(c.strip()) for c in CAPTIONS[:2]]
    with torch.no_grad():
        want = model.score(*model.encode(image), ids)  # CaptionModel.score: GPT mode, as the loss reads it
    torch.testing.assert_close(captioner.score([images[1]] * 2, CAPTIONS[:2]), want, rtol=1e-5, atol=1e-4)


def test_embed_images_are_the_encoders_pooled_vectors(tiny):
    captioner, images = tiny
    model = captioner.model
    raw = captioner.embed_images(images, batch_size=2, normalize=False)
    with torch.no_grad():
        _, pooled = model.encode(torch.stack([model.encoder.preprocess(load_image(p)) for p in images]))
    assert raw.shape == (3, model.encoder.pooled_dim) and raw.dtype == torch.float32
    torch.testing.assert_close(raw, pooled, rtol=1e-5, atol=1e-5)
    unit = captioner.embed_images(images)
    torch.testing.assert_close(unit, torch.nn.functional.normalize(pooled, dim=1), rtol=1e-5, atol=1e-5)
    assert captioner.embed_images([]).shape == (0, model.encoder.pooled_dim)


def test_bad_input_is_one_line(tiny, tmp_path):
    captioner, images = tiny
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    cases = [
        (lambda: captioner.score(images[:2], ["one caption"]), "2 paths and 1 captions"),
        (lambda: captioner.score(images[:2], ["fine", " "]), "caption 1 is empty"),
        (lambda: captioner.score(images[:1], "a string"), "wrap it in a list"),
        (lambda: captioner.score([images[0], str(broken)], ["a", "b"]), "broken.png"),
        (lambda: captioner.embed_images([images[0], str(broken)]), "broken.png"),
        (lambda: captioner.embed_images(images, batch_size=0), "batch_size"),
    ]
    for call, words in cases:
        with pytest.raises(VisionRWKVError, match=words) as e:
            call()
        assert "\n" not in str(e.value)


# ---- the demo model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    return Captioner.load(device="cpu", dtype="fp32")


@pytest.mark.slow
def test_demo_score_picks_the_true_caption_among_hard_and_random_candidates(demo, tmp_path):
    scenes = embedding_retrieval.held_out_scenes(200, 2026)
    paths = embedding_retrieval.write_scene_images(scenes, tmp_path)
    hard = embedding_retrieval.candidate_sets(scenes, "hard")
    assert min(map(len, hard)) >= 9  # colour x5, kind x2, size x1, and a position per scene at least
    assert embedding_retrieval.matching_accuracy(demo, paths, hard, normalize=True) >= 0.90  # measured 0.985
    random_sets = embedding_retrieval.candidate_sets(scenes, "random", n_random=5)
    assert embedding_retrieval.matching_accuracy(demo, paths, random_sets, normalize=True) >= 0.95


@pytest.mark.slow
def test_demo_embedding_finds_the_same_scene_in_another_order(demo):
    scenes = embedding_retrieval.held_out_scenes(200, 2026)
    lm, tok = demo.model.decoder, demo.model.tokenizer
    last = embedding_retrieval.retrieval_recall(lm, tok, scenes, "last")
    # measured 0.055 (11 of 200; chance 0.005), mean pooling 0.015: "last" is the default for that reason
    assert last >= 0.04
    assert last > embedding_retrieval.retrieval_recall(lm, tok, scenes, "mean")
