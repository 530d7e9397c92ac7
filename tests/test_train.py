"""train_caption.py end to end on the CPU: configs compose, the loss falls, resume is exact."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from vision_rwkv.caption.model import load_caption_model
from vision_rwkv.cli import train as train_caption
from vision_rwkv.train.trainer_state import read_trainer_state

CONF = Path(train_caption.CONF_DIR)
GROUPS = ["encoder", "projector", "decoder", "data", "sampling", "optim", "trainer", "experiment"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), group


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in options(g)])
def test_every_config_composes_into_the_schema(override):
    extra = ["init_decoder=/models/x.pth"] if "coco_vitl14" in override else []
    cfg = train_caption.to_caption_config(train_caption.compose([override, *extra]))
    group, name = override.split("=")
    if group == "experiment" and name == "shapes_demo":
        assert cfg.encoder.model == "vrwkv-ViT-shapes" and cfg.tokenizer == "train"
    if group == "experiment" and name.startswith("coco"):
        assert cfg.encoder.model == "ViT-L-14" and cfg.decoder.n_embd == 1024 and cfg.projector.kind == "resampler"


@pytest.mark.parametrize("bad", ["trainer.max_stepz=3", "trainer.max_steps=many", "projector=transformer",
                                 "projector.kind=transformer", "sampling.strategy=nucleus", "trainer.precision=fp16",
                                 "data.source=coco", "decoder.wkv_impl=triton"])
def test_misspelt_keys_and_wrong_types_fail_at_compose_time(bad):
    with pytest.raises((HydraException, OmegaConfBaseException)):
        train_caption.to_caption_config(train_caption.compose([bad]))


def test_main_reports_bad_config_in_one_line(capsys):
    assert train_caption.main(["trainer.max_stepz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_stepz" in err[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from data_prep import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    assert make_shapes.main(["--out", str(root), "--train", "48", "--val", "6", "--test", "4", "--size", "32"]) == 0
    return root


def tiny(shapes, out, *extra):
    return [
        "experiment=shapes_demo", "encoder=tiny", f"data.path={shapes}", "data.feature_cache=null",
        "data.batch_size=8", "decoder.n_layer=2", "decoder.n_embd=64", "decoder.head_size=16",
        "decoder.wkv_impl=chunked", "tokenizer_vocab_size=80", f"trainer.out_dir={out}", "trainer.log_every=1",
        "trainer.progress=false", "data.val_subset=3", "sampling.max_new_tokens=6", "optim.warmup_steps=2",
        "data.num_workers=0", *extra,
    ]


def losses(out):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r for r in rows if "val_loss" in r]


def test_tiny_run_lowers_the_loss_and_writes_a_loadable_checkpoint(shapes, tmp_path):
    out = tmp_path / "run"
    args = tiny(shapes, out, "trainer.max_steps=24", "trainer.eval_every=12", "trainer.save_every=12",
                "optim.lr_all=3e-3", "trainer.projector_steps=4")
    assert train_caption.main(args) == 0
    loss, evals = losses(out)
    assert sorted(loss) == list(range(1, 25))
    assert sum(loss[s] for s in range(21, 25)) / 4 < 0.7 * sum(loss[s] for s in range(1, 5)) / 4
    assert len(evals) == 2 and evals[1]["val_loss"] < evals[0]["val_loss"] and "val_cider" in evals[0]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-0000012", "step-0000024"]
    model = load_caption_model(out / "checkpoints" / "step-0000024")
    assert model.tokenizer.vocab_size == model.decoder.config.vocab_size
    latest = load_caption_model(out / "checkpoints" / "latest")  # the run's pointer file works too
    for x, y in zip(model.state_dict().values(), latest.state_dict().values()):
        assert torch.equal(x, y)
    assert {"trainer_state.json", "trainer_state.safetensors"} <= set(os.listdir(out / "checkpoints" / "step-0000024"))
    record = json.loads((out / "checkpoints" / "step-0000024" / "provenance.json").read_text())
    assert record["command"].startswith("train_caption.py experiment=shapes_demo") and "trainer.max_steps=24" in \
        record["overrides"]
    assert record["step"] == 24 and record["data"]["images"] == 48
    assert record["data"]["fingerprint"].startswith("sha256")
    assert set(record["metrics"]) >= {"loss", "val_loss", "val_cider"} and record["metrics"]["val_step"] == 24
    assert "version" in record["code"] and model.provenance == record  # loaded with the weights
    saved = yaml.safe_load((out / "checkpoints" / "step-0000024" / "config.yaml").read_text())  # plain strings
    assert (saved["projector"]["kind"], saved["sampling"]["strategy"], saved["data"]["source"]) == ("mlp", "greedy",
                                                                                                   "shapes")
    assert any((out / "tensorboard").iterdir())


def test_projector_stage_freezes_the_decoder(shapes, tmp_path):
    out = tmp_path / "run"
    assert train_caption.main(tiny(shapes, out, "trainer.max_steps=3", "trainer.projector_steps=3",
                                   "trainer.eval_every=0", "trainer.save_every=3")) == 0
    trained = load_caption_model(out / "checkpoints" / "step-0000003")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["stage"] == "projector" for r in rows if "stage" in r)
    # AdamW keeps state only for parameters that received gradients: the projector's, not the decoder's
    record, tensors = read_trainer_state(out / "checkpoints" / "step-0000003")
    n_proj = sum(1 for _ in trained.projector.parameters())
    assert len(record["optimizer"]["state"]) == n_proj
    assert len([k for k in tensors if k.startswith("optimizer.") and k.endswith(".exp_avg")]) == n_proj


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(shapes, tmp_path):
    common = ["trainer.max_steps=10", "trainer.eval_every=5", "trainer.save_every=5", "trainer.projector_steps=3"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_caption.main(tiny(shapes, full, *common)) == 0
    assert train_caption.main(tiny(shapes, split, *common, "trainer.stop_after=4")) == 0
    assert sorted(losses(split)[0]) == [1, 2, 3, 4]
    assert train_caption.main(tiny(shapes, split, *common, "trainer.resume=true")) == 0
    a, ea = losses(full)
    b, eb = losses(split)
    assert sorted(b) == list(range(1, 11))
    for step in range(1, 11):
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step
    assert [e["val_loss"] for e in ea] == pytest.approx([e["val_loss"] for e in eb], rel=1e-6)
    ma = load_caption_model(full / "checkpoints" / "step-0000010")
    mb = load_caption_model(split / "checkpoints" / "step-0000010")
    for (k, x), y in zip(ma.decoder.state_dict().items(), mb.decoder.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=k)


def test_dataloader_workers_give_the_same_run(shapes, tmp_path):
    common = ["trainer.max_steps=4", "trainer.eval_every=0", "trainer.save_every=4", "trainer.projector_steps=1"]
    common += [f"data.feature_cache={tmp_path / 'cache'}"]  # cached features, read by __getitems__ in the workers
    assert train_caption.main(tiny(shapes, tmp_path / "w0", *common, "data.num_workers=0")) == 0
    assert train_caption.main(tiny(shapes, tmp_path / "w2", *common, "data.num_workers=2")) == 0
    assert losses(tmp_path / "w0")[0] == losses(tmp_path / "w2")[0]


def test_activation_checkpointing_gives_the_same_run(shapes, tmp_path, monkeypatch):
    """trainer.activation_checkpointing=true recomputes the decoder's blocks in backward: the same losses."""
    import vision_rwkv.lm.rwkv7 as rwkv7_module

    calls = []
    real = rwkv7_module.checkpoint
    monkeypatch.setattr(rwkv7_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = ["trainer.max_steps=3", "trainer.eval_every=0", "trainer.save_every=3", "trainer.projector_steps=1"]
    assert train_caption.main(tiny(shapes, tmp_path / "plain", *common)) == 0
    assert not calls
    assert train_caption.main(tiny(shapes, tmp_path / "recompute", *common,
                                   "trainer.activation_checkpointing=true")) == 0
    assert len(calls) >= 2 * 2  # 2 blocks, at least the two steps that train the decoder
    plain, recompute = losses(tmp_path / "plain")[0], losses(tmp_path / "recompute")[0]
    assert plain.keys() == recompute.keys() == {1, 2, 3}
    for step in plain:
        assert abs(plain[step] - recompute[step]) <= 1e-5 * abs(plain[step]), step


def test_feature_cache_is_built_once_and_used(shapes, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = tiny(shapes, out, "trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=2",
                f"data.feature_cache={cache}")
    assert train_caption.main(args) == 0
    built = list(cache.glob("*/train/dataset_info.json"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    again = [a for a in args if not a.startswith("trainer.out_dir=")] + [f"trainer.out_dir={tmp_path / 'run2'}"]
    assert train_caption.main(again) == 0
    assert built[0].stat().st_mtime_ns == stamp


def test_cache_features_command_builds_what_training_then_uses(shapes, tmp_path, capsys):
    from data_prep import cache_features

    out, cache = tmp_path / "run", tmp_path / "cache"
    args = tiny(shapes, out, "trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=2",
                f"data.feature_cache={cache}")
    assert cache_features.main(["--device", "cpu", "--splits", "train,val", *args]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == ["train", "val"]
    built = sorted(cache.glob("*/*/dataset_info.json"))
    assert [p.parent.name for p in built] == ["train", "val"]
    stamps = [p.stat().st_mtime_ns for p in built]
    assert train_caption.main(args) == 0  # the random tower has the same weights, so the same cache key
    assert sorted(cache.glob("*/*/dataset_info.json")) == built
    assert [p.stat().st_mtime_ns for p in built] == stamps
    assert cache_features.main(["--device", "cpu", *args, "data.feature_cache=null"]) == 2
    assert "data.feature_cache is not set" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_stops_the_cache_in_one_line_naming_it(shapes, tmp_path, capsys, workers):
    """Decoded in DataLoader workers or in this process, a broken image is one line with its path, and no
    cache folder is left as if complete."""
    import shutil

    from data_prep import cache_features

    data = tmp_path / "shapes"
    shutil.copytree(shapes, data)
    broken = sorted(data.rglob("*.png"))[5]
    broken.write_bytes(b"not a png")
    cache = tmp_path / "cache"
    args = tiny(data, tmp_path / "run", f"data.feature_cache={cache}")
    assert cache_features.main(["--device", "cpu", "--workers", str(workers), *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line and "examples/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("cache_features.py: ") and f"{broken.parent.name}/{broken.name}: " \
        in lines[0] and "not an image" in lines[0]
    assert "Traceback" not in lines[0] and "worker" not in lines[0]  # the reason itself, not a worker's report
    assert not list(cache.glob("*/*/dataset_info.json"))


def test_cached_features_match_the_encoder_and_batches_match_items(shapes, tmp_path):
    import datasets

    from vision_rwkv.caption.encoder import ClipEncoder
    from vision_rwkv.caption.images import load_image
    from vision_rwkv.lm.tokenizer import train_bpe
    from vision_rwkv.train.data import load_source
    from vision_rwkv.train.features import PairDataset, caption_pairs, feature_cache

    cfg = train_caption.to_caption_config(
        train_caption.compose(["experiment=shapes_demo", "encoder=tiny", f"data.path={shapes}"]))
    encoder = ClipEncoder(cfg.encoder)
    rows = load_source(cfg.data)["train"]
    cached = feature_cache(encoder, rows, tmp_path / "cache", "train", batch_size=5)
    assert isinstance(cached.features["tokens"], datasets.Array2D)
    with torch.no_grad():
        tokens, pooled = encoder(encoder.preprocess(load_image(rows[3]["image"]))[None])
    cached.set_format("torch", columns=["tokens", "pooled"])
    torch.testing.assert_close(cached[3]["tokens"].float(), tokens[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(cached[3]["pooled"].float(), pooled[0], rtol=2e-3, atol=2e-3)
    # decoded by two DataLoader worker processes: the same cache, in the same order, bit for bit
    workers = feature_cache(encoder, rows, tmp_path / "cache2", "train", batch_size=5, num_workers=2)
    assert workers["image"] == rows["image"]
    workers.set_format("torch", columns=["tokens", "pooled"])
    for column in ("tokens", "pooled"):
        assert torch.equal(workers[:][column], cached[:][column])

    tok = train_bpe([c for caps in rows["captions"] for c in caps], 80)
    ds = PairDataset(rows, caption_pairs(rows), tok, 4, features=cached)
    assert ds.truncated > 0  # captions of the shapes grammar are longer than 4 tokens
    picks = [7, 0, 31, 7]
    batch = ds.__getitems__(picks)
    for i, item in zip(picks, batch):
        one = ds[i]
        assert item["caption"] == one["caption"] and len(one["caption"]) <= 4 and item["row"] == one["row"]
        assert torch.equal(item["tokens"], one["tokens"]) and torch.equal(item["pooled"], one["pooled"])


def test_long_captions_are_cut_with_one_warning(shapes, tmp_path):
    args = tiny(shapes, tmp_path / "run", "trainer.max_steps=1", "trainer.eval_every=0", "trainer.save_every=0",
                "data.max_caption_tokens=3")
    with pytest.warns(UserWarning, match=r"training captions are longer than data.max_caption_tokens=3") as rec:
        assert train_caption.main(args) == 0
    assert sum("max_caption_tokens" in str(w.message) for w in rec) == 1


def test_an_rwkv4_decoder_trains_resumes_and_captions(shapes, tmp_path):
    """decoder=rwkv4_* presets pick the RWKV-4 generation; the same trainer, checkpoints and captioner serve it."""
    from vision_rwkv import RWKV4, Captioner, SamplingConfig

    out = tmp_path / "run"
    args = [a for a in tiny(shapes, out) if not a.startswith("decoder.")]
    args += ["decoder=rwkv4_169m", "decoder.n_layer=2", "decoder.n_embd=64", "decoder.wkv_impl=reference",
             "trainer.max_steps=16", "trainer.save_every=8", "trainer.eval_every=16", "optim.lr_all=3e-3"]
    assert train_caption.main(args) == 0
    loss, _ = losses(out)
    assert sum(loss[s] for s in range(13, 17)) / 4 < 0.8 * sum(loss[s] for s in range(1, 5)) / 4
    model = load_caption_model(out / "checkpoints" / "step-0000016")
    assert isinstance(model.decoder, RWKV4) and model.config.decoder.arch.value == "rwkv4"

    resumed = [a.replace(str(out), str(tmp_path / "resumed")) for a in args]  # stopped at step 6, resumed
    assert train_caption.main(resumed + ["trainer.stop_after=6"]) == 0
    assert train_caption.main(resumed + ["trainer.resume=true"]) == 0
    again = load_caption_model(tmp_path / "resumed" / "checkpoints" / "step-0000016")
    for (name, x), y in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)

    image = next((shapes / "images" / "test").glob("*.png"))
    result = list(Captioner(model).caption_paths([image], SamplingConfig(strategy="beam", num_beams=2)))
    assert result[0].error is None and result[0].caption
