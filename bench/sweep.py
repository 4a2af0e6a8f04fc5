"""Launch-configuration sweep of the grouped-int matmul (w4 g128, fp16) on Llama-7B layer shapes.

Times every tile / split-K / warp / stage combination below for M = 1, 16, 128 with the same
protocol as ``bench/kernels.py`` (CUDA graphs over input sets that read 4x the L2), next to
fp16 ``F.linear``, and prints the best configuration per shape against the heuristic's
(:func:`lowbit.kernels.triton_common.matmul_config`). What it finds goes into the heuristic.

``--kernel int8`` sweeps LLM.int8's kernel instead (threshold 6, one outlier column) at M = 16,
128, 512, 2048; ``--kernel int8-prequantized`` its variant whose activations are quantized in a
launch of their own (``triton_int8_activations.quantize_activations``).

Compiling a few hundred variants is most of the cost, so ``--warm PART/PARTS`` only compiles
(and checks against the reference) every PARTS-th variant from PART into Triton's on-disk
cache; running several such processes at once, then one timing run, compiles in parallel::

    for i in $(seq 0 11); do python bench/sweep.py --warm $i/12 & done; wait
    python bench/sweep.py --json sweep.json

``--quick`` (on both) tries a few dozen configurations around the heuristic's instead. For w4g128
every ``tl.dot`` configuration (16 rows and up) is also tried with tiles of ``y.T``
(``swap=True``: ``DOT_SWAP``'s tiles, off by default and not yet timed).
``--act-order`` sweeps w4g128 with an act-order ``g_idx`` (one token gathers x through ``perm`` in
the kernel; more rows are permuted before it, so only one token differs from the plain sweep);
``--m`` and ``--shapes`` narrow the sweep, e.g. ``--m 1 --shapes 4096x4096,4096x11008``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import fp16_row, random_int8, random_w4  # noqa: E402
from timing import copies_for, l2_bytes, rel_err, time_graph  # noqa: E402

from lowbit.formats.group_order import to_group_ordered  # noqa: E402
from lowbit.kernels import reference  # noqa: E402
from lowbit.kernels import triton_int8 as I  # noqa: E402
from lowbit.kernels import triton_int_grouped as T  # noqa: E402
from lowbit.kernels.triton_common import MatmulConfig, launch_config  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # K x N
MS = {"w4g128": (1, 16, 128), "int8": (16, 128, 512, 2048), "int8-prequantized": (16, 128, 512, 2048)}


def configs(m: int, quick: bool = False, swap: bool = False) -> list[MatmulConfig]:
    """The launch configurations tried at ``m`` rows (``quick``: a few dozen around the heuristic's);
    ``swap``: each ``tl.dot`` configuration also with tiles of ``y.T`` (grouped int's ``DOT_SWAP``)."""
    out = []
    if m == 1:  # vector-unit products, one row
        if quick:
            grid = itertools.product((32, 64, 128), (128,), (8, 16, 32), (1, 2, 4))
        else:
            grid = itertools.product((32, 64, 128), (64, 128), (4, 8, 16, 32), (1, 2, 4))
        for bn, bk, split, warps in grid:
            out.append(MatmulConfig(1, bn, bk, split, warps, 3))
    elif m <= 16:
        stages = (3,) if quick else (2, 3, 4)
        bns = (64, 128) if quick else (32, 64, 128)
        for bn, bk, split, st in itertools.product(bns, (64, 128), (4, 8) if quick else (1, 2, 4, 8), stages):
            out.append(MatmulConfig(16, bn, bk, split, 4, st))
    elif quick:
        for bm, bn, bk, splits, warps in ((64, 64, 128, (1, 2, 4), 4), (128, 64, 64, (1, 2, 4), 4),
                                           (64, 128, 64, (1, 2), 8), (128, 128, 64, (1, 2), 8),
                                           (64, 64, 64, (1, 2), 4)):
            out += [MatmulConfig(bm, bn, bk, split, warps, 3) for split in splits]
    else:
        for bm, bn, bk, split, warps, stages in itertools.product((64, 128), (64, 128), (64, 128), (1, 2, 4),
                                                                   (4, 8), (3, 4)):
            if bm * bn >= 128 * 128 and warps == 4:
                continue
            out.append(MatmulConfig(bm, bn, bk, split, warps, stages))
    if swap:
        out += [dataclasses.replace(c, swap=True) for c in out if c.block_m >= 16]
    return out


def operands(kernel: str, k: int, n: int, m: int, sets: int, act_order: bool = False):
    """``sets`` weights and ``[m, k]`` inputs; ``want(m)``, the fp32 reference on the first set's
    first ``m`` rows; ``call(x, weight, cfg)``; the kernel's K tile."""
    weights, xs = [], []
    for i in range(sets):
        if kernel == "w4g128":
            qw, s, qz, g = random_w4(k, n, 128, act_order, seed=i)
            weights.append((to_group_ordered(qw, s, qz, g, 4), (qw, s, qz, g)))
            xs.append(torch.randn(m, k, device="cuda", dtype=torch.float16))
        else:  # one outlier input column at threshold 6
            cb, scb, x = random_int8(n, k, m)
            weights.append((cb, scb))
            xs.append(x)
    if kernel == "w4g128":
        return (weights, xs, lambda m: reference.matmul_int_grouped(xs[0][:m].float(), *weights[0][1], 4),
                lambda x, w, cfg: T.matmul_group_ordered(x, w[0], cfg=cfg), 128)
    pre = kernel == "int8-prequantized"
    return (weights, xs, lambda m: reference.matmul_int8_outlier(xs[0][:m].float(), *weights[0], 6.0),
            lambda x, w, cfg: I.matmul_int8_outlier(x, *w, 6.0, cfg=cfg, prequantize=pre), I.block_k_for(k))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warm", default=None, help="PART/PARTS: only compile and check that share of the variants")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="a few dozen configurations per M instead of hundreds")
    p.add_argument("--kernel", choices=list(MS), default="w4g128")
    p.add_argument("--act-order", action="store_true", help="w4g128 with an act-order g_idx")
    p.add_argument("--m", default=None, help="comma-separated rows (default: the kernel's)")
    p.add_argument("--shapes", default=None, help="comma-separated KxN (default: three Llama-7B shapes)")
    args = p.parse_args()
    if args.act_order and args.kernel != "w4g128":
        p.error("--act-order applies to --kernel w4g128")
    ms = tuple(int(v) for v in args.m.split(",")) if args.m else MS[args.kernel]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    part, parts = (int(v) for v in args.warm.split("/")) if args.warm else (0, 1)
    l2 = l2_bytes()
    rows, index = [], 0
    for k, n in shapes:
        weight_bytes = k * n if args.kernel != "w4g128" else k * n // 2
        sets = 1 if args.warm else copies_for(weight_bytes, l2)
        weights, xs, reference_of, call, block_k = operands(args.kernel, k, n, max(ms), sets, args.act_order)
        want = {m: reference_of(m) for m in ms}
        for m in ms:
            heuristic = launch_config(m, n, k, block_k, torch.device("cuda"),
                                      T.ACT_ORDER_GEMV_TILE if args.act_order else None)
            cands = [heuristic] + [c for c in configs(m, args.quick, args.kernel == "w4g128") if c != heuristic]
            if not args.warm:
                calls, nbytes, _ = fp16_row(m, k, n, copies_for(2 * n * k, l2))
                rows.append({"K": k, "N": n, "M": m, "config": "fp16 F.linear", "us": time_graph(calls, 10, 5)})
            for cfg in cands:
                index += 1
                if index % parts != part:
                    continue
                label = repr(cfg)
                try:
                    err = rel_err(call(xs[0][:m], weights[0], cfg), want[m])
                    if args.warm:
                        continue
                    calls = [lambda x=x[:m], w=w, c=cfg: call(x, w, c) for x, w in zip(xs, weights)]
                    us = time_graph(calls, 10, 5)
                except Exception as e:  # a configuration that does not compile (registers, shared memory)
                    rows.append({"K": k, "N": n, "M": m, "config": label, "error": f"{type(e).__name__}: {e}"[:160]})
                    continue
                rows.append({"K": k, "N": n, "M": m, "config": label, "us": us, "rel_err": err,
                             "heuristic": cfg == heuristic})
        del weights, xs
        torch.cuda.empty_cache()
    if args.warm:
        return
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    bad = [r for r in rows if "rel_err" in r and not r["rel_err"] < 1e-3]
    for r in bad:
        print(f"WRONG {r}")
    print("| K x N | M | fp16 µs | heuristic µs | best µs | best config | best vs fp16 |")
    print("|---|---|---|---|---|---|---|")
    for k, n in shapes:
        for m in ms:
            here = [r for r in rows if (r["K"], r["N"], r["M"]) == (k, n, m) and "us" in r]
            fp = next(r["us"] for r in here if r["config"].startswith("fp16"))
            ours = [r for r in here if not r["config"].startswith("fp16") and r not in bad]
            heur = next((r["us"] for r in ours if r["heuristic"]), float("nan"))
            best = min(ours, key=lambda r: r["us"])
            print(f"| {k}x{n} | {m} | {fp:.1f} | {heur:.1f} | {best['us']:.1f} | {best['config']} | "
                  f"{fp / best['us']:.2f}x |")
    errors = [r for r in rows if "error" in r]
    print(f"{len(rows)} rows, {len(errors)} configurations failed, {len(bad)} wrong")


if __name__ == "__main__":
    main()
