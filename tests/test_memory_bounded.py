"""Memory-bounded quantization: the block runner's working memory is about one block plus the
calibration activations, whatever the depth of the model.

Each measurement runs in a fresh process (memory freed by earlier tests would hide growth): it
builds a random Llama, then records the peak resident set while GPTQ quantizes it, above the
resident set just before. A runner that copied the whole model, or kept every block's Hessian
or activations, would grow that working memory with the depth; the block runner must not.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import gc, json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
import lowbit
from lowbit.eval.memory import PeakMemory, current_rss_bytes, model_weight_bytes

layers, device = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
config = lowbit.GPTQConfig(bits=4, group_size=64, desc_act=True)
model_bytes = model_weight_bytes(model)
gc.collect()
start = current_rss_bytes() if device == "cpu" else torch.cuda.memory_allocated()
with PeakMemory(device) as peak:
    lowbit.quantize(model, config, ids, device=device, progress=False)
print(json.dumps({"model_bytes": model_bytes, "working_bytes": peak.peak_bytes - start, "method": peak.method}))
"""


def measure(layers: int, device: str = "cpu") -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(layers), device], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def least_working(layers: int, runs: int = 2) -> dict:
    """The run with the least working memory: the resident set of the same work varies by ~10 MB
    from run to run (what the allocator keeps), and once in a while by more."""
    return min((measure(layers) for _ in range(runs)), key=lambda r: r["working_bytes"])


def test_working_memory_does_not_grow_with_depth():
    shallow, deep = least_working(2), least_working(16)
    grown_model = deep["model_bytes"] - shallow["model_bytes"]
    grown_work = deep["working_bytes"] - shallow["working_bytes"]
    assert grown_model > 50 * 2**20
    # 8x the blocks: the model grows by ~60 MB. What this guards against grows the working memory
    # by about that much or more (a copy of the model; every block's Hessians, ~5 MB a block). The
    # same run at one depth measured 42-59 MB of working memory over six runs on the 2-core
    # development machine, so the least of two per depth can still differ by ~15 MB: the bound is half.
    assert grown_work < 0.5 * grown_model, (shallow, deep)


@pytest.mark.gpu
def test_gpu_working_memory_does_not_grow_with_depth():
    """The model stays on the CPU; the GPU holds one block at a time. Peak GPU memory has a fixed
    part (cuBLAS workspaces, tens of MiB on Hopper) that does not depend on the model, so the test
    compares depths, as on the CPU: 8x the blocks must not grow the GPU's working memory by more
    than a small fraction of what the model grows."""
    shallow, deep = measure(2, "cuda"), measure(16, "cuda")
    grown_model = deep["model_bytes"] - shallow["model_bytes"]
    grown_work = deep["working_bytes"] - shallow["working_bytes"]
    assert grown_work < 0.25 * grown_model, (shallow, deep)
