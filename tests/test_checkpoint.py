"""Checkpoints: official .pth and our own folders round-trip; every load error is one clear line."""

import pytest
import torch
import yaml
from conftest import randomize_, tiny_config

from vision_rwkv import RWKV7, VisionRWKVError, load_decoder, load_tokenizer, save_decoder, save_official
from vision_rwkv.lm.checkpoint import infer_config


@pytest.fixture
def model():
    return randomize_(RWKV7(tiny_config()).eval(), seed=3)


def same_logits(a, b):
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(tokens)[0], b(tokens)[0], rtol=0, atol=0)


def test_official_pth_round_trip_and_inferred_shape(model, tmp_path):
    save_official(model, tmp_path / "rwkv7.pth")
    loaded = load_decoder(tmp_path / "rwkv7.pth")
    c = loaded.config
    assert (c.vocab_size, c.n_layer, c.n_embd, c.head_size, c.dim_ffn) == (97, 3, 64, 16, 128)
    assert (c.d_decay_lora, c.d_aaa_lora, c.d_mv_lora, c.d_gate_lora) == (8, 8, 8, 16)
    same_logits(model, loaded)


def test_official_layout_without_layer0_value_adapter(model, tmp_path):
    # Some official files omit blocks.0.att.v0/v1/v2 (layer 0 never uses them).
    unused = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
    sd = {k: v for k, v in model.state_dict().items() if k not in unused}
    torch.save(sd, tmp_path / "m.pth")
    same_logits(model, load_decoder(tmp_path / "m.pth"))


def test_squeezed_vectors_are_accepted(model, tmp_path):
    sd = {k: (v.squeeze() if k.endswith("att.x_r") else v) for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "m.pth")
    same_logits(model, load_decoder(tmp_path / "m.pth"))


def test_own_folder_round_trip_with_tokenizer(tmp_path):
    model = randomize_(RWKV7(tiny_config(vocab_size=65536)).eval(), seed=3)  # the World vocabulary's size
    folder = save_decoder(model, tmp_path / "ckpt", tokenizer=load_tokenizer("world"))
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.yaml"}
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["decoder"]["n_embd"] == 64 and config["tokenizer"] == "rwkv_vocab_v20230424"
    same_logits(model, load_decoder(folder))
    same_logits(model, load_decoder(folder / "model.safetensors"))
    assert load_tokenizer(folder).vocab_size == 65536


def test_overwriting_a_folder_is_atomic_and_leaves_no_temp(model, tmp_path):
    save_decoder(model, tmp_path / "ckpt")
    other = randomize_(RWKV7(tiny_config()).eval(), seed=9)
    save_decoder(other, tmp_path / "ckpt")
    same_logits(other, load_decoder(tmp_path / "ckpt"))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_bf16_weights_round_trip(model, tmp_path):
    m16 = model.to(torch.bfloat16)
    save_decoder(m16, tmp_path / "c")
    loaded = load_decoder(tmp_path / "c")
    assert loaded.emb.weight.dtype == torch.bfloat16
    same_logits(m16, loaded)


# ---- errors ---------------------------------------------------------------------------------------------


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_key(model, tmp_path):
    sd = model.state_dict()
    del sd["blocks.1.att.k_k"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(VisionRWKVError, match="missing key blocks.1.att.k_k") as e:
        load_decoder(tmp_path / "m.pth")
    one_line(e)


def test_unexpected_key(model, tmp_path):
    sd = model.state_dict()
    sd["blocks.0.att.extra"] = torch.zeros(3)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(VisionRWKVError, match="unexpected key blocks.0.att.extra"):
        load_decoder(tmp_path / "m.pth")


def test_mismatched_shape(model, tmp_path):
    sd = model.state_dict()
    sd["blocks.2.att.g2"] = torch.zeros(16, 65)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(VisionRWKVError, match=r"blocks.2.att.g2 has shape \(16, 65\), expected \(16, 64\)"):
        load_decoder(tmp_path / "m.pth")


@pytest.mark.parametrize("key,arch", [
    ("blocks.0.att.time_maa_x", "RWKV-6 .*does not support"),
    ("blocks.0.att.time_faaaa", "RWKV-5 .*does not support"),
    ("transformer.h.0.attn.c_attn.weight", "GPT-2"),
])
def test_other_architecture(tmp_path, key, arch):
    torch.save({key: torch.zeros(2), "emb.weight": torch.zeros(4, 2)}, tmp_path / "m.pth")
    with pytest.raises(VisionRWKVError, match=f"is {arch}.*expected an RWKV-7 or RWKV-4"):
        load_decoder(tmp_path / "m.pth")


def test_not_rwkv7_at_all(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "m.pth")
    with pytest.raises(VisionRWKVError, match="not an RWKV-7 .*or RWKV-4.* missing key emb.weight"):
        load_decoder(tmp_path / "m.pth")


def test_garbage_file_and_missing_path(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(VisionRWKVError, match="cannot read .*junk.pth as a PyTorch checkpoint") as e:
        load_decoder(tmp_path / "junk.pth")
    one_line(e)
    with pytest.raises(VisionRWKVError, match="does not exist"):
        load_decoder(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VisionRWKVError, match="empty is a folder of no known decoder format; expected one of: "
                                              "vision_rwkv checkpoint folder;.* RWKV-4 .*official RWKV-7 or RWKV-4"):
        load_decoder(tmp_path / "empty")


def test_folder_whose_weights_do_not_match_its_config(model, tmp_path):
    folder = save_decoder(model, tmp_path / "c")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["decoder"]["n_layer"] = 4
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(VisionRWKVError, match="missing key blocks.3"):
        load_decoder(folder)
    config["decoder"]["n_layers"] = 4
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(VisionRWKVError, match="unknown key decoder.n_layers"):
        load_decoder(folder)


def test_infer_config_reads_every_dimension(model):
    c = infer_config(model.state_dict())
    assert c.resolved() == model.config.resolved().__class__(**{**model.config.resolved().__dict__, "wkv_impl": "auto"})
