"""Tokenizers: exact round trips, and the World tokenizer agrees with RWKV-LM's own trie tokenizer."""

import importlib.resources

import pytest

from vision_rwkv import HFTokenizer, VisionRWKVError, load_tokenizer, train_bpe

TEXTS = [
    "a small red circle to the left of a large blue square",
    "Hello, world!\n\nUser: what is 2+2?\nAssistant: 4.",
    "你好，世界。日本語のテキストも。한국어도.",
    "emoji 🙂🦀👩‍👩‍👧 and flags 🇺🇦🇯🇵",
    "tabs\tand  spaces   and \r\n line ends",
    "bytes \x00\x01\x7f é ü ß ∑ ∞",
    "",
]


@pytest.fixture(scope="module")
def world():
    return load_tokenizer("world")


@pytest.mark.parametrize("text", TEXTS)
def test_world_round_trip(world, text):
    ids = world.encode(text)
    assert all(1 <= i < 65536 for i in ids)
    assert world.decode(ids) == text


def test_world_is_greedy_longest_match_like_rwkv_lm(world):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    ref = TRIE_TOKENIZER(str(importlib.resources.files("rwkv") / "rwkv_vocab_v20230424.txt"))
    for text in TEXTS + [" ".join(TEXTS) * 3]:
        assert world.encode(text) == ref.encode(text)
    assert world.vocab_size == 65536 and world.eos_id == 0
    assert len(world.id_to_bytes) == 65529


def test_world_end_of_text_is_dropped_on_decode_and_bad_ids_are_clear(world):
    ids = world.encode("hi")
    assert world.decode(ids + [0]) == "hi"
    with pytest.raises(VisionRWKVError, match="token id 65530 is not in"):
        world.decode([65530])


def test_bpe_trained_on_captions_round_trips(tmp_path):
    captions = [f"a {s} {c} {shape} to the {p} of a {c2} {shape2}"
                for s in ("small", "large") for c in ("red", "green", "blue") for shape in ("circle", "square")
                for p in ("left", "right") for c2 in ("yellow", "purple") for shape2 in ("triangle", "star")]
    tok = train_bpe(captions, vocab_size=400)
    assert tok.eos_id == 0 and tok.vocab_size <= 400
    for text in captions[:5] + TEXTS:
        assert tok.decode(tok.encode(text)) == text
    # the trained merges make captions short
    assert len(tok.encode(captions[0])) < len(captions[0].split()) + 3
    tok.save(tmp_path)
    again = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(again, HFTokenizer)
    assert again.encode(captions[7]) == tok.encode(captions[7])


def test_neox_style_json_with_added_eos(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.save(str(tmp_path / "neox.json"))
    tok = load_tokenizer(str(tmp_path / "neox.json"))
    assert tok.decode(tok.encode("ünïcode 🙂")) == "ünïcode 🙂"


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(VisionRWKVError, match="unknown tokenizer"):
        load_tokenizer("gpt5")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VisionRWKVError, match="cannot read .*bad.json as a tokenizers JSON"):
        load_tokenizer(str(tmp_path / "bad.json"))
