"""vision_rwkv.launch: torchrun's environment and each process's device, shared by caption.py and training."""

import pytest
import torch

from vision_rwkv.errors import VisionRWKVError
from vision_rwkv.launch import Launch


def test_no_torchrun_environment_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert Launch.from_env() == Launch(0, 1, 0) and Launch.from_env().main


def test_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    launch = Launch.from_env()
    assert (launch.rank, launch.world, launch.local_rank, launch.main) == (3, 4, 1, False)


@pytest.mark.parametrize("env,message", [
    ({"RANK": "x"}, "RANK='x'.*expected integers"),
    ({"WORLD_SIZE": "2.5"}, "WORLD_SIZE='2.5'.*expected integers"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2, WORLD_SIZE=2.*0 <= RANK < WORLD_SIZE"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
])
def test_bad_environment_is_one_line(monkeypatch, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(VisionRWKVError, match=message) as e:
        Launch.from_env()
    assert "\n" not in str(e.value)


def test_devices_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launch = Launch(1, 2, 1)
    assert launch.device("auto") == torch.device("cpu")
    assert launch.device("cpu") == torch.device("cpu")
    with pytest.raises(VisionRWKVError, match="trainer.device is 'cuda' but no CUDA device is available"):
        launch.device("cuda", "trainer.device")
    with pytest.raises(VisionRWKVError, match="device is 'gpu0', not a device name; expected auto, cpu"):
        launch.device("gpu0")


def test_each_process_gets_its_local_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launch = Launch(3, 4, 1)
    assert launch.device("auto") == torch.device("cuda:1")
    assert launch.device("cuda") == torch.device("cuda:1")
    assert launch.device("cuda:0") == torch.device("cuda:0")  # an explicit GPU is kept
    with pytest.raises(VisionRWKVError, match="LOCAL_RANK=1.*cuda:3.*only 2 CUDA device"):
        launch.device("cuda:3")
    with pytest.raises(VisionRWKVError, match="device is 'auto' but this process .LOCAL_RANK=2. would use cuda:2"):
        Launch(2, 4, 2).device("auto")  # more processes on this machine than GPUs
