"""Models from the Hugging Face Hub, offline: every test lays out a Hub cache itself (as huggingface_hub
writes one: models--ORG--NAME/refs/main naming a snapshot folder) and loads from it with the network off.
Pushing can only be tested against a mocked Hub here (no network, no account): the mock records what
huggingface_hub's HfApi would have been asked to create and upload."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_config
from test_captioner import GREEDY, make_checkpoint, write_images

from vision_rwkv import RWKV7, Captioner, VisionRWKVError, load_decoder, save_official
from vision_rwkv.caption.model import load_caption_model
from vision_rwkv.hub import model_card, parse
from vision_rwkv.lm.hf import official_name, save_hf

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub(cache: Path, repo_id: str, source: Path, revision: str = "main") -> Path:
    """Put `source` (a folder, or one file) in a huggingface_hub cache as repo_id's snapshot at revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    if source.is_dir():
        shutil.copytree(source, snapshot)
    else:
        snapshot.mkdir(parents=True)
        shutil.copy(source, snapshot / source.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_hub_names_and_paths_are_told_apart():
    assert parse("org/name") == ("org/name", None, None)
    assert parse("org/name@v1.0") == ("org/name", None, "v1.0")
    assert parse("BlinkDL/rwkv-7-world/RWKV-x070-World-0.1B.pth") == ("BlinkDL/rwkv-7-world",
                                                                      "RWKV-x070-World-0.1B.pth", None)
    for local in ("/abs/path", "./runs/x", "../x/y", "model.pth", "a/b/../c"):
        assert parse(local) is None, local


def test_a_captioner_from_the_hub_cache_equals_the_local_one(checkpoint, tmp_path):
    cache = tmp_path / "hub"
    fake_hub(cache, "vision-rwkv/tiny-captioner", checkpoint)
    images = [str(p) for p in write_images(tmp_path / "photos", 3)]
    local = Captioner.load(str(checkpoint), device="cpu")
    remote = Captioner.from_pretrained("vision-rwkv/tiny-captioner", device="cpu", cache_dir=cache,
                                       local_files_only=True)
    assert [r.caption for r in remote.caption_paths(images, GREEDY)] == [
        r.caption for r in local.caption_paths(images, GREEDY)]


def test_the_command_line_takes_a_hub_name_offline(checkpoint, tmp_path):
    cache = tmp_path / "hub"
    fake_hub(cache, "vision-rwkv/tiny-captioner", checkpoint)
    [image] = write_images(tmp_path, 1)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "caption.py"), str(image), "checkpoint=vision-rwkv/tiny-captioner",
           "device=cpu", "num_workers=0", "sampling.max_new_tokens=8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = next(Captioner.load(str(checkpoint), device="cpu").caption_paths([str(image)], GREEDY)).caption
    assert proc.stdout.strip() == expected
    missing = subprocess.run(cmd[:3] + ["checkpoint=vision-rwkv/not-there"] + cmd[4:], env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    [line] = missing.stderr.splitlines()
    assert line.startswith("caption.py: vision-rwkv/not-there is neither a local path nor a Hugging Face Hub model")


# ---- decoders in the Hugging Face (flash-linear-attention) layout ---------------------------------------


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return randomize_(RWKV7(tiny_config()).eval())


def test_the_fla_names_are_flas(lm, tmp_path):
    """The layout fla's RWKV7ForCausalLM has (fla/layers/rwkv7.py, fla/models/rwkv7/modeling_rwkv7.py)."""
    from safetensors.torch import load_file

    save_hf(lm, tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    C, H, N = 64, 4, 16
    expected = {
        "model.embeddings.weight": (97, C), "lm_head.weight": (97, C), "model.norm.weight": (C,),
        "model.layers.0.pre_norm.weight": (C,), "model.layers.1.attn_norm.bias": (C,),
        "model.layers.1.attn.x_r": (1, 1, C), "model.layers.1.attn.k_k": (C,), "model.layers.1.attn.r_k": (H, N),
        "model.layers.1.attn.r_proj.weight": (C, C), "model.layers.1.attn.g_norm.weight": (C,),
        "model.layers.1.attn.w_lora.lora.0.weight": (8, C), "model.layers.1.attn.w_lora.lora.2.weight": (C, 8),
        "model.layers.1.attn.w_lora.lora.2.bias": (C,), "model.layers.1.attn.g_lora.lora.0.weight": (16, C),
        "model.layers.1.attn.v_lora.lora.2.bias": (C,), "model.layers.1.ffn.x_k": (C,),
        "model.layers.1.ffn.key.weight": (128, C), "model.layers.1.ffn_norm.weight": (C,),
    }
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape, name
    assert not any(k.startswith("model.layers.0.attn.v_lora") for k in sd)  # layer 0 never reads it
    assert "model.layers.1.attn.g_lora.lora.2.bias" not in sd
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "rwkv7" and config["hidden_size"] == C and config["num_hidden_layers"] == 3
    assert official_name("model.layers.2.attn.a_lora.lora.0.weight") == ("blocks.2.att.a1", True)
    with pytest.raises(KeyError):
        official_name("model.layers.2.attn.q_proj.weight")


def test_an_hf_rwkv7_from_the_hub_gives_the_logits_of_the_pth(lm, tmp_path):
    save_official(lm, tmp_path / "official.pth")
    save_hf(lm, tmp_path / "hf")
    cache = tmp_path / "hub"
    fake_hub(cache, "fla-hub/rwkv7-tiny", tmp_path / "hf")
    fake_hub(cache, "BlinkDL/rwkv-7-tiny", tmp_path / "official.pth")
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    via_pth = load_decoder(tmp_path / "official.pth", dtype=torch.float32)
    expected, _ = via_pth(tokens)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    code = ("import sys, torch; from vision_rwkv import load_decoder; "
            "t = torch.load(sys.argv[1]); a, _ = load_decoder('fla-hub/rwkv7-tiny', dtype=torch.float32)(t); "
            "b, _ = load_decoder('BlinkDL/rwkv-7-tiny/official.pth', dtype=torch.float32)(t); "
            "torch.save((a, b), sys.argv[2])")
    torch.save(tokens, tmp_path / "tokens.pt")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tokens.pt"), str(tmp_path / "out.pt")],
                          env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    from_hf, from_file = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(from_hf, expected, rtol=0, atol=0)
    torch.testing.assert_close(from_file, expected, rtol=0, atol=0)
    local = load_decoder(tmp_path / "hf", dtype=torch.float32)  # and a local HF folder loads the same way
    torch.testing.assert_close(local(tokens)[0], expected, rtol=0, atol=0)


def test_an_hf_folder_with_foreign_tensors_is_one_line(lm, tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf(lm, tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    sd["model.layers.0.attn.q_proj.weight"] = torch.zeros(4, 4)
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(VisionRWKVError, match="q_proj.weight is not a tensor of flash-linear-attention's RWKV-7"):
        load_decoder(tmp_path / "hf")


# ---- save_pretrained, model cards, push_to_hub ----------------------------------------------------------


def test_save_pretrained_writes_a_model_card_from_the_provenance(checkpoint, tmp_path):
    model = load_caption_model(checkpoint)
    model.provenance = {"command": "train_caption.py experiment=shapes_demo", "step": 3000,
                        "code": {"version": "0.1.0", "git_commit": "abc123", "git_dirty": False},
                        "data": {"source": "shapes", "path": "data/shapes", "split": "train", "images": 20000,
                                 "captions": 100000, "fingerprint": "sha256:0f"},
                        "metrics": {"loss": 0.25, "val_cider": 6.9}}
    out = model.save_pretrained(tmp_path / "export", repo_id="me/shapes-captioner")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vision_rwkv\npipeline_tag: image-to-text\n")
    for words in ("Captioner.from_pretrained(\"me/shapes-captioner\")", "checkpoint=me/shapes-captioner",
                  "train_caption.py experiment=shapes_demo", "git commit abc123", "sha256:0f", "| val_cider | 6.9 |",
                  "RWKV-7, 2 layers, width 64"):
        assert words in card, words
    again = load_caption_model(out)
    assert again.provenance == model.provenance  # provenance.json travels with the weights
    assert "## How it was made" not in model_card({"encoder": {}, "projector": {}, "decoder": {}}, None)


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls and keeps a copy of what was uploaded."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, repo_type=None, revision=None, commit_message=None):
        self.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir()),
                           (Path(folder_path) / "README.md").read_text()))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{COMMIT}"})()


def test_push_to_hub_uploads_the_folder_with_its_card_to_a_mocked_hub(checkpoint, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(FakeHub, "calls", [])
    url = load_caption_model(checkpoint).push_to_hub("me/tiny", private=True)
    assert url.endswith(COMMIT)
    (create, _, _, _), (upload, repo, files, card) = FakeHub.calls
    assert create == "create_repo" and upload == "upload_folder" and repo == "me/tiny"
    assert {"config.yaml", "model.safetensors", "README.md"} <= set(files)
    assert 'Captioner.from_pretrained("me/tiny")' in card
    with pytest.raises(VisionRWKVError, match="not a Hugging Face Hub model name"):
        load_caption_model(checkpoint).push_to_hub("not a name")
