"""Table lookups in the NF4 and AQLM kernels, each way timed side by side in one run.

NF4 decodes each 4-bit code through a 16-entry table, AQLM 2x8 each code through a 256-entry
codebook of 8 values. The kernels read those tables one of several ways:

- ``triton_blockwise4.LOOKUPS``: from device memory per value, or ``tl.gather`` from the table
  held in the program; for one token on NVIDIA also ``prmt``, byte permutes of the table in
  registers, and the gathered one-token kernel at other step sizes and warps;
- ``triton_codebook``: the same two; for one to four rows a third, ``lut``, each input group's
  dot products with every codeword tabulated first, then one lookup per code
  (``triton_codebook_lut``: from device memory, from slices of the table held in each program, or
  from slices each program makes); and for the dequantize kernel each code decoding its whole
  codeword, ``words``, or each value looking up its own code.

For each Llama-7B layer shape this times every way on every path (one token, 16 and 128 rows
through the tiled kernel, standalone dequantize), with CUDA graphs and cold L2 as ``bench/kernels.py`` does,
next to fp16 ``F.linear`` and bitsandbytes' NF4 where it imports. Every variant is checked
against the reference on fresh random data before it is timed.

    python bench/lookup.py                          # prints a markdown table
    python bench/lookup.py --shapes 4096x4096 --json out.json
    python bench/lookup.py --shapes 8192x8192 --warm  # compile only, one process per shape at once
"""

from __future__ import annotations

import argparse

import torch

from kernels import bnb_row, fp16_row, random_codebook, random_nf4
from timing import copies_for, rel_err, start_gpu_bench, switching, time_graph, write_rows
from lowbit.kernels import reference

SHAPES = ["4096x4096", "4096x11008", "8192x8192"]  # K x N


def nf4_calls(m, k, n, sets, lookup, step_bytes=None, warps=None):
    """``m`` rows (0: dequantize) through lowbit's NF4 kernels with ``lookup`` (and for one token,
    ``step_bytes`` and ``warps`` for ``GEMV_STEP_BYTES`` and ``GEMV_WARPS``, None for their
    defaults); (calls, bytes, rel err)."""
    from lowbit.kernels import triton_blockwise4 as B

    call = switching(B, lambda *a, **kw: B.matmul_blockwise4(*a, **kw), GEMV_STEP_BYTES=step_bytes, GEMV_WARPS=warps)

    calls, err = [], 0.0
    for i in range(sets):
        a = random_nf4(n, k)
        if m == 0:
            if i == 0:
                err = rel_err(B.dequantize_blockwise4(*a, lookup=lookup), reference.dequantize_blockwise4(*a))
            calls.append(lambda a=a: B.dequantize_blockwise4(*a, lookup=lookup))
            continue
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        if i == 0:
            err = rel_err(call(x, *a, batch_path="tiled", lookup=lookup), reference.matmul_blockwise4(x.float(), *a))
        calls.append(lambda x=x, a=a: call(x, *a, batch_path="tiled", lookup=lookup))
    out = 2 * k * n if m == 0 else 2 * m * (k + n)
    return calls, k * n // 2 + k * n // 64 + out, err


def aqlm_calls(m, k, n, sets, gather, lut=False, words=False, slices=None, made=None):
    """As :func:`nf4_calls` for AQLM 2x8 (groups of 8), codebooks gathered from or loaded;
    ``lut``: through tabulated codeword products instead (one to four rows), with ``slices`` and
    ``made`` for ``LUT_SLICES`` and ``LUT_SLICE_PRODUCTS`` (None: their defaults); ``words``: the
    dequantize kernel decodes a whole codeword per code."""
    from lowbit.kernels import triton_codebook as A
    from lowbit.kernels import triton_codebook_lut as L

    matmul = switching(L, A.matmul_codebook, LUT_SLICES=slices, LUT_SLICE_PRODUCTS=made)

    calls, err = [], 0.0
    for i in range(sets):
        codes, books, scales = random_codebook(n, k, 2, 8, seed=i)
        if m == 0:
            if i == 0:
                err = rel_err(A.dequantize_codebook(codes, books, scales, gather=gather, whole_words=words),
                              reference.dequantize_codebook(codes, books, scales))
            calls.append(lambda c=codes, b=books, s=scales:
                         A.dequantize_codebook(c, b, s, gather=gather, whole_words=words))
            continue
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        if i == 0:
            err = rel_err(matmul(x, codes, books, scales, batch_path="tiled", gather=gather, lut=lut),
                          reference.matmul_codebook(x.float(), codes, books, scales))
        calls.append(lambda x=x, c=codes, b=books, s=scales:
                     matmul(x, c, b, s, batch_path="tiled", gather=gather, lut=lut))
    out = 2 * k * n if m == 0 else 2 * m * (k + n)
    # the products, written and read (not when each program makes its own)
    table = 2 * m * (k // 8) * books.shape[0] * books.shape[1] * 2 if lut and not made else 0
    return calls, n * (k // 8) * 2 + books.numel() * 2 + 2 * n + out + table, err


def bench_shape(k: int, n: int, ms: list[int], l2: int, warm: bool = False) -> list[dict]:
    """Rows of one shape; ``warm``: compile and run each variant once on one input set, time nothing."""
    from lowbit.kernels import triton_blockwise4 as B
    from lowbit.kernels import triton_codebook_lut as L

    rows = []

    def add(m, name, build):
        try:
            calls, nbytes, err = build()
            if warm:
                calls[0]()
                torch.cuda.synchronize()
                return
            us = time_graph(calls)
            rows.append({"K": k, "N": n, "M": m, "kernel": name, "us": us, "GBps": nbytes / us / 1e3, "rel_err": err})
        except Exception as e:  # a variant that fails to compile or run is reported, the rest go on
            rows.append({"K": k, "N": n, "M": m, "kernel": name, "error": f"{type(e).__name__}: {e}"[:300]})
        torch.cuda.empty_cache()

    sets4, sets2 = (1, 1) if warm else (copies_for(k * n // 2, l2), copies_for(k * n // 4, l2))
    for m in ms:
        if m:
            add(m, "fp16 F.linear", lambda: fp16_row(m, k, n, copies_for(2 * n * k, l2)))
            add(m, "bitsandbytes nf4", lambda: bnb_row(m, k, n, sets4))
        for lookup in B.LOOKUPS:
            add(m, f"nf4 {lookup}", lambda: nf4_calls(m, k, n, sets4, lookup))
        if m == 1 and torch.version.hip is None:  # byte permutes: the one-token kernel, NVIDIA only
            add(m, "nf4 prmt", lambda: nf4_calls(m, k, n, sets4, "prmt"))
        if m == 1:  # the one-token kernel's step and warps (the default: 128-byte steps, 4 warps)
            for step, warps in ((128, 8), (64, 4), (64, 8), (256, 8)):
                add(m, f"nf4 gather, {step}-byte steps, {warps} warps",
                    lambda step=step, warps=warps: nf4_calls(m, k, n, sets4, "gather", step, warps))
        for gather in (False, True):  # the dequantize kernel: a value at a time (below, whole codewords)
            add(m, f"aqlm 2x8 {'gather' if gather else 'global'}",
                lambda: aqlm_calls(m, k, n, sets2, gather, lut=False, words=False))
        if 0 < m <= L.LUT_MAX_ROWS:
            add(m, "aqlm 2x8 lut", lambda: aqlm_calls(m, k, n, sets2, False, lut=True))
            add(m, "aqlm 2x8 lut, slices held", lambda: aqlm_calls(m, k, n, sets2, False, lut=True, slices=True,
                                                                   made=False))
            add(m, "aqlm 2x8 lut, slices made", lambda: aqlm_calls(m, k, n, sets2, False, lut=True, slices=True,
                                                                   made=True))
        if m == 0:
            for gather in (False, True):
                add(m, f"aqlm 2x8 {'gather' if gather else 'global'} words",
                    lambda: aqlm_calls(m, k, n, sets2, gather, words=True))
    return rows


def print_table(rows: list[dict]) -> None:
    """One line per (shape, M, kernel): µs, GB/s, against the ``global`` lookup of its format and fp16."""
    print("| K x N | M (0: dequantize) | kernel | µs (graph) | GB/s | vs global | vs fp16 | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    at = {(r["K"], r["N"], r["M"], r["kernel"]): r.get("us") for r in rows}
    for r in rows:
        if "error" in r:
            print(f"| {r['K']}x{r['N']} | {r['M']} | {r['kernel']} | failed: {r['error']} |||||")
            continue
        key = (r["K"], r["N"], r["M"])
        fmt = next((f for f in ("nf4", "aqlm 2x8") if r["kernel"].startswith(f + " ")), None)
        base = at.get((*key, f"{fmt} global"))
        fp = at.get((*key, "fp16 F.linear"))
        vs_global = f"{base / r['us']:.2f}x" if base else ""
        vs_fp16 = f"{fp / r['us']:.2f}x" if fp else ""
        print(f"| {r['K']}x{r['N']} | {r['M']} | {r['kernel']} | {r['us']:.1f} | {r['GBps']:.0f} | {vs_global} | "
              f"{vs_fp16} | {r['rel_err']:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated KxN")
    p.add_argument("--m", default="1,16,128,0", help="comma-separated rows; 0 times the standalone dequantize")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--warm", action="store_true",
                   help="only compile every variant (fills Triton's cache; run one process per shape at once)")
    args = p.parse_args()
    l2 = start_gpu_bench("bench/lookup.py")
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        rows += bench_shape(k, n, [int(v) for v in args.m.split(",")], l2, args.warm)
        if args.json:  # after every shape, so a run cut short keeps what it measured
            write_rows(args.json, rows)
    if args.warm:
        for r in rows:
            if "error" in r:
                print(f"{r['K']}x{r['N']} M={r['M']} {r['kernel']}: {r['error']}")
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
