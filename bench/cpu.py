"""Quantized matmuls on the CPU, each way timed side by side in one run.

For each layer shape (K x N) and row count this times, on random data:

- fp32 and bf16 ``F.linear`` of the dequantized weight (what the unquantized model does);
- lowbit's reference path (``LOWBIT_KERNEL=reference``; for grouped int, dequantize the weight at
  every call, then an fp32 product);
- lowbit's CPU kernel of the format, called through the module from fp32 inputs, as an fp32 model
  calls it: ``--format int4`` (default), w4 grouped int through ``cpu-int4`` (PyTorch's int4 CPU
  kernel, ``lowbit.kernels.cpu_int4``), and ``--format w8`` 8-bit grouped int through the same kernel
  (two planes of 4-bit codes); ``--format int8``, LLM.int8 with its default threshold
  through ``cpu-int8`` (PyTorch's int8-weight kernel, ``lowbit.kernels.cpu_int8``), and
  ``--format int8-weight-only`` the same weights with floating-point activations; ``--format
  aqlm-2x8`` and ``aqlm-1x16``, AQLM weights (fp16 codebooks, groups of 8 inputs) through
  ``cpu-codebook`` (``lowbit.kernels.cpu_codebook``); ``--format nf4``, NF4 weights (blocks of 64)
  through ``cpu-int4`` (two planes of 4-bit codes, ``lowbit.kernels.cpu_blockwise4``);
- for ``int4``, ``w8``, ``nf4`` and the AQLM formats, the same weight dequantized to bf16 at every
  call and multiplied in bf16 (``lowbit.kernels.cpu_dequant``; the kernel ``auto`` takes from
  ``cpu_dequant.MIN_ROWS`` rows, AQLM from ``cpu_dequant.CODEBOOK_MIN_ROWS``), called directly at
  every row count, so the two paths' crossing shows;
- a read-stream probe: ``torch.sum`` over an fp32 tensor of as many bytes as the kernel reads for
  its weight (codes and scales), so its GB/s can be read against a plain read of the same bytes.

Each result is checked against the reference before it is timed. Times are the median of
``--repeats`` timed blocks of calls, in µs per call, the columns of a row timed in turns (one block
of each per round); ratios are against fp32 ``F.linear``.

    python bench/cpu.py                                    # SmolLM2-135M's and a Llama-7B shape
    python bench/cpu.py --shapes 4096x11008 --m 1,16 --threads 2
    python bench/cpu.py --format int8 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from timing import rel_err
from lowbit.formats.blockwise4 import Blockwise4Linear
from lowbit.formats.codebook import AqlmLinear
from lowbit.formats.int8_outlier import Int8Linear
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.kernels import cpu_int4, cpu_int8, kernels_for

SHAPES = ["576x576", "576x1536", "1536x576", "4096x4096"]  # K x N: SmolLM2-135M's projections, Llama-7B's


def per_call(calls: dict, budget: float, repeats: int) -> dict[str, float]:
    """Median µs per call of each of ``calls`` (name -> function) over ``repeats`` rounds. A round
    times one block of about ``budget`` seconds of each call in turn, so that the machine's drift
    (on shared cores the same call's time has varied up to 4x within a process) meets every column
    of a row alike, rather than whichever column was being timed when it came."""
    counts = {}
    for name, call in calls.items():
        call()
        start = time.perf_counter()
        call()
        counts[name] = max(1, int(budget / max(time.perf_counter() - start, 1e-6)))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(counts[name]):
                call()
            times[name].append((time.perf_counter() - start) / counts[name] * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def through(mod: torch.nn.Module, kernel: str, x: torch.Tensor):
    """``() -> mod(x)`` through ``kernel``, set at each call (the calls of a round take turns)."""
    def call():
        mod.kernel = kernel
        return mod(x)
    return call


def layer(k: int, n: int, group_size: int, bits: int = 4) -> IntGroupedLinear:
    g = torch.Generator().manual_seed(0)
    groups = -(-k // group_size)
    return IntGroupedLinear.from_quantized(
        torch.randint(0, 2**bits, (n, k), generator=g), (torch.rand(groups, n, generator=g) * 0.02 + 0.001).half(),
        torch.randint(0, 2**bits, (groups, n), generator=g), torch.arange(k) // group_size, bits=bits,
        group_size=group_size)


def int8_layer(k: int, n: int, int8_activations: bool) -> Int8Linear:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    return Int8Linear.from_linear(w, None, int8_activations=int8_activations)


def aqlm_layer(k: int, n: int, scheme: str) -> AqlmLinear:
    n_codebooks, nbits = (int(v) for v in scheme.split("x"))
    g = torch.Generator().manual_seed(0)
    return AqlmLinear.from_quantized(torch.randint(0, 2**nbits, (n, k // 8, n_codebooks), generator=g),
                                     torch.randn(n_codebooks, 2**nbits, 1, 8, generator=g) * 0.05,
                                     torch.rand(n, generator=g) + 0.5, None)


def build(fmt: str, k: int, n: int, group_size: int) -> tuple[torch.nn.Module, str, int] | str:
    """``(module, kernel name, bytes the kernel reads for the weight)``, or why the kernel does not apply."""
    if fmt in ("int4", "w8", "nf4"):
        if fmt == "nf4":
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05
            mod = Blockwise4Linear.from_linear(w, None, quant_type="nf4")
        else:
            mod = layer(k, n, group_size, 8 if fmt == "w8" else 4)
        held = mod.cpu_int4()
        if held is None:
            return "the kernel's layout cannot hold this weight (no sub-group of 32-256 inputs fits)"
        return mod, "cpu-int4", held.packed.numel() + held.scales_zeros.numel() * 2
    if fmt.startswith("aqlm-"):
        mod = aqlm_layer(k, n, fmt.removeprefix("aqlm-"))
        return mod, "cpu-codebook", sum(t.numel() * t.element_size() for t in (mod.codes, mod.codebooks, mod.scales))
    mod = int8_layer(k, n, int8_activations=fmt == "int8")
    if not cpu_int8.weight_supported(mod.weight):
        return f"K = {k} is not a multiple of {cpu_int8.K_MULTIPLE}"
    return mod, "cpu-int8", mod.weight.numel() + mod.SCB.numel() * 4


def dequant_call(mod: torch.nn.Module):
    """``x -> mod(x)`` through the format's ``cpu-dequant`` kernel (:mod:`lowbit.kernels.cpu_dequant`)
    at any row count (its ``supports``, which sets the rows ``auto`` takes it from, is passed over),
    or None where the format has none."""
    impl = next((i for i in kernels_for(type(mod).format) if i.name == "cpu-dequant"), None)
    return None if impl is None else lambda x: impl.fn(x, mod)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated KxN")
    p.add_argument("--m", default="1,4,16,128", help="comma-separated row counts")
    p.add_argument("--format", choices=["int4", "w8", "int8", "int8-weight-only", "aqlm-2x8", "aqlm-1x16", "nf4"], default="int4")
    p.add_argument("--group-size", type=int, default=128, help="int4's and w8's group size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    p.add_argument("--budget", type=float, default=0.2, help="seconds per timed block")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    needs = {"int4": cpu_int4.available, "w8": cpu_int4.available, "nf4": cpu_int4.available, "int8": cpu_int8.available, "int8-weight-only": cpu_int8.available}
    if args.format in needs and not needs[args.format]():
        raise SystemExit(f"this PyTorch has no CPU kernel for --format {args.format}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, format {args.format}"
          + (f", group size {args.group_size}" if args.format in ("int4", "w8") else "")
          + f"; µs per call, median of {args.repeats}\n")
    print("| K x N | M | fp32 F.linear | bf16 F.linear | lowbit reference | lowbit kernel | kernel vs fp32 "
          "| kernel vs reference | kernel GB/s | probe GB/s | error vs reference | dequant + bf16 | its error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        built = build(args.format, k, n, args.group_size)
        if isinstance(built, str):
            print(f"| {k}x{n} | - | {built} |")
            continue
        mod, kernel, weight_bytes = built
        w = mod.dequantize()  # [N, K] fp32
        wb = w.bfloat16()
        probe = torch.randn(weight_bytes // 4)
        t_probe = per_call({"probe": lambda: probe.sum()}, args.budget, args.repeats)["probe"]
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            with torch.inference_mode():
                want = through(mod, "reference", x)()
                err = rel_err(through(mod, kernel, x)(), want)
                calls = {"reference": through(mod, "reference", x), "kernel": through(mod, kernel, x),
                         "fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb)}
                dq = dequant_call(mod)
                if dq is not None:
                    dq_err = rel_err(dq(x), want)
                    calls["dequant"] = lambda: dq(x)
                t = per_call(calls, args.budget, args.repeats)
            tref, tk, t32, t16, tdq = t["reference"], t["kernel"], t["fp32"], t["bf16"], t.get("dequant")
            dq_cells = "- | - |" if dq is None else f"{tdq:.1f} | {dq_err:.1e} |"
            print(f"| {k}x{n} | {m} | {t32:.1f} | {t16:.1f} | {tref:.1f} | {tk:.1f} | {t32 / tk:.2f}x | "
                  f"{tref / tk:.1f}x | {weight_bytes / tk / 1e3:.1f} | {weight_bytes / t_probe / 1e3:.1f} | "
                  f"{err:.1e} | {dq_cells}", flush=True)


if __name__ == "__main__":
    main()
