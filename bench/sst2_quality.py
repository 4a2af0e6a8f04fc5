"""SST-2 accuracy of the embedded encoder (all-MiniLM-L6-v2) under each quantization or pruning method.

The probe is trained once on the fp32 encoder's mean-pooled embeddings of 4,000 SST-2 training
phrases and held fixed; each row quantizes the encoder and scores the 872 dev sentences with
that probe. Prints a markdown table: accuracy with its Wilson 95 % interval, the change against
fp32, weights in memory (pruned models stay dense), quantization or pruning time.

    python bench/sst2_quality.py
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import lowbit
from lowbit.checkpoint.loading import load_tokenizer
from lowbit.compress import PruneConfig, compress
from lowbit.eval.classification import reference_probe, sst2_probe_accuracy
from lowbit.eval.data import calibration_batch, calibration_texts
from lowbit.eval.memory import model_weight_bytes
from lowbit.kernels import ENV_VAR
from lowbit.models import default_encoder_path

ROWS = [
    ("RTN 8-bit g128", lowbit.RtnConfig(bits=8, group_size=128)),
    ("RTN 4-bit g128", lowbit.RtnConfig(bits=4, group_size=128)),
    ("RTN 4-bit g32", lowbit.RtnConfig(bits=4, group_size=32)),
    ("GPTQ 4-bit g128", lowbit.GPTQConfig(bits=4, group_size=128)),
    ("RTN 3-bit g128", lowbit.RtnConfig(bits=3, group_size=128)),
    ("GPTQ 3-bit g128", lowbit.GPTQConfig(bits=3, group_size=128)),
    ("bnb LLM.int8", lowbit.BitsAndBytesConfig(load_in_8bit=True)),
    ("bnb NF4", lowbit.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    ("bnb NF4 double quant", lowbit.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True)),
    ("RTN 2-bit g64 asym", lowbit.RtnConfig(bits=2, group_size=64, sym=False)),
    ("GPTQ 2-bit g64 asym", lowbit.GPTQConfig(bits=2, group_size=64, sym=False)),
    ("AQLM 2x8 g8", lowbit.AqlmConfig(num_codebooks=2, nbits_per_codebook=8)),
    ("AQLM 1x16 g8, 1 iteration, no Lloyd steps",
     lowbit.AqlmConfig(num_codebooks=1, nbits_per_codebook=16, max_iterations=1, kmeans_iterations=0)),
    ("magnitude 50%", PruneConfig(method="magnitude")),
    ("Wanda 50%", PruneConfig(method="wanda")),
    ("SparseGPT 50%", PruneConfig(method="sparsegpt")),
    ("SparseGPT 2:4", PruneConfig(method="sparsegpt", pattern="2:4")),
]


def main() -> None:
    # docs/quality.md's tables are scored through the reference kernels (the CPU kernels round to
    # bf16, and NF4's fits its code values); LOWBIT_KERNEL=auto scores through what auto picks
    os.environ.setdefault(ENV_VAR, "reference")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="GPTQ calibration window (BERT holds 512)")
    p.add_argument("--only", default=None, help="comma-separated texts: run only rows whose label contains one")
    args = p.parse_args()
    folder = default_encoder_path()
    tok = load_tokenizer(folder)
    probe = reference_probe(folder)
    calib = calibration_batch(tok, calibration_texts(None), args.nsamples, args.seqlen)
    enc = lowbit.from_pretrained(folder)
    base = sst2_probe_accuracy(enc, tok, probe)
    base_bytes = model_weight_bytes(enc)
    print(f"all-MiniLM-L6-v2, SST-2 dev (872), fixed probe from the fp32 encoder; GPTQ calibration "
          f"{args.nsamples} x {args.seqlen} tokens of WikiText-2 valid; torch {torch.__version__}\n")
    print("| encoder | accuracy [95% CI] | vs fp32 | weights in memory | quantize time |")
    print("|---|---|---|---|---|")
    print(f"| fp32 | {base} | - | {base_bytes / 2**20:.1f} MiB | - |", flush=True)
    for label, cfg in ROWS:
        if args.only and not any(t in label for t in args.only.split(",")):
            continue
        model = lowbit.from_pretrained(folder)
        start = time.perf_counter()
        compress(model, cfg, calib, progress=False)
        seconds = time.perf_counter() - start
        acc = sst2_probe_accuracy(model, tok, probe)
        print(f"| {label} | {acc} | {acc.value - base.value:+.3f} | {model_weight_bytes(model) / 2**20:.1f} MiB | "
              f"{seconds:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
