"""Typed configuration dataclasses for every component.

The library takes these dataclasses, never an OmegaConf object; Hydra's YAML in conf/ fills them and
the entry scripts convert. Every field is a plain type so a config can be saved beside the weights.
Fields with a fixed set of values are Choice enums: Hydra checks them when it composes, a dataclass
built from Python or from a saved config.yaml checks them when it is made, and they are saved as the
plain strings they equal.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from .errors import VisionRWKVError


class Choice(str, Enum):
    """One of a fixed set of names: equal to its name as a string, printed and saved as it."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value, key: str):
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise VisionRWKVError(f"{key} is {value!r}; expected one of {', '.join(m.value for m in cls)}") from None


class DecoderArch(Choice):
    rwkv7 = "rwkv7"
    rwkv4 = "rwkv4"


class WKVImpl(Choice):
    auto = "auto"
    cuda = "cuda"
    chunked = "chunked"
    cpu = "cpu"
    reference = "reference"


class Strategy(Choice):
    greedy = "greedy"
    sample = "sample"
    beam = "beam"


class ProjectorKind(Choice):
    linear = "linear"
    mlp = "mlp"
    clipcap = "clipcap"
    resampler = "resampler"
    state = "state"
    state_prefix = "state_prefix"


class DataSource(Choice):
    karpathy = "karpathy"
    folder = "folder"
    shapes = "shapes"
    disk = "disk"


class Precision(Choice):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


WKV_IMPLS = tuple(m.value for m in WKVImpl)


def plain(value):
    """A config (or a part of one) as plain Python: Choice members become their strings, dataclasses dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Choice):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _lora_dim(n_embd: int, factor: float) -> int:
    # The official RWKV-7 suggestion: a multiple of 32 near factor*sqrt(C), at least 32.
    return max(32, int(round(factor * n_embd**0.5 / 32) * 32))


@dataclass
class DecoderConfig:
    """Shape of an RWKV decoder of either generation. The None fields take the official defaults.

    arch picks the generation: rwkv7 ("x070", the default, and what every config before RWKV-4 meant) or
    rwkv4. head_size and the four low-rank dims belong to RWKV-7 alone and are ignored by RWKV-4, which
    has one WKV channel per embedding channel.
    """

    arch: DecoderArch = DecoderArch.rwkv7
    vocab_size: int = 65536
    n_layer: int = 12
    n_embd: int = 768
    head_size: int = 64
    dim_ffn: Optional[int] = None  # 4 * n_embd, as in the released RWKV-7 and RWKV-4 models
    d_decay_lora: Optional[int] = None
    d_aaa_lora: Optional[int] = None
    d_mv_lora: Optional[int] = None
    d_gate_lora: Optional[int] = None
    # which WKV implementation GPT mode uses: auto | cuda | chunked (RWKV-7 only) | reference
    wkv_impl: WKVImpl = WKVImpl.auto

    def __post_init__(self):
        self.arch = DecoderArch.parse(self.arch, "decoder.arch")
        self.wkv_impl = WKVImpl.parse(self.wkv_impl, "decoder.wkv_impl")

    def resolved(self) -> DecoderConfig:
        """A copy with every None filled in, after checking that the shape is buildable."""
        for name in ("vocab_size", "n_layer", "n_embd") + (("head_size",) if self.arch == DecoderArch.rwkv7 else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise VisionRWKVError(f"decoder.{name} must be a positive integer, got {value!r}")
        c = self.n_embd
        if self.arch == DecoderArch.rwkv4:
            if self.wkv_impl == WKVImpl.chunked:
                raise VisionRWKVError(f"decoder.wkv_impl is {self.wkv_impl}, which only RWKV-7 has; expected auto, "
                                      "cuda, cpu or reference for decoder.arch=rwkv4")
            return dataclasses.replace(self, dim_ffn=self.dim_ffn or 4 * c)
        if self.n_embd % self.head_size:
            raise VisionRWKVError(
                f"decoder.n_embd ({self.n_embd}) must be a multiple of decoder.head_size ({self.head_size})"
            )
        return dataclasses.replace(
            self,
            dim_ffn=self.dim_ffn or 4 * c,
            d_decay_lora=self.d_decay_lora or _lora_dim(c, 2.5),
            d_aaa_lora=self.d_aaa_lora or _lora_dim(c, 2.5),
            d_mv_lora=self.d_mv_lora or _lora_dim(c, 1.7),
            d_gate_lora=self.d_gate_lora or _lora_dim(c, 5.0),
        )

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def describe(self) -> str:
        """A short name of the shape, e.g. for error messages: "RWKV-7 L12-D768 (head 64, vocab 65536)"."""
        if self.arch == DecoderArch.rwkv4:
            return f"RWKV-4 L{self.n_layer}-D{self.n_embd} (vocab {self.vocab_size})"
        return f"RWKV-7 L{self.n_layer}-D{self.n_embd} (head {self.head_size}, vocab {self.vocab_size})"

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        return from_dict(cls, data, "decoder")


RWKV7Config = DecoderConfig  # the name from before RWKV-4 joined; the same class (arch defaults to rwkv7)


@dataclass
class SamplingConfig:
    """How the next token is chosen. Filters act on each row of a batch of logits independently.

    The filters see the model's own distribution (temperature 1), as in RWKV-LM; the temperature
    then reshapes what survives. temperature 0 (or strategy greedy) takes the argmax.
    """

    strategy: Strategy = Strategy.greedy  # greedy | sample | beam (beam: captioning only)
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    top_a: float = 0.0  # 0.0: off; drops tokens with p < top_a * p_max**2
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 1.0  # occurrence counts are multiplied by this after every step
    banned_tokens: list[int] = field(default_factory=list)
    stop_tokens: list[int] = field(default_factory=list)  # besides the tokenizer's end-of-text
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    num_beams: int = 4
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    seed: Optional[int] = None

    def __post_init__(self):
        self.strategy = Strategy.parse(self.strategy, "sampling.strategy")

    def validate(self) -> SamplingConfig:
        """Raise one line for a value out of range, or for a field the strategy does not use (top_p under
        greedy, num_beams under sample, ...), naming the preset that uses it."""
        self.strategy = Strategy.parse(self.strategy, "sampling.strategy")
        checks = [
            (self.temperature >= 0, "sampling.temperature must be >= 0"),
            (self.top_k >= 0, "sampling.top_k must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "sampling.top_p must be in (0, 1] (1 turns it off)"),
            (0 <= self.top_a <= 1, "sampling.top_a must be in [0, 1] (0 turns it off)"),
            (0 <= self.penalty_decay <= 1, "sampling.penalty_decay must be in [0, 1]"),
            (self.max_new_tokens >= 1, "sampling.max_new_tokens must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "sampling.min_new_tokens must be in [0, max_new_tokens]"),
            (self.num_beams >= 1, "sampling.num_beams must be >= 1"),
            (1 <= self.num_return_sequences, "sampling.num_return_sequences must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise VisionRWKVError(f"{message}, got config {self.short()}")
        self._check_fields_used()
        return self

    def _check_fields_used(self) -> None:
        default = SamplingConfig()
        for name, (strategies, use) in _FIELD_USE.items():
            value = getattr(self, name)
            if self.strategy in strategies or value == getattr(default, name):
                continue
            if name == "temperature" and value == 0 and self.strategy is Strategy.greedy:
                continue  # temperature 0 means greedy
            raise VisionRWKVError(f"sampling.{name}={value} has no effect with strategy {self.strategy}; expected "
                                  f"{use}, or leave sampling.{name} out")

    def short(self) -> str:
        default = SamplingConfig()
        changed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(default, f.name)}
        return ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"


_SAMPLING_PRESET = "sampling=nucleus (strategy sample)"
_BEAM_PRESET = "sampling=beam (strategy beam)"
# The fields only some strategies read: (those strategies, what to use instead). The rest (max and min new
# tokens, banned and stop tokens, penalty_decay, seed) are read by every strategy or change nothing alone.
_FIELD_USE = {
    "temperature": ((Strategy.sample,), _SAMPLING_PRESET),
    "top_k": ((Strategy.sample,), _SAMPLING_PRESET),
    "top_p": ((Strategy.sample,), _SAMPLING_PRESET),
    "top_a": ((Strategy.sample,), _SAMPLING_PRESET),
    "presence_penalty": ((Strategy.greedy, Strategy.sample), "greedy or sampling (beam search ranks plain "
                                                             "log-probabilities)"),
    "frequency_penalty": ((Strategy.greedy, Strategy.sample), "greedy or sampling (beam search ranks plain "
                                                              "log-probabilities)"),
    "num_beams": ((Strategy.beam,), _BEAM_PRESET),
    "length_penalty": ((Strategy.beam,), _BEAM_PRESET),
    "num_return_sequences": ((Strategy.beam, Strategy.sample), f"{_BEAM_PRESET} or {_SAMPLING_PRESET}"),
}


def from_dict(cls, data: dict[str, Any], where: str):
    """Build a dataclass from a plain dict, naming the first unknown key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise VisionRWKVError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise VisionRWKVError(f"unknown key {where}.{key}; expected one of {', '.join(sorted(names))}")
    return cls(**data)


# ---- captioning ------------------------------------------------------------------------------------


@dataclass
class EncoderConfig:
    """A frozen open_clip image tower.

    pretrained: an open_clip pretrained tag ("openai", "laion2b_s34b_b79k"), a local checkpoint file, or
    "" for random weights. model may also be "local-dir:/path" (open_clip's folder format: config and
    weights together), in which case pretrained is ignored.
    """

    model: str = "ViT-B-16"
    pretrained: str = ""
    image_size: Optional[int] = None  # None: the model's own
    freeze: bool = True  # False: fine-tune the encoder (then it is saved with the checkpoint)
    # Store the tower's weights in checkpoints. None: only when they cannot be re-created from the name,
    # i.e. fine-tuned or random (pretrained ""). True suits small towers trained by data_prep.
    store_weights: Optional[bool] = None


@dataclass
class ProjectorConfig:
    """Maps encoder features to decoder prefix embeddings.

    kind: linear (patch token -> d_model), mlp (2 layers per patch token), clipcap (pooled vector ->
    prefix_len tokens through an MLP), resampler (prefix_len learned queries cross-attending to the
    patch tokens, `layers` deep); state (the image written into every layer's initial RNN state, with
    one start embedding as the prefix) and state_prefix (that state, and clipcap's prefix_len tokens).
    """

    kind: ProjectorKind = ProjectorKind.mlp
    prefix_len: int = 10  # clipcap and resampler; linear/mlp emit one token per patch (+ the pooled one)
    hidden_mult: float = 2.0  # mlp / clipcap hidden width, as a multiple of d_model
    layers: int = 2  # resampler depth
    heads: int = 8  # resampler attention heads
    dropout: float = 0.0
    state_rank: int = 128  # state, state_prefix: the width patch tokens are projected to before each layer's k, v

    def __post_init__(self):
        self.kind = ProjectorKind.parse(self.kind, "projector.kind")


@dataclass
class DataConfig:
    """Where captions and images come from (see vision_rwkv/data.py).

    source: karpathy (path = dataset_coco.json / dataset_flickr30k.json, image_root = image folder),
    folder (path = image folder with metadata.jsonl or metadata.csv), shapes (path = folder written
    by data_prep/make_shapes.py), disk (path = a datasets.save_to_disk folder from data_prep).
    """

    source: DataSource = DataSource.shapes
    path: str = ""
    image_root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    feature_cache: Optional[str] = None  # folder for precomputed encoder features (built on first use)
    max_caption_tokens: int = 48
    batch_size: int = 32
    num_workers: int = 0
    val_subset: int = 200  # images decoded for CIDEr at each evaluation
    limit: Optional[int] = None  # use only the first N training images (smoke runs)

    def __post_init__(self):
        self.source = DataSource.parse(self.source, "data.source")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # stage "all" uses lr_all
    lr_all: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainerConfig:
    out_dir: str = "runs/caption"
    max_steps: int = 1000
    projector_steps: int = 0  # first stage: projector only (decoder frozen); then everything
    eval_every: int = 200
    save_every: int = 200
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    seed: int = 0
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    overwrite: bool = False  # replace the run in out_dir (without it, a folder holding a run is refused)
    keep_last: Optional[int] = None  # keep only the N newest checkpoints; None: every one
    stop_after: Optional[int] = None  # end this invocation after this step (the schedule still spans max_steps)
    progress: bool = True
    cider_eval: bool = True
    # recompute each decoder block's activations in the backward pass instead of keeping them: memory for
    # the 1.5B and 2.9B decoders, at the cost of a second forward pass through the blocks
    activation_checkpointing: bool = False

    def __post_init__(self):
        self.precision = Precision.parse(self.precision, "trainer.precision")
        if self.keep_last is not None and self.keep_last < 1:
            raise VisionRWKVError(f"trainer.keep_last is {self.keep_last}; expected 1 or more, or null to keep "
                                  "every checkpoint")


@dataclass
class CaptionConfig:
    """Everything a captioning model and its training run need; conf/ fills it through Hydra."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # decoder weights to start from: "" (from scratch), an official RWKV-7 .pth, or a checkpoint folder
    init_decoder: str = ""
    # "world", a tokenizers .json, or "train" (byte-level BPE trained on the training captions)
    tokenizer: str = "world"
    tokenizer_vocab_size: int = 1000  # when tokenizer is "train"
    prompt: str = ""  # optional text between the image prefix and the caption, the same for every image


_SECTIONS = {
    "encoder": EncoderConfig,
    "projector": ProjectorConfig,
    "decoder": DecoderConfig,
    "data": DataConfig,
    "sampling": SamplingConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
}


def caption_config_from_dict(data: dict[str, Any]) -> CaptionConfig:
    """A CaptionConfig from plain nested dicts (a saved config.yaml, or OmegaConf.to_container output).

    Unknown keys fail with their dotted name; missing sections take their defaults.
    """
    if not isinstance(data, dict):
        raise VisionRWKVError(f"a captioning config must be a mapping, got {type(data).__name__}")
    top = {f.name for f in dataclasses.fields(CaptionConfig)}
    kwargs = {}
    for key, value in data.items():
        if key in _SECTIONS:
            kwargs[key] = from_dict(_SECTIONS[key], value, key)
        elif key in top:
            kwargs[key] = value
        else:
            raise VisionRWKVError(f"unknown config key {key!r}; expected one of {', '.join(sorted(top))}")
    return CaptionConfig(**kwargs)


def caption_config_to_dict(cfg: CaptionConfig) -> dict[str, Any]:
    """Plain dicts and strings, ready for YAML."""
    return plain(cfg)


# ---- captioning image files (caption.py, vision-rwkv caption) ---------------------------------------


class OutputFormat(Choice):
    auto = "auto"
    text = "text"
    jsonl = "jsonl"
    csv = "csv"
    coco = "coco"
    txt = "txt"


@dataclass
class CaptionJobConfig:
    """A captioning job over image files and folders: the schema of the CLI's conf/caption.yaml."""

    paths: list[str] = field(default_factory=list)
    checkpoint: Optional[str] = None  # None: the shipped demo model
    out: Optional[str] = None  # None: standard output
    format: OutputFormat = OutputFormat.auto
    batch_size: int = 32
    num_workers: Optional[int] = None  # None: one per usable CPU, at most 8
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 weights and autocast on CUDA, fp32 on the CPU | bf16 | fp32
    progress: Optional[bool] = None  # None: when stderr is a terminal
    overwrite: bool = False  # True: start afresh (no resume), replacing out, its journal and existing NAME.txt
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


# ---- serving captions over HTTP (serve.py, vision-rwkv serve) -----------------------------------------


@dataclass
class ServeConfig:
    """The captioning server: the schema of the CLI's conf/serve.yaml (vision_rwkv.serve reads it)."""

    checkpoint: Optional[str] = None  # None: the shipped demo model
    host: str = "127.0.0.1"  # loopback only unless asked
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 32  # images encoded and decoded together
    max_wait_ms: float = 5.0  # how long the worker waits for more images to batch or join together
    continuous: bool = True  # greedy and sampling rows join and leave the running decode step by step
    overlap_joins: bool = True  # CUDA: new rows' encode and prefill run on a second stream while rows decode
    max_queue: int = 256  # images waiting; beyond it requests get 503 with Retry-After
    max_body_bytes: int = 20 * 1024 * 1024  # a request body over it gets 413
    max_pixels: int = 4096 * 4096  # an image over it gets 413
    max_images: int = 16  # images in one request
    max_new_tokens: int = 128  # the most a request may ask for
    intake_threads: int = 4  # threads decoding and preprocessing uploads (each takes the GIL from the worker)
    http_processes: int = 0  # 0: HTTP and the model in one process; N: the model in its own, behind N HTTP ones
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers

    def validate(self) -> ServeConfig:
        checks = [
            (0 <= self.port <= 65535, f"port is {self.port}; expected 0 to 65535"),
            (self.max_batch >= 1, f"max_batch is {self.max_batch}; expected >= 1"),
            (self.max_wait_ms >= 0, f"max_wait_ms is {self.max_wait_ms}; expected >= 0"),
            (self.max_queue >= 1, f"max_queue is {self.max_queue}; expected >= 1"),
            (self.max_body_bytes >= 1, f"max_body_bytes is {self.max_body_bytes}; expected >= 1"),
            (self.max_pixels >= 1, f"max_pixels is {self.max_pixels}; expected >= 1"),
            (self.max_images >= 1, f"max_images is {self.max_images}; expected >= 1"),
            (self.max_new_tokens >= 1, f"max_new_tokens is {self.max_new_tokens}; expected >= 1"),
            (self.intake_threads >= 1, f"intake_threads is {self.intake_threads}; expected >= 1"),
            (self.http_processes >= 0, f"http_processes is {self.http_processes}; expected >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise VisionRWKVError(message)
        return self
