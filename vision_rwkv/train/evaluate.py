"""The training loss as one module call, and the evaluation: validation loss and CIDEr of greedy captions."""

from __future__ import annotations

import torch

from ..caption.generate import caption_features
from ..caption.images import load_image
from ..caption.model import CaptionModel
from ..config import CaptionConfig, SamplingConfig
from .features import PairDataset, caption_pairs, collate


class LossModule(torch.nn.Module):
    """The model's training forward as one module call (what DDP wraps): batch -> summed token loss."""

    def __init__(self, model: CaptionModel):
        super().__init__()
        self.model = model

    def forward(self, batch):
        m = self.model
        if "tokens" in batch:
            tokens, pooled = batch["tokens"], batch["pooled"]
        else:
            tokens, pooled = m.encode(batch["image"])
        return m.loss_sum(tokens, pooled, batch["captions"], batch["lengths"])


@torch.no_grad()
def evaluate_model(model: CaptionModel, rows, cfg: CaptionConfig, device, bf16: bool) -> dict:
    """Mean validation loss over every caption of `rows`, and CIDEr of greedy captions for them."""
    from .metrics import cider

    model.eval()
    pairs = caption_pairs(rows)
    ds = PairDataset(rows, pairs, model.tokenizer, cfg.data.max_caption_tokens, preprocess=model.encoder.preprocess)
    loss_sum, n = 0.0, 0
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.data.batch_size, collate_fn=collate)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss_sum += float(LossModule(model)(batch))
        n += int(batch["lengths"].sum()) + len(batch["lengths"])
    result = {"loss": loss_sum / max(n, 1)}
    if cfg.trainer.cider_eval and len(rows):
        sampling = SamplingConfig(strategy="greedy", max_new_tokens=cfg.sampling.max_new_tokens,
                                  banned_tokens=list(cfg.sampling.banned_tokens),
                                  stop_tokens=list(cfg.sampling.stop_tokens))
        res, gts = {}, {}
        images = rows["image"]
        for i in range(0, len(rows), cfg.data.batch_size):
            chunk = images[i:i + cfg.data.batch_size]
            x = torch.stack([model.encoder.preprocess(load_image(p)) for p in chunk]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                tokens, pooled = model.encode(x)
                hyps = caption_features(model, tokens, pooled, sampling)
            for j, h in enumerate(hyps):
                res[i + j] = [model.tokenizer.decode(h[0].ids)]
                gts[i + j] = list(rows[i + j]["captions"])
        result["cider"] = cider(gts, res)
    return result
