"""vision_rwkv: image captioning with a frozen CLIP encoder and an RWKV decoder (RWKV-7, or RWKV-4).

Public API (stable):

    from vision_rwkv import load_decoder
    lm = load_decoder(path)                    # official RWKV-7/RWKV-4 .pth, Hugging Face or vision_rwkv folder
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
from .config import DecoderConfig, RWKV7Config, SamplingConfig
from .errors import VisionRWKVError
from .lm.checkpoint import save_decoder, save_official
from .lm.decoder import Decoder, build_decoder_model
from .lm.formats import load_decoder
from .lm.generate import generate
from .lm.rwkv4 import RWKV4
from .lm.rwkv7 import RWKV7
from .lm.state import DecoderState, RWKV4State, RWKVState
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
    "Decoder",
    "DecoderConfig",
    "build_decoder_model",
    "RWKV7",
    "RWKV7Config",
    "RWKV4",
    "DecoderState",
    "RWKVState",
    "RWKV4State",
    "SamplingConfig",
    "VisionRWKVError",
    "generate",
    "load_tokenizer",
    "train_bpe",
    "WorldTokenizer",
    "HFTokenizer",
]
