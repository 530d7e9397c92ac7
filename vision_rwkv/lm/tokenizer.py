"""Tokenizers: the RWKV World vocabulary and any Hugging Face `tokenizers` JSON.

Both expose encode(text) -> list[int], decode(ids) -> str, vocab_size, eos_id and save(folder).

The World vocabulary (rwkv_vocab_v20230424, 65,536 ids) is read from the `rwkv` package's data file
(Apache-2.0). Id 0 is end-of-text. Encoding is a greedy longest match over UTF-8 bytes, so every text
round-trips exactly: all 256 single bytes are tokens.
"""

from __future__ import annotations

import ast
import functools
from importlib import resources
from pathlib import Path
from typing import Protocol

from ..errors import VisionRWKVError

WORLD_NAME = "rwkv_vocab_v20230424"
WORLD_ALIASES = ("world", WORLD_NAME)


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def encode_batch(self, texts) -> list[list[int]]: ...

    def save(self, folder: Path) -> str: ...


class WorldTokenizer:
    """Greedy longest-match byte tokenizer over the RWKV World vocabulary."""

    vocab_size = 65536
    eos_id = 0
    name = WORLD_NAME

    def __init__(self, lines: list[str] | None = None):
        if lines is None:
            lines = _world_vocab_lines()
        self.id_to_bytes: dict[int, bytes] = {}
        for line in lines:
            if not line.strip():
                continue
            head, _, rest = line.partition(" ")
            literal, _, length = rest.rpartition(" ")
            token = ast.literal_eval(literal)
            token = token.encode("utf-8") if isinstance(token, str) else token
            if len(token) != int(length):
                raise VisionRWKVError(f"World vocabulary line {head}: length {length} does not match {token!r}")
            self.id_to_bytes[int(head)] = token
        self._trie: dict = {}
        for idx, token in self.id_to_bytes.items():
            node = self._trie
            for byte in token:
                node = node.setdefault(byte, {})
            node[None] = idx  # None marks "a token ends here"

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        ids, pos, n = [], 0, len(data)
        trie = self._trie
        while pos < n:
            node, best, best_end, i = trie, None, pos, pos
            while i < n:
                node = node.get(data[i])
                if node is None:
                    break
                i += 1
                if None in node:
                    best, best_end = node[None], i
            if best is None:  # cannot happen with the World vocabulary (all bytes are tokens)
                raise VisionRWKVError(f"byte {data[pos]:#x} at offset {pos} has no token in {self.name}")
            ids.append(best)
            pos = best_end
        return ids

    def encode_batch(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids) -> bytes:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                continue
            token = self.id_to_bytes.get(i)
            if token is None:
                raise VisionRWKVError(f"token id {i} is not in {self.name}: expected 1..{max(self.id_to_bytes)}")
            out.append(token)
        return b"".join(out)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, folder: Path) -> str:
        return WORLD_NAME


@functools.lru_cache(maxsize=1)
def _world_vocab_lines() -> list[str]:
    try:
        path = resources.files("rwkv") / f"{WORLD_NAME}.txt"
        return path.read_text(encoding="utf-8").splitlines()
    except (ModuleNotFoundError, FileNotFoundError):
        raise VisionRWKVError(
            f"the World vocabulary ({WORLD_NAME}.txt) comes from the 'rwkv' package: pip install rwkv"
        ) from None


@functools.lru_cache(maxsize=1)
def world_tokenizer() -> WorldTokenizer:
    return WorldTokenizer()


class HFTokenizer:
    """Any `tokenizers` JSON: the GPT-NeoX 20B tokenizer, or a BPE trained on captions."""

    EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|eos|>")

    def __init__(self, path_or_tokenizer, eos_token: str | None = None):
        from tokenizers import Tokenizer as _HF

        if isinstance(path_or_tokenizer, _HF):
            self.tk = path_or_tokenizer
        else:
            path = Path(path_or_tokenizer)
            try:
                self.tk = _HF.from_file(str(path))
            except Exception as e:
                first = (str(e).splitlines() or [type(e).__name__])[0]
                raise VisionRWKVError(f"cannot read {path} as a tokenizers JSON file: {first}") from None
        vocab = self.tk.get_vocab(with_added_tokens=True)
        names = (eos_token,) if eos_token else self.EOS_NAMES
        eos = next((vocab[n] for n in names if n in vocab), None)
        if eos is None:
            raise VisionRWKVError(f"the tokenizer has no end-of-text token; expected one of {', '.join(names)}")
        self.eos_id = eos
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) != self.eos_id]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise VisionRWKVError(f"token id {bad} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
        return self.tk.decode(ids, skip_special_tokens=False)

    def save(self, folder: Path) -> str:
        self.tk.save(str(Path(folder) / "tokenizer.json"))
        return "tokenizer.json"


def train_bpe(texts, vocab_size: int, *, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE on an iterable of texts, with <|endoftext|> as id 0."""
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = _HF(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tk)


def load_tokenizer(spec) -> Tokenizer:
    """'world' (or rwkv_vocab_v20230424), a tokenizers .json file, a checkpoint folder, or a Hugging Face
    model folder with a tokenizer.json."""
    if spec is None:
        raise VisionRWKVError("no tokenizer given; expected 'world', a tokenizer.json path or a checkpoint folder")
    if isinstance(spec, str) and spec in WORLD_ALIASES:
        return world_tokenizer()
    path = Path(spec)
    if path.is_dir() and not (path / "config.yaml").is_file() and (path / "tokenizer.json").is_file():
        return HFTokenizer(path / "tokenizer.json")  # a Hugging Face model folder (e.g. a transformers RWKV-4)
    if path.is_dir():
        from .checkpoint import read_folder_config

        name = read_folder_config(path).get("tokenizer")
        if name is None:
            raise VisionRWKVError(f"{path}/config.yaml names no tokenizer")
        return world_tokenizer() if name in WORLD_ALIASES else HFTokenizer(path / name)
    if path.suffix == ".json" and path.is_file():
        return HFTokenizer(path)
    raise VisionRWKVError(
        f"unknown tokenizer {spec!r}; expected 'world', a tokenizers .json file or a checkpoint folder"
    )


def check_fits(tokenizer, vocab_size: int) -> None:
    """Refuse, in one line, a tokenizer whose ids a decoder of this vocabulary size cannot embed."""
    ids = getattr(tokenizer, "vocab_size", None)
    if ids is not None and ids > vocab_size:
        raise VisionRWKVError(
            f"the tokenizer has {ids} ids but the decoder's vocabulary is {vocab_size}; expected the decoder's own "
            "tokenizer (the World vocabulary for RWKV-7 World models, GPT-NeoX's tokenizer.json for RWKV-4 Pile models)"
        )
