"""A quantized checkpoint on the CPU: lowbit's load against the peers', one run.

Loads the same checkpoint with lowbit (``kernel="auto"``, which takes lowbit's CPU kernel of the
format, in fp32 and in bf16, and with ``kernel="reference"``), with GPTQModel in bf16 (a GPTQ
checkpoint; its plain torch kernel refuses fp32), once per CPU backend named, and with
transformers' own quantizer of the checkpoint's method (``--transformers``: bitsandbytes for a
bitsandbytes checkpoint, the ``aqlm`` package for AQLM), once per dtype named; the fp32 original
beside them.
For each it prints prefill and batch-1 decode tokens/s (``lowbit.eval.speed.measure_speed``:
128-token prompt, 32 new tokens, median of 3) and the relative difference of its logits on one
prompt from lowbit's reference path. Every model runs in
this process, one after another, so no peak memory is reported.

GPTQModel needs a newer torch than lowbit's tests pin: run this in the GPTQModel side environment
of ``docs/usage.md``.

    lowbit quantize default --method gptq --bits 4 --group-size 128 --sym --out /tmp/gptq4
    python bench/cpu_peers.py /tmp/gptq4 --backends gptq_torch,gptq_torch_fused,auto --threads 2
    lowbit quantize default --method bitsandbytes --bits 8 --out /tmp/int8
    python bench/cpu_peers.py /tmp/int8 --backends "" --transformers float32,bfloat16 --threads 2
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import lowbit
from lowbit.eval.speed import measure_speed
from lowbit.formats.base import QuantLinear
from lowbit.kernels import select_kernel
from lowbit.models import default_causal_lm_path


PROMPT_LEN = 128
"""Tokens of the prompt timed for prefill."""

PEER_PACKAGES = ("bitsandbytes", "aqlm", "gptqmodel", "awq")
"""Packages whose modules a peer's model is named by in its row."""


def row(label: str, model, ids: torch.Tensor, want: torch.Tensor | None, load_s: float) -> torch.Tensor | None:
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids).logits.float()
    except RuntimeError as e:  # a peer kernel that cannot take this model's shapes: say so, go on
        print(f"| {label} | could not run: {str(e).splitlines()[0][:140]} | | | |", flush=True)
        return None
    speed = measure_speed(model, prompt_len=PROMPT_LEN, new_tokens=32, batch_sizes=(1,), repeats=3, warmup=1)
    diff = "-" if want is None else f"{float((logits - want).norm() / want.norm()):.1e}"
    print(f"| {label} | {PROMPT_LEN / speed.prefill.median:.0f} | {speed.decode_tokens_per_s(1):.1f} | {diff} | "
          f"{load_s:.1f} |", flush=True)
    return logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a quantized checkpoint folder")
    p.add_argument("--backends", default="gptq_torch,gptq_torch_fused,auto",
                   help="comma-separated GPTQModel BACKEND values (empty: none)")
    p.add_argument("--transformers", default="",
                   help="comma-separated dtypes to load the checkpoint in through transformers' own quantizer")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {PROMPT_LEN}-token prompt, 32 new tokens, "
          f"median of 3\n")
    print("| model | prefill tok/s | decode tok/s (batch 1) | logits vs lowbit reference | load s |")
    print("|---|---|---|---|---|")
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    original = lowbit.from_pretrained(default_causal_lm_path(), progress=False)
    row("fp32 original", original, ids, None, time.perf_counter() - start)
    del original

    start = time.perf_counter()
    model = lowbit.from_pretrained(args.checkpoint, kernel="reference", progress=False)
    want = row("lowbit, reference kernels", model, ids, None, time.perf_counter() - start)
    del model
    for dtype in (torch.float32, torch.bfloat16):
        start = time.perf_counter()
        model = lowbit.from_pretrained(args.checkpoint, dtype=dtype, progress=False)
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        with torch.no_grad():  # the kernels a decode step (one row) and the prompt take
            kernels = [sorted({select_kernel(m, torch.zeros(rows, m.in_features, dtype=dtype)).name for m in layers})
                       for rows in (1, PROMPT_LEN)]
        row(f"lowbit {str(dtype)[6:]}, kernel auto (decode {', '.join(kernels[0])}; prompt {', '.join(kernels[1])})",
            model, ids, want, time.perf_counter() - start)
        del model

    backends = [b for b in args.backends.split(",") if b]
    if backends:
        from gptqmodel import BACKEND, GPTQModel

        for name in backends:
            start = time.perf_counter()
            try:
                peer = GPTQModel.load(args.checkpoint, device="cpu", backend=BACKEND(name), dtype=torch.bfloat16)
            except Exception as e:  # a backend this machine or checkpoint cannot take: say which, go on
                print(f"| GPTQModel, backend {name} | could not load: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120]} | | | |", flush=True)
                continue
            kinds = sorted({type(m).__name__ for m in peer.model.modules()
                            if type(m).__module__.startswith("gptqmodel.nn_modules.qlinear")})
            row(f"GPTQModel bfloat16, backend {name} ({', '.join(kinds)})", peer.model, ids, want,
                time.perf_counter() - start)
            del peer

    for name in (d for d in args.transformers.split(",") if d):
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bitsandbytes warns at every fp32 call that it casts to fp16
            peer = AutoModelForCausalLM.from_pretrained(args.checkpoint, device_map="cpu", dtype=getattr(torch, name))
            kinds = sorted({type(m).__name__ for m in peer.modules() if type(m).__module__.split(".")[0] in PEER_PACKAGES})
            row(f"transformers {name} ({', '.join(kinds)})", peer, ids, want, time.perf_counter() - start)
        del peer


if __name__ == "__main__":
    main()
