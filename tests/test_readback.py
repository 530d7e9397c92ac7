"""Small values between host and device: sent and read back without a wait per step (lm/readback.py)."""

import pytest
import torch

from vision_rwkv.lm import readback

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_lagged_read_returns_each_value_lag_steps_late(monkeypatch):
    monkeypatch.setattr(readback, "CPU_LAG_STEPS", 2)
    reader = readback.LaggedRead("cpu")
    seen = []
    for n in range(5):
        reader.push(torch.tensor(n))
        seen.append(reader.read())
    assert seen == [None, None, 0, 1, 2]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
def test_values_go_to_the_device_and_come_back(device):
    sent = readback.to_device([3, 1, 2], device)
    assert sent.device.type == device and sent.dtype == torch.long
    back = readback.to_host(sent * 2, torch.arange(3, device=device).double())
    assert [t.device.type for t in back] == ["cpu", "cpu"]
    assert back[0].tolist() == [6, 2, 4] and back[1].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.gpu
@cuda
def test_a_lagged_read_on_cuda_gives_the_value_pushed_lag_steps_before():
    reader = readback.LaggedRead("cuda")
    seen = []
    for n in range(readback.LAG_STEPS + 3):
        reader.push(torch.tensor(n, device="cuda") * 10)
        seen.append(reader.read())
    assert seen == [None] * readback.LAG_STEPS + [0, 10, 20]


@pytest.mark.gpu
@cuda
def test_count_syncs_counts_what_makes_the_host_wait():
    x = torch.ones(4, device="cuda")
    assert readback.count_syncs(lambda: x.sum().item()) == 1
    assert readback.count_syncs(lambda: x.tolist() + x.tolist()) == 2
    assert readback.count_syncs(lambda: readback.to_device([1, 2], "cuda") + x.sum()) == 0


@pytest.mark.gpu
@cuda
def test_a_host_copy_holds_the_values_of_when_it_was_queued():
    values = torch.arange(4, device="cuda")
    copy = readback.HostCopy(values)
    values.add_(10)  # launched after the copy: the copy must not see it
    assert copy.wait()[0].tolist() == [0, 1, 2, 3] and values.tolist() == [10, 11, 12, 13]
