"""CaptionModel: encoder, projectors, loss masking, decoding equivalences, checkpoints."""

import dataclasses

import open_clip
import pytest
import torch
from conftest import randomize_

from vision_rwkv.caption.encoder import ClipEncoder
from vision_rwkv.caption.generate import caption_features
from vision_rwkv.caption.model import build_caption_model, load_caption_model, pad_captions, save_caption_model
from vision_rwkv.config import CaptionConfig, EncoderConfig, ProjectorConfig, RWKV7Config, SamplingConfig
from vision_rwkv.errors import VisionRWKVError

CAPTIONS = [
    "a small red circle in the top left",
    "a large blue square to the left of a small green triangle",
    "a small yellow triangle above a large purple circle",
    "a large orange square in the center",
] * 5


DECODERS = {
    "rwkv7": RWKV7Config(n_layer=2, n_embd=64, head_size=16, wkv_impl="chunked"),
    "rwkv4": RWKV7Config(arch="rwkv4", n_layer=2, n_embd=64, wkv_impl="reference"),
}


def make_model(kind="mlp", prompt="", seed=0, arch="rwkv7", **proj):
    cfg = CaptionConfig(
        encoder=EncoderConfig(model="vrwkv-ViT-tiny"),
        projector=ProjectorConfig(kind=kind, prefix_len=3, heads=2, **proj),
        decoder=dataclasses.replace(DECODERS[arch]),
        tokenizer="train",
        tokenizer_vocab_size=90,
        prompt=prompt,
    )
    torch.manual_seed(seed)
    model = build_caption_model(cfg, captions_for_bpe=CAPTIONS)
    randomize_(model.decoder, seed=seed)  # the official init zeroes output projections: the prefix would not matter
    return model.eval()


def features(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return model.encode(torch.randn(n, 3, 32, 32, generator=g))


@pytest.fixture(scope="module", params=[("rwkv7", "mlp"), ("rwkv4", "mlp"), ("rwkv7", "state"), ("rwkv4", "state"),
                                        ("rwkv7", "state_prefix")], ids="-".join)
def model(request):
    """The captioning model with each decoder generation, and with the state projectors: every test that
    takes it runs for each."""
    arch, kind = request.param
    return make_model(kind, prompt="a picture of", arch=arch)


def test_encoder_returns_patch_tokens_and_pooled_and_stays_frozen():
    enc = ClipEncoder(EncoderConfig(model="vrwkv-ViT-tiny"))
    tokens, pooled = enc(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 16, 64) and pooled.shape == (2, 32)  # (32/8)^2 patches, width 64, embed 32
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.visual.training
    with pytest.raises(VisionRWKVError, match=r"\(B, 3, 32, 32\)"):
        enc(torch.randn(2, 3, 64, 64))


def test_encoder_loads_a_local_checkpoint_file_and_a_local_dir(tmp_path):
    """The real open_clip loading code, on weights this test makes (no download)."""
    from vision_rwkv.caption.encoder import _register_project_configs

    _register_project_configs()
    clip = open_clip.create_model("vrwkv-ViT-tiny")
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    file = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), file)
    enc = ClipEncoder(EncoderConfig(model="vrwkv-ViT-tiny", pretrained=str(file)))
    for (k, a), b in zip(enc.visual.state_dict().items(), clip.visual.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)

    import json

    from safetensors.torch import save_file

    folder = tmp_path / "local"
    folder.mkdir()
    cfg = open_clip.get_model_config("vrwkv-ViT-tiny")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    enc2 = ClipEncoder(EncoderConfig(model=f"local-dir:{folder}"))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(enc2(x)[1], enc(x)[1])


def test_encoder_errors_are_one_line(tmp_path):
    with pytest.raises(VisionRWKVError, match="not an open_clip model"):
        ClipEncoder(EncoderConfig(model="ViT-Nope"))
    with pytest.raises(VisionRWKVError, match="does not exist"):
        ClipEncoder(EncoderConfig(model="vrwkv-ViT-tiny", pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(VisionRWKVError, match="not a tag"):
        ClipEncoder(EncoderConfig(model="ViT-B-32", pretrained="no-such-tag"))


@pytest.mark.parametrize("kind,k", [("linear", 16), ("mlp", 16), ("clipcap", 3), ("resampler", 3)])
def test_projectors_give_prefixes_of_the_decoder_width(kind, k):
    m = make_model(kind)
    tokens, pooled = features(m)
    assert m.prefix(tokens, pooled).shape == (3, k, 64)
    assert m.prefix_len == k


def test_inputs_embeds_take_the_same_path_as_tokens_ln0_once(model):
    """Prefix embeddings enter like token embeddings, so ln0 applies exactly once to both."""
    ids = torch.tensor([[5, 9, 2, 7]])
    a, _ = model.decoder(ids)
    b, _ = model.decoder(inputs_embeds=model.decoder.emb(ids))
    torch.testing.assert_close(a, b)


def test_the_training_loss_is_the_cross_entropy_of_the_logits_with_the_same_gradients(model):
    """loss_sum runs the chunked head + cross-entropy op; token_logprobs then F.cross_entropy is the formula."""
    from vision_rwkv.ops.linear_ce import linear_cross_entropy

    tokens, pooled = features(model)
    batch, lengths = pad_captions([model.tokenizer.encode(c) for c in CAPTIONS[:3]])
    params = [model.decoder.head.weight, next(model.projector.parameters()), model.decoder.blocks[0].att.key.weight]

    def formula():
        logits, targets, _ = model.token_logprobs(tokens, pooled, batch, lengths)
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")

    def small_chunks():
        h, targets, _ = model.token_hidden(tokens, pooled, batch, lengths)
        return linear_cross_entropy(h, model.decoder.head.weight, targets, chunk=3)

    def run(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    expected = run(formula)
    for got in (run(lambda: model.loss_sum(tokens, pooled, batch, lengths)), run(small_chunks)):
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        for g, e in zip(got[1], expected[1]):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    model.zero_grad()


def test_loss_ignores_padding_and_counts_caption_and_eos(model):
    tokens, pooled = features(model)
    caps = [model.tokenizer.encode(c) for c in CAPTIONS[:3]]
    batch, lengths = pad_captions(caps)
    logits, targets, rows = model.token_logprobs(tokens, pooled, batch, lengths)
    assert targets.shape[0] == sum(len(c) + 1 for c in caps)
    together = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    alone = 0.0
    for i, c in enumerate(caps):
        b1, l1 = pad_captions([c])
        lg, tg, _ = model.token_logprobs(tokens[i:i + 1], pooled[i:i + 1], b1, l1)
        alone += torch.nn.functional.cross_entropy(lg, tg, reduction="sum")
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)
    # different padding content changes nothing
    batch2 = batch.clone()
    batch2[0, lengths[0]:] = 7
    lg2, tg2, _ = model.token_logprobs(tokens, pooled, batch2, lengths)
    torch.testing.assert_close(lg2, logits)
    torch.testing.assert_close(tg2, targets)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_rnn_mode_logprob_equals_gpt_mode_score(model, strategy):
    tokens, pooled = features(model)
    beam = dict(num_beams=3, length_penalty=0.0) if strategy == "beam" else {}
    cfg = SamplingConfig(strategy=strategy, max_new_tokens=10, **beam)
    hyps = [h[0] for h in caption_features(model, tokens, pooled, cfg)]
    gpt = model.score(tokens, pooled, [h.ids for h in hyps], ended=[h.finished for h in hyps])
    rnn = torch.tensor([h.logprob for h in hyps])
    torch.testing.assert_close(rnn, gpt, rtol=1e-4, atol=1e-4)
    assert any(len(h.ids) > 0 for h in hyps)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batched_decoding_equals_one_by_one(model, strategy):
    tokens, pooled = features(model, n=4, seed=1)
    beam = dict(num_beams=3, num_return_sequences=2) if strategy == "beam" else {}
    cfg = SamplingConfig(strategy=strategy, max_new_tokens=12, **beam)
    batched = caption_features(model, tokens, pooled, cfg)
    for i in range(4):
        alone = caption_features(model, tokens[i:i + 1], pooled[i:i + 1], cfg)[0]
        assert [h.ids for h in alone] == [h.ids for h in batched[i]]
        assert [h.logprob for h in alone] == pytest.approx([h.logprob for h in batched[i]], abs=1e-4)


def test_beam_of_one_is_greedy_and_nbest_is_sorted(model):
    tokens, pooled = features(model, n=3, seed=2)
    greedy = caption_features(model, tokens, pooled, SamplingConfig(max_new_tokens=10))
    beam1 = caption_features(model, tokens, pooled, SamplingConfig(strategy="beam", num_beams=1,
                                                                    max_new_tokens=10, length_penalty=0.0))
    assert [g[0].ids for g in greedy] == [b[0].ids for b in beam1]
    nbest = caption_features(model, tokens, pooled, SamplingConfig(strategy="beam", num_beams=4,
                                                                    num_return_sequences=4, max_new_tokens=10))
    for hyps in nbest:
        assert len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.ids) for h in hyps}) == 4


def test_min_new_tokens_and_seeded_sampling(model):
    tokens, pooled = features(model, n=2)
    out = caption_features(model, tokens, pooled, SamplingConfig(min_new_tokens=6, max_new_tokens=8))
    assert all(len(h[0].ids) >= 6 for h in out)
    cfg = SamplingConfig(strategy="sample", top_p=0.9, top_k=20, top_a=0.1, seed=3, max_new_tokens=8)
    a = caption_features(model, tokens, pooled, cfg)
    b = caption_features(model, tokens, pooled, cfg)
    assert [h[0].ids for h in a] == [h[0].ids for h in b]


def test_checkpoint_round_trip_keeps_every_output(tmp_path, model):
    tokens, pooled = features(model)
    caps = [model.tokenizer.encode(c) for c in CAPTIONS[:3]]
    save_caption_model(model, tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"model.safetensors", "config.yaml", "tokenizer.json"}
    loaded = load_caption_model(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.score(*loaded.encode(torch.zeros(1, 3, 32, 32)), caps[:1]),
                               model.score(*model.encode(torch.zeros(1, 3, 32, 32)), caps[:1]))
    torch.testing.assert_close(loaded.score(tokens, pooled, caps), model.score(tokens, pooled, caps))
    for cfg in (SamplingConfig(max_new_tokens=10), SamplingConfig(strategy="beam", num_beams=3, max_new_tokens=10)):
        before, after = caption_features(model, tokens, pooled, cfg), caption_features(loaded, tokens, pooled, cfg)
        assert [h[0].ids for h in after] == [h[0].ids for h in before]  # identical captions, state projectors too
    assert loaded.config.prompt == "a picture of"
    # the decoder inside loads on its own too
    from vision_rwkv import load_decoder

    lm = load_decoder(tmp_path / "ckpt")
    torch.testing.assert_close(lm.head.weight, model.decoder.head.weight)


def test_frozen_pretrained_encoder_is_not_saved(tmp_path):
    m = make_model()
    m.config.encoder = dataclasses.replace(m.config.encoder, pretrained="openai")  # re-creatable by name
    assert not any(k.startswith("encoder.") for k in m.saved_state_dict())
    m.config.encoder = dataclasses.replace(m.config.encoder, pretrained="")  # random: must be stored
    assert any(k.startswith("encoder.") for k in m.saved_state_dict())
    groups = m.param_groups(0.01, train_decoder=True)
    encoder_params = {id(p) for p in m.encoder.parameters()}
    assert not any(id(p) in encoder_params for g in groups for p in g["params"])


def test_bad_checkpoint_folder_gets_one_line(tmp_path, model):
    with pytest.raises(VisionRWKVError, match="does not exist"):
        load_caption_model(tmp_path / "nope")
    save_caption_model(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.yaml").write_text("format: something.else\n")
    with pytest.raises(VisionRWKVError, match="not a caption checkpoint"):
        load_caption_model(tmp_path / "ckpt")


@pytest.mark.parametrize("arch", sorted(DECODERS))
@pytest.mark.parametrize("kind", ["state", "state_prefix"])
def test_the_state_projector_builds_a_full_initial_state_and_trains_through_it(arch, kind):
    m = make_model(kind, arch=arch).train()
    tokens, pooled = features(m, n=2)
    prefix, state = m.condition(tokens, pooled)
    L, C = m.decoder.config.n_layer, m.decoder.config.n_embd
    assert prefix.shape == (2, m.prefix_len, C) and m.prefix_len == (1 if kind == "state" else 3)
    assert type(state) is m.decoder.STATE
    assert state.tensors() and all(t.dtype == torch.float32 and t.shape[:2] == (L, 2) for t in state.tensors())
    state.check_shapes(m.decoder.state_shapes(2), "the decoder")
    assert all(t.abs().sum() > 0 for t in state.tensors())
    batch, lengths = pad_captions([m.tokenizer.encode(c) for c in CAPTIONS[:2]])
    m.zero_grad()
    m.loss(tokens, pooled, batch, lengths).backward()
    for name, p in m.projector.named_parameters():  # through the WKV call that starts from the state
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert m.decoder.config.wkv_impl.value in ("chunked", "reference")  # the reference paths, on the CPU


def test_the_state_differs_per_image_and_changes_the_captions():
    m = make_model("state")
    tokens, pooled = features(m, n=2)
    _, state = m.condition(tokens, pooled)
    assert (state.wkv[:, 0] - state.wkv[:, 1]).abs().max() > 1e-3
    fresh = m.decoder.init_state(2)
    x, _ = m.condition(tokens, pooled)
    with torch.no_grad():
        with_image = m.decoder(inputs_embeds=x, state=state, last_only=True)[0]
        without = m.decoder(inputs_embeds=x, state=fresh, last_only=True)[0]
    assert (with_image - without).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_the_state_projector_gets_the_kernels_gradient(arch):
    """On a GPU the WKV call that starts from the projector's state runs the CUDA kernel (WKV-7 or WKV-4):
    the projector's gradients through it equal those through the PyTorch reference path."""
    grads = {}
    for impl in ("cuda", DECODERS[arch].wkv_impl.value):
        m = make_model("state", arch=arch, seed=4)
        m.decoder.config.wkv_impl = impl  # the config object every block reads
        tokens, pooled = (t.cuda() for t in features(m, n=3))
        m = m.cuda().train()
        batch, lengths = pad_captions([m.tokenizer.encode(c) for c in CAPTIONS[:3]], "cuda")
        m.zero_grad()
        m.loss(tokens, pooled, batch, lengths).backward()
        grads[impl] = {n: p.grad.clone() for n, p in m.projector.named_parameters()}
    ref = grads[DECODERS[arch].wkv_impl.value]
    for name, g in grads["cuda"].items():
        gap = (g - ref[name]).abs().max() / ref[name].abs().max()
        assert ref[name].abs().max() > 0 and gap < 1e-3, (name, float(gap))


def test_prefill_images_in_chunks_equals_encode_then_prefill(model):
    """The server's joins: encode + prefill, a few images at a time, give what one call over all gives (with
    each decoder, and with a state projector's initial state)."""
    from vision_rwkv.lm.state import DecoderState

    images = torch.randn(5, 3, *model.encoder.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_logits, want_state = model.prefill(*model.encode(images))
        for chunk in (None, 2, 5, 8):
            logits, state = model.prefill_images(images, chunk)
            assert isinstance(state, DecoderState) and state.batch_size == 5
            torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
            for got, want in zip(state.tensors(), want_state.tensors()):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
