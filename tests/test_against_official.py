"""Our RWKV-7 against an implementation not written here: the `rwkv` PyPI package (RWKV-LM's own
inference code), with RWKV_V7_ON=1 and strategy "cpu fp32", on a random checkpoint in the official layout.

The package sets global TorchScript flags at import, so it runs in a subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import randomize_, tiny_config

from vision_rwkv import RWKV7, load_decoder, save_official

pytest.importorskip("rwkv")

REFERENCE = textwrap.dedent(
    """
    import json, sys, torch
    from rwkv.model import RWKV
    path, tokens, extra = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    model = RWKV(model=path, strategy="cpu fp32")
    seq_logits, state = model.forward(tokens, None, full_output=True)
    steps = []
    for t in extra:
        out, state = model.forward([t], state)
        steps.append(out)
    torch.save({"seq": seq_logits, "steps": torch.stack(steps), "wkv": torch.stack(state[1::3])}, path + ".out")
    """
)


@pytest.mark.parametrize("n_embd,head_size", [(64, 16), (128, 64)])
def test_logits_match_the_rwkv_package(tmp_path, n_embd, head_size):
    model = randomize_(RWKV7(tiny_config(n_embd=n_embd, head_size=head_size, dim_ffn=4 * n_embd)).eval(), seed=7)
    save_official(model, tmp_path / "model.pth")
    tokens = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    extra = [5, 17, 96, 0]
    env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", REFERENCE, str(tmp_path / "model"), json.dumps(tokens), json.dumps(extra)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = torch.load(tmp_path / "model.out")

    ours = load_decoder(tmp_path / "model.pth")
    with torch.no_grad():
        logits, state = ours(torch.tensor([tokens]))
        steps = []
        for t in extra:
            out, state = ours.step(torch.tensor([t]), state)
            steps.append(out[0])
    assert ref["seq"].shape == logits[0].shape
    assert logits.abs().max() > 1.0
    torch.testing.assert_close(logits[0], ref["seq"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(steps), ref["steps"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.wkv[:, 0], ref["wkv"], rtol=1e-4, atol=1e-4)
