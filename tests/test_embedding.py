"""Sentence embeddings from a decoder: batched = one by one, chunked = whole, the poolings read the right
positions, only the decoder interface is used, and bad input is one line; for RWKV-7 and RWKV-4 alike."""

import pytest
import torch

from vision_rwkv.errors import VisionRWKVError
from vision_rwkv.lm.embedding import POOLS, embed_texts, sentence_embedding

LENGTHS = [1, 5, 13, 30, 7, 2]


@pytest.fixture(params=["rwkv7", "rwkv4"])
def tiny_model(request):
    """A random decoder of each generation (vocabulary 97): every test here runs for both."""
    from conftest import randomize_, tiny_config

    from vision_rwkv import DecoderConfig, build_decoder_model

    torch.manual_seed(0)
    cfg = tiny_config() if request.param == "rwkv7" else DecoderConfig(arch="rwkv4", vocab_size=97, n_layer=3,
                                                                        n_embd=64, dim_ffn=128)
    return randomize_(build_decoder_model(cfg)).eval()


def texts_of(lengths, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


class InterfaceOnly:
    """A decoder seen only through the interface every decoder keeps (lm/decoder.py)."""

    def __init__(self, lm):
        self._lm, self.config, self.head = lm, lm.config, lm.head

    def hidden(self, tokens=None, state=None, *, inputs_embeds=None):
        return self._lm.hidden(tokens=tokens, state=state, inputs_embeds=inputs_embeds)

    def init_state(self, batch_size):
        return self._lm.init_state(batch_size)

    def parameters(self):
        return self._lm.parameters()


class CharTokenizer:
    def encode(self, text):
        return [ord(c) % 97 for c in text]


@pytest.mark.parametrize("pool", POOLS)
def test_batched_equals_one_by_one(tiny_model, pool):
    lm = InterfaceOnly(tiny_model)
    texts = texts_of(LENGTHS)
    batched = sentence_embedding(lm, texts, pool=pool, normalize=False)
    alone = torch.cat([sentence_embedding(lm, [t], pool=pool, normalize=False) for t in texts])
    assert batched.shape == (len(texts), tiny_model.config.n_embd) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("chunk_len", [1, 4, 7, 16])
def test_chunked_equals_whole(tiny_model, pool, chunk_len):
    texts = texts_of(LENGTHS, seed=1)  # 30 is not a multiple of 4, 7 or 16
    whole = sentence_embedding(tiny_model, texts, pool=pool, chunk_len=1000, normalize=False)
    chunked = sentence_embedding(tiny_model, texts, pool=pool, chunk_len=chunk_len, normalize=False)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_poolings_read_each_rows_own_positions(tiny_model):
    texts = texts_of(LENGTHS, seed=2)
    last = sentence_embedding(tiny_model, texts, pool="last", chunk_len=4, normalize=False)
    mean = sentence_embedding(tiny_model, texts, pool="mean", chunk_len=4, normalize=False)
    for i, t in enumerate(texts):
        h, _ = tiny_model.hidden(tokens=torch.tensor([t]))  # (1,T,C), computed independently
        torch.testing.assert_close(last[i], h[0, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean[i], h[0].mean(dim=0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(last, mean, atol=1e-3)


def test_a_padded_tensor_with_lengths_ignores_what_the_padding_holds(tiny_model):
    texts = texts_of(LENGTHS, seed=3)
    T = max(LENGTHS)
    padded = torch.randint(0, 97, (len(texts), T), generator=torch.Generator().manual_seed(9))
    for i, t in enumerate(texts):
        padded[i, :len(t)] = torch.tensor(t)
    lengths = torch.tensor(LENGTHS)
    for pool in POOLS:
        torch.testing.assert_close(sentence_embedding(tiny_model, padded, lengths, pool=pool),
                                   sentence_embedding(tiny_model, texts, pool=pool), rtol=1e-5, atol=1e-5)


def test_embed_texts_keeps_input_order_and_normalises_by_default(tiny_model):
    texts = ["a much longer text than the others", "hi", "  padded with spaces  ", "middle sized text"]
    tok = CharTokenizer()
    got = embed_texts(InterfaceOnly(tiny_model), tok, texts, batch_size=3)
    want = torch.cat([sentence_embedding(tiny_model, [tok.encode(t.strip())]) for t in texts])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(texts)))
    raw = embed_texts(tiny_model, tok, texts, normalize=False)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(len(texts)), atol=1e-2)
    assert raw.dtype == torch.float32


@pytest.mark.parametrize("call, words", [
    (lambda lm: embed_texts(lm, CharTokenizer(), ["fine", "   "]), "text 1 is empty"),
    (lambda lm: embed_texts(lm, CharTokenizer(), "one string"), "wrap it in a list"),
    (lambda lm: embed_texts(lm, CharTokenizer(), ["fine"], pool="max"), "expected one of last, mean"),
    (lambda lm: embed_texts(lm, CharTokenizer(), ["fine"], batch_size=0), "batch_size"),
    (lambda lm: sentence_embedding(lm, [[1, 2], []]), "text 1 has no tokens"),
    (lambda lm: sentence_embedding(lm, []), "no texts"),
    (lambda lm: sentence_embedding(lm, [[1]], chunk_len=0), "chunk_len is 0"),
    (lambda lm: sentence_embedding(lm, [[1, 500]]), "outside this model's vocabulary"),
    (lambda lm: sentence_embedding(lm, torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 0])), "lengths"),
])
def test_bad_input_is_one_line(tiny_model, call, words):
    with pytest.raises(VisionRWKVError, match=words) as e:
        call(tiny_model)
    assert "\n" not in str(e.value)
