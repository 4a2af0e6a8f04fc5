"""Grouped-int 4-bit matmuls on the CPU, each way timed side by side in one run.

For each layer shape (K x N) and row count this times, on random data:

- fp32 and bf16 ``F.linear`` of the dequantized weight (what the unquantized model does);
- lowbit's reference path (dequantize the weight at every call, then an fp32 product);
- lowbit's ``cpu-int4`` kernel (PyTorch's int4 CPU kernel, ``lowbit.kernels.cpu_int4``) from fp32
  inputs, as an fp32 model calls it;
- a read-stream probe: ``torch.sum`` over an fp32 tensor of as many bytes as ``cpu-int4`` reads for
  its weight (packed codes, scales and offsets), so its GB/s can be read against a plain read of
  the same bytes.

Each result is checked against the reference before it is timed. Times are the median of
``--repeats`` timed blocks of calls, in µs per call; ratios are against fp32 ``F.linear``.

    python bench/cpu.py                                    # SmolLM2-135M's and a Llama-7B shape
    python bench/cpu.py --shapes 4096x11008 --m 1,16 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kernels import rel_err
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.kernels import cpu_int4

SHAPES = ["576x576", "576x1536", "1536x576", "4096x4096"]  # K x N: SmolLM2-135M's projections, Llama-7B's


def per_call(call, budget: float, repeats: int) -> float:
    """Median µs per call over ``repeats`` blocks of calls, each block about ``budget`` seconds."""
    call()
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, int(budget / once))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def layer(k: int, n: int, group_size: int) -> IntGroupedLinear:
    g = torch.Generator().manual_seed(0)
    groups = -(-k // group_size)
    return IntGroupedLinear.from_quantized(
        torch.randint(0, 16, (n, k), generator=g), (torch.rand(groups, n, generator=g) * 0.02 + 0.001).half(),
        torch.randint(0, 16, (groups, n), generator=g), torch.arange(k) // group_size, bits=4, group_size=group_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated KxN")
    p.add_argument("--m", default="1,4,16,128", help="comma-separated row counts")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    p.add_argument("--budget", type=float, default=0.2, help="seconds per timed block")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if not cpu_int4.available():
        raise SystemExit("this PyTorch has no CPU int4 kernel (aten._weight_int4pack_mm_for_cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, group size {args.group_size}; µs per call, median of "
          f"{args.repeats}\n")
    print("| K x N | M | fp32 F.linear | bf16 F.linear | lowbit reference | lowbit cpu-int4 | cpu-int4 vs fp32 "
          "| cpu-int4 vs reference | cpu-int4 GB/s | probe GB/s | error vs reference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        mod = layer(k, n, args.group_size)
        w = mod.dequantize()  # [N, K] fp32
        wb = w.bfloat16()
        held = mod.cpu_int4()
        if held is None:
            print(f"| {k}x{n} | - | group size {args.group_size} has no sub-group the kernel takes |")
            continue
        weight_bytes = held.packed.numel() + held.scales_zeros.numel() * 2
        probe = torch.randn(weight_bytes // 4)
        t_probe = per_call(lambda: probe.sum(), args.budget, args.repeats)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            with torch.inference_mode():
                err = rel_err(cpu_int4.matmul_cpu_int4(x, held), x @ w.t())
                t32 = per_call(lambda: F.linear(x, w), args.budget, args.repeats)
                t16 = per_call(lambda: F.linear(xb, wb), args.budget, args.repeats)
                mod.kernel = "reference"
                tref = per_call(lambda: mod(x), args.budget, args.repeats)
                tint4 = per_call(lambda: cpu_int4.matmul_cpu_int4(x, held), args.budget, args.repeats)
            print(f"| {k}x{n} | {m} | {t32:.1f} | {t16:.1f} | {tref:.1f} | {tint4:.1f} | {t32 / tint4:.2f}x | "
                  f"{tref / tint4:.1f}x | {weight_bytes / tint4 / 1e3:.1f} | {weight_bytes / t_probe / 1e3:.1f} | "
                  f"{err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
