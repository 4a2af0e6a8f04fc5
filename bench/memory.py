"""Peak working memory of block-by-block quantization against model size.

For random Llama models of SmolLM2-135M's width (hidden 576, MLP 1536, 9 heads / 3 KV heads) and
growing depth, each in a fresh process: the model's fp32 weight bytes, and the peak memory while
GPTQ (4-bit g128 act-order) quantizes it above the memory in use just before. On ``--device cpu``
that is the resident set (the model itself lives there too); on ``--device cuda`` the model stays
on the CPU and only the block being quantized and the calibration activations go to the GPU.

    python bench/memory.py --device cpu --layers 4 8 16 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SCRIPT = """
import gc, json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
import lowbit
from lowbit.eval.memory import PeakMemory, current_rss_bytes, model_weight_bytes

layers, device, nsamples, seqlen = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, cfg.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
model_bytes = model_weight_bytes(model)
gc.collect()
start = current_rss_bytes() if device == "cpu" else torch.cuda.memory_allocated()
t0 = time.perf_counter()
with PeakMemory(device) as peak:
    lowbit.quantize(model, lowbit.GPTQConfig(bits=4, group_size=128, desc_act=True), ids, device=device, progress=False)
print(json.dumps({"layers": layers, "model_bytes": model_bytes, "working_bytes": peak.peak_bytes - start,
                  "seconds": time.perf_counter() - t0, "method": peak.method}))
"""


def measure(layers: int, device: str, nsamples: int, seqlen: int) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(layers), device, str(nsamples), str(seqlen)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    args = p.parse_args()
    print(f"GPTQ 4-bit g128 act-order, {args.nsamples} x {args.seqlen} calibration tokens, device {args.device}")
    print("| layers | fp32 weights MiB | peak working MiB | working / weights | quantize s |")
    print("|---|---|---|---|---|")
    for layers in args.layers:
        r = measure(layers, args.device, args.nsamples, args.seqlen)
        mib = lambda n: n / 2**20  # noqa: E731
        print(f"| {layers} | {mib(r['model_bytes']):.1f} | {mib(r['working_bytes']):.1f} | "
              f"{r['working_bytes'] / r['model_bytes']:.2f} | {r['seconds']:.1f} |", flush=True)
    print(f"(peak measured by {r['method']})")


if __name__ == "__main__":
    main()
