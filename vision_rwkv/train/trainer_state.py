"""What a training checkpoint needs to resume exactly, stored without pickle.

    trainer_state.safetensors   every tensor: the optimizer's moments and steps, the torch and CUDA RNG states,
                                numpy's Mersenne Twister key
    trainer_state.json          everything else: step, epoch, batches done, the launch that wrote it
                                (processes, batch size), the optimizer's param groups, Python's and numpy's
                                RNG positions

Loading reads the tensors with safetensors and the rest with json, so resuming from a shared run folder
runs no code from it. The older trainer_state.pt (a pickle) is refused with one line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import VisionRWKVError

FORMAT = "vision_rwkv.train.trainer_state"
VERSION = 2
TENSORS = "trainer_state.safetensors"
RECORD = "trainer_state.json"
PICKLED = "trainer_state.pt"  # before version 2


# ---- random number generators ---------------------------------------------------------------------------


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(the JSON part, the tensors) of every generator a training step draws from."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    record = {"python": [version, list(words), gauss],
              "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": cached}}
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return record, tensors


def set_rng_state(record: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, words, gauss = record["python"]
    random.setstate((version, tuple(words), gauss))
    n = record["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ---- the optimizer --------------------------------------------------------------------------------------


def _split_optimizer(sd: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    record = {"param_groups": sd["param_groups"], "state": {}}
    tensors = {}
    for index, values in sd["state"].items():
        plain = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[name] = value
        record["state"][str(index)] = plain
    return record, tensors


def _join_optimizer(record: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {int(i): dict(plain) for i, plain in record["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": record["param_groups"]}


# ---- files ----------------------------------------------------------------------------------------------


def save_trainer_state(folder: Path, *, optimizer: torch.optim.Optimizer, position: dict) -> None:
    """Write both files into folder, a checkpoint's temporary folder (atomic_folder makes it whole and durable).

    position: step, epoch, batches_done, world, batch_size (JSON values)."""
    from safetensors.torch import save_file

    opt_record, tensors = _split_optimizer(optimizer.state_dict())
    rng_record, rng_tensors = rng_state()
    tensors.update(rng_tensors)
    save_file(tensors, str(Path(folder) / TENSORS), metadata={"format": FORMAT})
    record = {"format": FORMAT, "version": VERSION, **position, "rng": rng_record, "optimizer": opt_record}
    (Path(folder) / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def read_trainer_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the JSON record, the tensors) of a checkpoint, or one line saying why they cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / RECORD).is_file() and (folder / PICKLED).is_file():
        raise VisionRWKVError(f"{folder / PICKLED} is a pickle (the format before vision_rwkv 0.2), and resuming "
                              f"no longer unpickles because that can run code; expected {RECORD} and {TENSORS}: "
                              "resume it with the version that wrote it, or start a new run")
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VisionRWKVError(f"{folder} has no {RECORD}; it is not a complete training checkpoint") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise VisionRWKVError(f"cannot read {folder / RECORD} ({_first_line(e)})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise VisionRWKVError(f"{folder / RECORD} is not a trainer state (format {FORMAT!r} expected)")
    try:
        tensors = load_file(str(folder / TENSORS))
    except (SafetensorError, OSError) as e:
        raise VisionRWKVError(f"cannot read {folder / TENSORS} ({_first_line(e)})") from None
    for key in ("step", "epoch", "batches_done", "world", "batch_size", "rng", "optimizer"):
        if key not in record:
            raise VisionRWKVError(f"{folder / RECORD} has no {key!r}; it is not a complete trainer state")
    return record, tensors


def load_trainer_state(record: dict, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Put the optimizer and every RNG back where the checkpoint left them."""
    optimizer.load_state_dict(_join_optimizer(record["optimizer"], tensors))
    set_rng_state(record["rng"], tensors)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
