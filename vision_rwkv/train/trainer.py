"""The training loop (no config parsing: train_caption.py turns Hydra's config into a CaptionConfig).

    train(cfg) -> summary dict

- GPT mode over [prefix | prompt | caption | eos]; bf16 autocast on CUDA, fp32 on the CPU.
- AdamW on the model's parameter groups; linear warmup then cosine, per stage: "projector" (decoder
  frozen, lr = optim.lr) for trainer.projector_steps steps, then "all" (lr = optim.lr_all).
- The loss of a step is the sum over every caption token of the global batch (all ranks, all
  accumulation micro-batches) divided by their count, so 2 ranks x batch B equal 1 rank x batch 2B.
- Every eval_every steps: validation loss and CIDEr of greedy RNN-mode captions on data.val_subset
  images. Every save_every steps (and at the end): an atomic checkpoint folder with the weights, the
  resolved config, the tokenizer, and the trainer state (optimizer, step, data position, RNG states;
  vision_rwkv.train.trainer_state, no pickle); trainer.keep_last prunes the oldest.
- The run folder (vision_rwkv.train.run_folder) is claimed first: a folder that holds a run is refused unless
  trainer.resume=true (continue it) or trainer.overwrite=true (replace it).
- resume=true continues from <out_dir>/checkpoints/latest exactly: same batches, same RNG draws. An
  unreadable latest checkpoint falls back to the newest readable one, saying so.
- Under torchrun each rank reads its slice of every global batch; rank 0 evaluates and writes. Waits for
  rank 0's one-time work (BPE, feature cache, evaluation) run on a gloo group with a 24 h timeout.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .._faults import fault_point
from .._fs import atomic_file
from ..caption.model import CaptionModel, build_caption_model, load_caption_model, save_caption_model
from ..config import CaptionConfig
from ..errors import OutputError, VisionRWKVError
from .data import get_split, load_source
from .distributed import Dist, SharedError
from .evaluate import LossModule, evaluate_model
from .features import PairDataset, PairSampler, caption_pairs, collate, feature_cache
from .provenance import data_fingerprint, new_record
from .run_folder import MetricsLog, RunFolder, claim
from .trainer_state import load_trainer_state, read_trainer_state, save_trainer_state

# ---- small pieces -----------------------------------------------------------------------------------


def lr_at(step: int, cfg: CaptionConfig) -> tuple[str, float]:
    """(stage, learning rate) at a global step: warmup then cosine within each stage."""
    o, t = cfg.optim, cfg.trainer
    if step < t.projector_steps:
        stage, base, start, length = "projector", o.lr, 0, t.projector_steps
    else:
        stage, base, start, length = "all", o.lr_all, t.projector_steps, max(1, t.max_steps - t.projector_steps)
    s = step - start
    if s < o.warmup_steps:
        return stage, base * (s + 1) / o.warmup_steps
    progress = min(1.0, (s - o.warmup_steps) / max(1, length - o.warmup_steps))
    return stage, base * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- the trainer ------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: CaptionConfig, provenance: dict | None = None):
        self.cfg = cfg
        self.invocation = provenance or {}
        self.run_folder = RunFolder(cfg.trainer.out_dir)
        self.out = self.run_folder.out
        self.dist = Dist(cfg.trainer.device)
        self.device = self.dist.device
        precision = cfg.trainer.precision
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.metrics = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.trainer.seed)
        metrics_log, resumed = self._claim()
        self.data = load_source(cfg.data)
        self.train_rows = get_split(self.data, cfg.data.train_split)
        self.val_rows = self.data[cfg.data.val_split] if cfg.data.val_split in self.data else None
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.resume_from = resumed[0] if resumed else None
        self.model = resumed[1] if resumed else self._model()
        self.model.to(self.device)
        self.model.decoder.activation_checkpointing = cfg.trainer.activation_checkpointing
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(cfg.optim.weight_decay, train_decoder=True),
            lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        )
        self.train_loader, self.sampler = self._loader()
        self.stage = None
        self.ddp = None
        if resumed:
            self._resume_position(resumed[0], *resumed[2:])
        self.provenance = self._provenance()
        self.metrics = MetricsLog(self.run_folder, metrics_log, keep_through_step=self.step)
        self._say(*self.metrics.notes)

    def _provenance(self) -> dict:
        """The record every checkpoint carries (train/provenance.py); a resumed run keeps the first one's
        creation and command, and lists the commands that continued it."""
        cfg, inv = self.cfg, self.invocation
        data = data_fingerprint(self.train_rows, cfg.data.source, cfg.data.path, cfg.data.train_split)
        record = new_record(inv.get("command"), inv.get("overrides"), data)
        earlier = self.model.provenance if self.resume_from is not None else None
        if earlier:
            record.update(created=earlier.get("created"), command=earlier.get("command"),
                          overrides=earlier.get("overrides", []),
                          resumed=[*earlier.get("resumed", []), {"at_step": self.step, "command": inv.get("command"),
                                                                  "overrides": list(inv.get("overrides") or [])}])
        return record

    def _say(self, *lines: str) -> None:
        """One line each on stderr, from rank 0."""
        if self.dist.main:
            for line in lines:
                warnings.warn(f"vision_rwkv: {line}", stacklevel=3)

    # ---- setup ------------------------------------------------------------------------------------------

    def _claim(self):
        """Rank 0 claims the run folder (see run_folder.claim) and picks the checkpoint to resume from; every
        rank then loads that checkpoint. Returns (rank 0's locked metrics log or None, the resumed
        (folder, model, record, tensors) or None)."""
        t = self.cfg.trainer
        plan, metrics_log, loaded = None, None, None
        if self.dist.main:
            try:
                metrics_log, notes = claim(self.run_folder, resume=t.resume, overwrite=t.overwrite)
                self._say(*notes)
                if t.resume:
                    loaded = self._find_resume_point()
                plan = loaded[0] if loaded else None
            except VisionRWKVError as e:
                plan = e
                if metrics_log is not None:
                    metrics_log.close(remove_if_empty=True)
        plan = self.dist.share(plan)
        if isinstance(plan, VisionRWKVError):
            raise plan if self.dist.main else SharedError(str(plan))
        if plan is not None and loaded is None:  # another rank: load what rank 0 chose
            loaded = (plan, load_caption_model(plan), *read_trainer_state(plan))
        return metrics_log, loaded

    def _find_resume_point(self):
        """(folder, model, record, tensors) of the checkpoint to resume from: the one `latest` names, else the
        newest one that reads whole; None (said in one line) when the folder has no checkpoint."""
        candidates = self.run_folder.resume_candidates()
        if not candidates:
            self._say(f"trainer.resume=true but {self.run_folder.checkpoint_dir} holds no checkpoint: starting "
                      "from step 0")
            return None
        failures = []
        if self.run_folder.latest() is None:
            failures.append(f"{self.run_folder.latest_path} is missing or names no checkpoint")
        for folder in candidates:
            try:
                record, tensors = read_trainer_state(folder)
                model = load_caption_model(folder)
            except VisionRWKVError as e:
                failures.append(f"{folder.name} cannot be read: {e}")
                continue
            if failures:
                self._say(f"{failures[0]}; resuming from {folder.name}, the newest complete checkpoint")
            return folder, model, record, tensors
        raise VisionRWKVError(f"no checkpoint in {self.run_folder.checkpoint_dir} can be resumed from: "
                              f"{failures[-1]}")

    def _model(self) -> CaptionModel:
        cfg = self.cfg
        tok_file = self.out / "tokenizer.json"
        if cfg.tokenizer == "train":  # rank 0 trains the BPE; every rank loads the same file
            if self.dist.main:
                from ..lm.tokenizer import train_bpe

                caps = [c for cs in self.train_rows["captions"] for c in cs]
                tok = train_bpe(caps, cfg.tokenizer_vocab_size)
                with atomic_file(tok_file) as tmp:
                    tok.tk.save(str(tmp))
            self.dist.wait_for_main()
            from ..lm.tokenizer import HFTokenizer

            return build_caption_model(dataclasses.replace(cfg, tokenizer="train"), tokenizer=HFTokenizer(tok_file))
        return build_caption_model(cfg)

    def _loader(self):
        cfg, model = self.cfg, self.model
        features = None
        if cfg.data.feature_cache:
            features = self._features(self.train_rows, cfg.data.train_split)
        pairs = caption_pairs(self.train_rows)
        ds = PairDataset(self.train_rows, pairs, model.tokenizer, cfg.data.max_caption_tokens,
                         preprocess=model.encoder.preprocess, features=features)
        if ds.truncated and self.dist.main:
            warnings.warn(f"vision_rwkv: {ds.truncated} of {len(pairs)} training captions are longer than "
                          f"data.max_caption_tokens={cfg.data.max_caption_tokens} tokens and are cut; "
                          "raise data.max_caption_tokens to train on them whole", stacklevel=2)
        sampler = PairSampler(len(pairs), cfg.data.batch_size, cfg.trainer.seed, self.dist.rank, self.dist.world)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=cfg.data.num_workers,
                                             persistent_workers=False, pin_memory=self.device.type == "cuda")
        return loader, sampler

    def _features(self, rows, split):
        root = self.cfg.data.feature_cache
        if self.dist.main:
            feature_cache(self.model.encoder, rows, root, split, device=self.device,
                          num_workers=self.cfg.data.num_workers)
        self.dist.wait_for_main()
        return feature_cache(self.model.encoder, rows, root, split, device=self.device,
                             num_workers=self.cfg.data.num_workers)

    def _set_stage(self, stage: str) -> None:
        if stage == self.stage:
            return
        self.stage = stage
        self.model.decoder.requires_grad_(stage == "all")
        for p in self.model.decoder.unused_parameters():
            p.requires_grad_(False)
        if self.dist.world > 1:  # DDP fixes the set of trained parameters when it wraps the model
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                LossModule(self.model), device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    # ---- the loop ---------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        log = self.metrics
        stop_at = t.max_steps if t.stop_after is None else min(t.max_steps, t.stop_after)
        bar = _progress(self.step, t.max_steps, enabled=t.progress and self.dist.main)
        batches = self._batches()
        last = {}
        start = time.perf_counter()
        while self.step < stop_at:
            stage, lr = lr_at(self.step, cfg)
            self._set_stage(stage)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss, tokens, seen = self._train_step(batches)
            self.step += 1
            last = {"step": self.step, "loss": loss, "lr": lr, "stage": stage, "tokens": tokens,
                    "samples_per_s": seen / max(time.perf_counter() - start, 1e-9)}
            start = time.perf_counter()
            if self.step % t.log_every == 0 or self.step == stop_at:
                log.write(last)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            if t.eval_every and self.step % t.eval_every == 0:
                evaluation = self.evaluate(log)
                last.update(evaluation)
                self.provenance["metrics"] = {k: v for k, v in self.provenance["metrics"].items()
                                              if not k.startswith("val_")} | evaluation | {"val_step": self.step}
            self.provenance["metrics"]["loss"] = loss
            if (t.save_every and self.step % t.save_every == 0) or self.step == stop_at:
                self.save()
            fault_point("train.step_done")
        bar.close()
        return last

    def _batches(self):
        while True:
            self.sampler.set_position(self.epoch, self.batches_done)
            for batch in self.train_loader:
                self.batches_done += 1
                yield batch
            self.epoch, self.batches_done = self.epoch + 1, 0

    def _train_step(self, batches) -> tuple[float, int, int]:
        cfg = self.cfg
        micro = [next(batches) for _ in range(cfg.optim.grad_accum)]
        n_local = sum(int(b["lengths"].sum()) + len(b["lengths"]) for b in micro)  # caption tokens + eos
        n_total = self.dist.sum(float(n_local))
        module = self.ddp if self.ddp is not None else LossModule(self.model)
        self.model.train()
        total = 0.0
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            sync = nullcontext() if self.ddp is None or i == len(micro) - 1 else self.ddp.no_sync()
            with sync, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss_sum = module(batch)
                # DDP averages gradients over ranks; scale so the result is sum / n_total over all ranks
                (loss_sum * (self.dist.world / n_total)).backward()
            total += float(loss_sum.detach())
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        samples = self.dist.sum(float(sum(len(b["lengths"]) for b in micro)))
        return self.dist.sum(total) / n_total, int(n_total), int(samples)

    # ---- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, log) -> dict:
        """Validation loss and CIDEr on the first data.val_subset validation images (rank 0)."""
        out = {}
        if self.val_rows is not None and self.dist.main:
            rows = self.val_rows.select(range(min(self.cfg.data.val_subset, len(self.val_rows))))
            out = evaluate_model(self.model, rows, self.cfg, self.device, self.bf16)
            out["step"] = self.step
            log.write({"step": self.step, **{f"val_{k}": v for k, v in out.items() if k != "step"}})
        self.dist.wait_for_main()
        return {f"val_{k}": v for k, v in out.items() if k != "step"}

    # ---- checkpoints ------------------------------------------------------------------------------------

    def save(self) -> Path | None:
        folder = self.run_folder.checkpoint_dir / f"step-{self.step:07d}"
        if self.dist.main:
            position = {"step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
                        "world": self.dist.world, "batch_size": self.cfg.data.batch_size,
                        "scheduler": {"kind": "warmup_cosine", "step": self.step}}

            self.model.provenance = {**self.provenance, "step": self.step}

            def trainer_state(tmp: Path) -> None:
                save_trainer_state(tmp, optimizer=self.optimizer, position=position)
                fault_point("checkpoint.files_written")

            try:
                save_caption_model(self.model, folder, extra=trainer_state)
                self.run_folder.point_latest(folder)
            except OutputError as e:
                latest = self.run_folder.latest()
                kept = (f"trainer.resume=true continues from {latest.name}" if latest is not None else
                        "no earlier checkpoint exists")
                raise OutputError(f"{e}; the checkpoints before it are kept, and {kept}") from None
            self.run_folder.prune(self.cfg.trainer.keep_last, protect=folder)
        self.dist.barrier()
        return folder

    def _resume_position(self, folder: Path, record: dict, tensors: dict) -> None:
        """The step, data position, optimizer and RNG states of a checkpoint. A launch with another global
        batch (processes x batch size) cannot continue the epoch's order exactly: the epoch restarts."""
        cfg = self.cfg
        self.model.config = dataclasses.replace(self.model.config, trainer=cfg.trainer, data=cfg.data,
                                                optim=cfg.optim)
        load_trainer_state(record, tensors, self.optimizer)
        self.step, self.epoch, self.batches_done = record["step"], record["epoch"], record["batches_done"]
        was = (record["world"], record["batch_size"])
        now = (self.dist.world, cfg.data.batch_size)
        if was[0] * was[1] != now[0] * now[1]:
            self.batches_done = 0
            self._say(f"resuming {folder.name} ({was[0]} process(es) x batch {was[1]}) with {now[0]} x {now[1]}: the "
                      f"global batch changes from {was[0] * was[1]} to {now[0] * now[1]}, so epoch {self.epoch} "
                      f"restarts from its first batch (the step count and the schedule continue)")
        elif was != now:
            self._say(f"resuming {folder.name} ({was[0]} process(es) x batch {was[1]}) with {now[0]} x {now[1]}: the "
                      "same global batch, so the data order continues exactly")

    def close(self) -> None:
        try:
            if self.metrics is not None:
                self.metrics.close()
        finally:
            self.dist.close()


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def train(cfg: CaptionConfig, provenance: dict | None = None) -> dict:
    """Run (or resume) a training run; returns the last step's metrics. provenance: the command and its
    overrides, for every checkpoint's provenance.json."""
    trainer = Trainer(cfg, provenance)
    try:
        return trainer.run()
    finally:
        trainer.close()
