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


def test_working_memory_does_not_grow_with_depth():
    shallow, deep = measure(2), measure(16)
    grown_model = deep["model_bytes"] - shallow["model_bytes"]
    grown_work = deep["working_bytes"] - shallow["working_bytes"]
    assert grown_model > 50 * 2**20
    # 8x the blocks: the model grows by ~60 MB; the working memory by a small fraction of that
    assert grown_work < 0.25 * grown_model, (shallow, deep)


@pytest.mark.gpu
def test_gpu_holds_one_block_while_the_model_stays_on_the_cpu():
    """The model (on the CPU) is several times the GPU memory the quantization may use."""
    deep = measure(16, "cuda")
    assert deep["working_bytes"] < deep["model_bytes"] / 4, deep
