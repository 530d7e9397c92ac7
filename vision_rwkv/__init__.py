"""vision_rwkv: image captioning with a frozen CLIP encoder and an RWKV-7 decoder.

Public API (stable):

    from vision_rwkv import load_decoder
    lm = load_decoder(path)                    # official RWKV-7 .pth, or a vision_rwkv checkpoint folder
    logits, state = lm(tokens)                 # GPT mode: (B,T) -> (B,T,V), final state
    logits, state = lm(tokens, state=state)    # continue from a state
    logits, state = lm.step(tokens_t, state)   # RNN mode: (B,) -> (B,V)

    from vision_rwkv import Captioner, load_caption_model
    captioner = Captioner.load(folder)         # a caption checkpoint folder; None: the shipped demo model
    results = captioner.caption_paths(paths, SamplingConfig(strategy="beam", num_beams=5))
    model = load_caption_model(folder)         # CaptionModel: encode, prefix, loss, score
"""

from .caption.captioner import Captioner, CaptionResult
from .caption.model import CaptionModel, build_caption_model, load_caption_model, save_caption_model
from .config import RWKV7Config, SamplingConfig
from .errors import VisionRWKVError
from .lm.checkpoint import save_decoder, save_official
from .lm.formats import load_decoder
from .lm.generate import generate
from .lm.rwkv7 import RWKV7
from .lm.state import RWKVState
from .lm.tokenizer import HFTokenizer, WorldTokenizer, load_tokenizer, train_bpe

__all__ = [
    "Captioner",
    "CaptionResult",
    "CaptionModel",
    "build_caption_model",
    "load_caption_model",
    "save_caption_model",
    "load_decoder",
    "save_decoder",
    "save_official",
    "RWKV7",
    "RWKV7Config",
    "RWKVState",
    "SamplingConfig",
    "VisionRWKVError",
    "generate",
    "load_tokenizer",
    "train_bpe",
    "WorldTokenizer",
    "HFTokenizer",
]
