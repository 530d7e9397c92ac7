"""Train a captioning model: Hydra config -> vision_rwkv.config.CaptionConfig -> vision_rwkv.train.trainer.

    python train_caption.py experiment=shapes_demo
    python train_caption.py experiment=coco_vitl14_rwkv7_0.4b init_decoder=/models/RWKV-x070-World-0.4B.pth
    python train_caption.py experiment=shapes_demo trainer.resume=true          # continue a stopped run
    python train_caption.py experiment=shapes_demo trainer.overwrite=true       # replace the run in out_dir
    python train_caption.py -m experiment=shapes_demo optim.lr_all=1e-4,3e-4    # a sweep: out_dir/job-N each
    torchrun --nproc_per_node=2 train_caption.py experiment=shapes_demo         # DistributedDataParallel

Configs live in conf/ (groups encoder, projector, decoder, data, sampling, optim, trainer, experiment).
A misspelt key, a wrong type or an unknown choice (projector.kind, sampling.strategy, trainer.precision,
data.source) fails at compose time: the schema is the CaptionConfig dataclass.

Exit status: 0 when done; 2 on a config, data or checkpoint error (one line, before training starts); 3
when a checkpoint or metrics.jsonl could not be written (disk full): the checkpoints before it are kept and
trainer.resume=true continues from the last one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..config import CaptionConfig, caption_config_from_dict
from ..errors import EXIT_OK, EXIT_USAGE, VisionRWKVError, one_line, short_warnings
from . import without_shutdown_stall

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
PROG = "train_caption.py"
_prog = PROG  # the name the running command goes by (cli() sets it; Hydra's task function takes no arguments)
ConfigStore.instance().store(name="caption_schema", node=CaptionConfig)


def to_caption_config(cfg: DictConfig) -> CaptionConfig:
    """The composed Hydra config as the library's dataclass (resolved, no OmegaConf inside)."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    data.pop("hydra", None)
    return caption_config_from_dict(data)


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Train from a composed config; overrides (None under Hydra's own command line, which knows them) go into
    every checkpoint's provenance record with the command."""
    from ..train.trainer import train

    caption_cfg = to_caption_config(cfg)
    if overrides is None:
        overrides = _hydra_overrides()
        command = " ".join([_prog, *sys.argv[1:]])
    else:
        command = " ".join([_prog, *overrides])
    job = _multirun_job()
    if job is not None:  # every job of a sweep gets its own run folder, found again by the same sweep
        caption_cfg.trainer.out_dir = str(Path(caption_cfg.trainer.out_dir) / f"job-{job}")
        print(f"{_prog}: multirun job {job}: trainer.out_dir is {caption_cfg.trainer.out_dir}", file=sys.stderr)
    last = train(caption_cfg, provenance={"command": command, "overrides": list(overrides)})
    if os.environ.get("RANK", "0") == "0" and last:
        out = Path(caption_cfg.trainer.out_dir) / "checkpoints"
        latest = (out / "latest").read_text().strip() if (out / "latest").is_file() else None
        print(f"{_prog}: step {last['step']} of {caption_cfg.trainer.max_steps}, loss {last['loss']:.4f}"
              + (f"; checkpoint {out / latest}" if latest else ""), file=sys.stderr)
    return last


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _multirun_job() -> int | None:
    """The job number under `-m` (Hydra multirun), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc.job.num if hc.mode == RunMode.MULTIRUN else None


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose(config_name="train", overrides=list(overrides))


def main(overrides: list[str] | None = None, prog: str = PROG) -> int:
    """In-process entry point (tests): compose with these overrides and train. Returns the exit code."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        run(compose(overrides or []), overrides=list(overrides or []))
    except (VisionRWKVError, HydraException, OmegaConfBaseException) as e:
        return _report(e, prog)
    return EXIT_OK


def _report(e: BaseException, prog: str) -> int:
    """One line on stderr (once, from rank 0, for an error every rank shares); the exit status."""
    if not getattr(e, "quiet", False):
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
    return getattr(e, "exit_code", EXIT_USAGE)


@hydra.main(config_path="conf", config_name="train", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def cli(argv: list[str] | None = None, prog: str = PROG) -> int:
    """`python train_caption.py ...`: Hydra's own command line (multirun, --cfg, --help, tab completion), with
    its errors as one line and exit status 2, like caption.py's, instead of Hydra's report and status 1.
    Hydra reads sys.argv; argv, when given, replaces its arguments."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    global _prog
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    _prog = prog
    short_warnings(prog)
    wants_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises instead of printing its report and exiting 1
    try:
        _hydra_main()
    except (VisionRWKVError, HydraException, OmegaConfBaseException) as e:
        if wants_trace:
            raise
        return _report(e, prog)
    return without_shutdown_stall(EXIT_OK)


if __name__ == "__main__":
    sys.exit(cli())
