"""vision_rwkv.caption.vit against open_clip, its reference: the same weights from the same seed, the same
outputs, the same preprocessed tensors; and the configs it does not cover still build through open_clip."""

import numpy as np
import pytest
import torch
from PIL import Image

from vision_rwkv.caption import vit
from vision_rwkv.caption.encoder import ClipEncoder
from vision_rwkv.config import EncoderConfig
from vision_rwkv.errors import VisionRWKVError

open_clip = pytest.importorskip("open_clip")
open_clip.add_model_config(vit.PROJECT_CONFIGS)

SMALL = {"width": 64, "layers": 2, "head_width": 16, "patch_size": 8, "image_size": 32}
VARIANTS = {  # what open_clip's plain ViT configs switch on or off, on a small tower
    "plain": ({}, False),
    "quick_gelu": ({}, True),
    "layer_scale": ({"ls_init_value": 0.1}, False),
    "avg_pool_no_ln_pre": ({"pool_type": "avg", "no_ln_pre": True}, False),
    "ln_after_pool": ({"final_ln_after_pool": True, "mlp_ratio": 2.0}, False),
}


def reference(cfg: dict):
    """open_clip's own tower and eval transform for a model config (registered under a test name)."""
    name = "vrwkv-test-" + str(abs(hash(repr(cfg))))
    open_clip.factory._MODEL_CONFIGS[name] = cfg
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model.visual, preprocess


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_tower_is_open_clips(variant):
    extra, quick = VARIANTS[variant]
    cfg = {"embed_dim": 24, "quick_gelu": quick, "vision_cfg": {**SMALL, **extra},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    assert vit.supports(cfg)
    torch.manual_seed(3)
    ref, _ = reference(cfg)
    torch.manual_seed(3)
    ours = vit.ViTTower(cfg)
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)  # names and order: open_clip checkpoints load as they are
    for key in a:
        assert torch.equal(a[key], b[key]), key  # the same random tower from the same seed
    torch.manual_seed(4)
    with torch.no_grad():
        for p in ref.parameters():  # every weight away from its init (layer scale, norms), then copied over
            p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(ref.state_dict())
    ref.output_tokens = ours.output_tokens = True
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        p1, t1 = ref.eval()(x)
        p2, t2 = ours.eval()(x)
    torch.testing.assert_close(p2, p1, rtol=0, atol=0)
    torch.testing.assert_close(t2, t1, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(40, 48), (301, 200), (17, 90), (32, 32), (10, 12), (33, 31)])
@pytest.mark.parametrize("how", [{}, {"interpolation": "bilinear", "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)},
                                 {"resize_mode": "squash"}])
def test_the_preprocessing_is_open_clips(size, how):
    expected = open_clip.image_transform(32, is_train=False, **how)
    ours = vit.Preprocess(32, **how)
    pixels = np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    for image in (Image.fromarray(pixels), Image.fromarray(pixels).convert("L")):
        torch.testing.assert_close(ours(image), expected(image), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14", "ViT-B-16-quickgelu", "ViT-H-14"])
def test_the_usual_clip_towers_are_covered(name):
    assert vit.supports(vit.model_config(name))


@pytest.mark.parametrize("name", ["RN50", "ViT-B-16-SigLIP", "coca_ViT-B-32", "convnext_base"])
def test_other_towers_are_left_to_open_clip(name):
    cfg = vit.model_config(name)
    assert cfg is not None and not vit.supports(cfg)


def test_the_encoder_builds_plain_random_towers_itself_and_the_rest_with_open_clip():
    ours = ClipEncoder(EncoderConfig(model="vrwkv-ViT-tiny"))
    assert isinstance(ours.visual, vit.ViTTower)
    local = ClipEncoder(EncoderConfig(model="vrwkv-ViT-tiny", image_size=48))
    assert isinstance(local.visual, vit.ViTTower) and local.image_size == (48, 48) and local.num_patches == 36
    cfg = {"embed_dim": 24, "vision_cfg": {**SMALL, "pos_embed_type": "sin_cos_2d"},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    open_clip.factory._MODEL_CONFIGS["vrwkv-test-sincos"] = cfg
    other = ClipEncoder(EncoderConfig(model="vrwkv-test-sincos"))
    assert type(other.visual) is open_clip.transformer.VisionTransformer and other.num_patches == 16


def test_the_transform_splits_into_uint8_pixels_and_a_batched_normalisation():
    """Loaders hand over pixels() and the model's device normalises a batch: the same floats as the transform."""
    ours = vit.Preprocess(32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(40, 48), (33, 31)]]
    pixels = torch.stack([ours.pixels(im) for im in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours.normalize(pixels), torch.stack([ours(im) for im in images]), rtol=0, atol=0)
    if torch.cuda.is_available():  # the same operations, each exactly rounded: the same floats on the GPU
        torch.testing.assert_close(ours.normalize(pixels.cuda()).cpu(), ours.normalize(pixels), rtol=0, atol=0)
    for bad in (pixels.float(), pixels[:, :2], pixels[0, 0]):
        with pytest.raises(VisionRWKVError, match=r"normalize takes uint8 pixels \(3, 32, 32\)"):
            ours.normalize(bad)


def test_normalize_copies_its_constants_to_a_device_once_and_pickles_without_them():
    """A copy of mean and std at every call would make the host wait for the device (on CUDA, a blocking
    host-to-device copy); they are copied once per device, and a pickled transform (for loader workers and the
    server's HTTP processes) carries no device tensors."""
    import pickle

    ours = vit.Preprocess(32)
    pixels = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    ours.normalize(pixels)
    first = ours._constants(torch.device("cpu"))
    ours.normalize(pixels)
    assert ours._constants(torch.device("cpu"))[0] is first[0] and set(ours._on_device) == {torch.device("cpu")}
    again = pickle.loads(pickle.dumps(ours))
    assert again._on_device == {} and torch.equal(again.normalize(pixels), ours.normalize(pixels))
    if torch.cuda.is_available():
        from vision_rwkv.lm.readback import count_syncs

        on_gpu = pixels.cuda()
        ours.normalize(on_gpu)
        assert count_syncs(lambda: ours.normalize(on_gpu)) == 0


def test_a_half_precision_tower_runs_in_its_dtype_whatever_the_autocast():
    """Under autocast a bf16 tower would keep an fp32 residual stream and cast around every product; it runs
    in bf16 throughout instead: the same result with autocast on or off, near the fp32 tower's."""
    torch.manual_seed(0)
    encoder = ClipEncoder(EncoderConfig(model="vrwkv-ViT-tiny")).eval()
    images = torch.randn(3, 3, *encoder.image_size)
    want_tokens, want_pooled = encoder(images)
    encoder.to(torch.bfloat16)
    tokens, pooled = encoder(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_tokens, auto_pooled = encoder(images)
    assert tokens.dtype == pooled.dtype == torch.bfloat16
    assert torch.equal(auto_tokens, tokens) and torch.equal(auto_pooled, pooled)
    for got, want in ((tokens, want_tokens), (pooled, want_pooled)):
        err = float((got.float() - want).abs().max() / want.abs().max())
        assert 0 < err < 0.05, err  # bf16 rounding, not a different function
