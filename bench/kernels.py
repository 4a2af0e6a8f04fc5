"""Grouped-int kernels against fp16 cuBLAS, peer 4-bit kernels and a read-stream probe, in one run.

For each Llama-7B layer shape (K x N) and M = 1, 16, 128 it times, with CUDA graphs and cold L2:

* ``fp16``: ``F.linear`` with an fp16 weight (cuBLAS);
* ``lowbit w4g128`` and ``lowbit w4g128 act`` (act-order, rows reordered at load), from 16 rows
  also each batch path forced (the fused kernel; dequantize + ``F.linear``) and the fused kernel
  with its ``tl.dot`` tiles computing ``y.T``, the weight first (``DOT_SWAP``, off by default), and lowbit's
  NF4 kernel (blocks of 64, double quant) on the bitsandbytes layout (from 16 rows also its tiled
  path forced, with and without tiles of ``y.T``, ``DOT_SWAP``), its AQLM kernel
  (2x8 and 1x16, groups of 8 inputs, about 2 bits per weight; from 16 rows its tiled kernel also
  with tiles of ``y.T``, ``DOT_SWAP``; for one to four rows also with
  each program's slices of the product table held in it, ``LUT_SLICES``, and made there,
  ``LUT_SLICE_PRODUCTS``, both off by default), and its LLM.int8 kernel
  (threshold 6, one outlier input column, at its defaults; above 16 rows also with the
  activations quantized in every program, and quantized in a launch of their own with the shared
  tile heuristic and with 128x128 tiles), and the same int8 weights with the activations left in
  fp16 (``int8_activations=False``, weight-only);
* ``int_mm``: LLM.int8 through the reference's decomposition with ``torch._int_mm`` (what lowbit
  runs above 2,048 rows): it synchronizes with the host on the outlier columns, as bitsandbytes'
  ``Linear8bitLt`` does, so these two are timed eagerly only (a failed capture would leave the
  CUDA generator unusable for every later row);
* peers importable here: PyTorch's tinygemm int4 (``aten._weight_int4pack_mm``, what torchao's
  int4 weight-only uses), bitsandbytes NF4 (``matmul_4bit``) and LLM.int8 (``Linear8bitLt``);
* ``probe``: ``torch.sum`` over a buffer of the same byte count as the 4-bit kernel must read
  (packed weight, scales, zeros, x) — the bandwidth a plain read stream reaches at that size;
* standalone dequantize against a device-to-device copy of the same bytes (read + write).

Cold L2: each timed graph runs the op over several independent input sets whose total size is
at least four times the L2, so every call reads its weights from HBM. Times are medians over
trials, in microseconds per call; ``eager`` is the same op launched from Python without a graph
(launch overhead included). Every kernel is checked against the reference on fresh random data
before it is timed.

    python bench/kernels.py                       # all shapes, prints a markdown table
    python bench/kernels.py --shapes 4096x4096 --m 1 --json out.json
"""

from __future__ import annotations

import argparse
import traceback

import torch
import torch.nn.functional as F

from lowbit.formats.group_order import to_group_ordered
from lowbit.formats.packing import pack_int
from lowbit.kernels import reference
from lowbit.kernels.held import HeldCalls
from timing import copies_for, rel_err, start_gpu_bench, switching, time_eager, time_graph, write_rows

SHAPES = ["4096x4096", "4096x11008", "11008x4096", "8192x8192"]  # K x N


# --- operands ----------------------------------------------------------------------------

def random_w4(k: int, n: int, group: int, act_order: bool, seed: int):
    """Canonical 4-bit grouped tensors on the GPU: (qweight, scales, qzeros, g_idx)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    groups = k // group
    q = torch.randint(0, 16, (k, n), device="cuda", generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (groups, n), device="cuda", generator=gen, dtype=torch.int32)
    s = torch.rand(groups, n, device="cuda", generator=gen).mul_(0.02).add_(1e-3).half()
    g_idx = (torch.arange(k, device="cuda") // group).int()
    if act_order:
        perm = torch.randperm(k, device="cuda", generator=gen)
        g_idx = g_idx[torch.argsort(perm)]
    return pack_int(q, 4, dim=0), s, pack_int(z, 4, dim=1), g_idx


# --- rows --------------------------------------------------------------------------------

def fp16_row(m, k, n, sets):
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(sets)]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(sets)]
    return [lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, ws)], 2 * n * k + 2 * m * (k + n), 0.0


def lowbit_row(m, k, n, sets, act_order, group=128, perm_dtype=None, swap=None, batch_path=None,
               gather_rows=None):
    """lowbit's grouped-int matmul, w4 (``perm_dtype``: the act-order indices cast to it, e.g.
    int16, a variant the kernel reads as given; None keeps the layout's int32; ``swap``: the
    ``tl.dot`` tiles computing ``y.T`` or not, None for ``DOT_SWAP``'s default;
    ``batch_path``: forced for 16 rows or more, None for the default; ``gather_rows``: up to how many
    rows act-order activations are gathered in the kernel, not permuted before it, None for
    ``GATHER_MAX_ROWS``' default)."""
    import dataclasses

    from lowbit.kernels import triton_int_grouped as T

    call = switching(T, lambda x, layout: T.matmul_group_ordered(x, layout, batch_path=batch_path),
                     DOT_SWAP=swap, GATHER_MAX_ROWS=gather_rows)

    calls, err = [], 0.0
    for i in range(sets):
        qw, s, qz, g = random_w4(k, n, group, act_order, seed=i)
        layout = to_group_ordered(qw, s, qz, g, 4)
        if perm_dtype is not None:
            layout = dataclasses.replace(layout, perm=layout.perm.to(perm_dtype))
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        if i == 0:
            err = rel_err(call(x, layout), reference.matmul_int_grouped(x.float(), qw, s, qz, g, 4))
        calls.append(lambda x=x, layout=layout: call(x, layout))
    nbytes = k * n // 2 + (k // group) * n * (2 + 0.5) + 2 * m * (k + n)
    return calls, nbytes, err


def random_nf4(n: int, k: int) -> tuple:
    """The NF4 kernels' arguments for a random ``[n, k]`` weight (blocks of 64, double quant)."""
    from lowbit.formats.blockwise4 import Blockwise4Linear

    w = torch.randn(n, k, device="cuda", dtype=torch.float16)
    mod = Blockwise4Linear.from_linear(w, None, quant_type="nf4", blocksize=64, double_quant=True)
    return (mod.weight, mod.absmax, mod.quant_map, 64, (n, k), mod.nested_absmax, mod.nested_quant_map,
            mod.nested_offset)


def random_codebook(n: int, k: int, n_codebooks: int, nbits: int, seed: int) -> tuple:
    """AQLM (codes, codebooks, scales) over the whole index range, groups of 8 inputs."""
    from lowbit.formats.codebook import pack_codes

    gen = torch.Generator(device="cuda").manual_seed(seed)
    codes = pack_codes(torch.randint(0, 1 << nbits, (n, k // 8, n_codebooks), device="cuda", generator=gen), nbits)
    books = torch.randn(n_codebooks, 1 << nbits, 1, 8, device="cuda", dtype=torch.float16, generator=gen)
    scales = torch.rand(n, 1, 1, 1, device="cuda", dtype=torch.float16, generator=gen)
    return codes, books, scales


def lowbit_nf4_row(m, k, n, sets, batch_path=None, swap=None):
    """lowbit's NF4 kernel on the bitsandbytes layout (blocks of 64, double quant); ``swap``: its
    ``tl.dot`` tiles computing ``y.T`` or not, None for ``DOT_SWAP``'s default."""
    from lowbit.kernels import triton_blockwise4 as B

    call = switching(B, B.matmul_blockwise4, DOT_SWAP=swap)
    calls, err = [], 0.0
    for i in range(sets):
        a = random_nf4(n, k)
        held = HeldCalls()  # as an NF4 module holds its eager launches
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        if i == 0:
            err = rel_err(call(x, *a, batch_path=batch_path, held=held), reference.matmul_blockwise4(x.float(), *a))
        calls.append(lambda x=x, a=a, h=held: call(x, *a, batch_path=batch_path, held=h))
    return calls, k * n // 2 + k * n // 64 + 2 * m * (k + n), err


def lowbit_aqlm_row(m, k, n, sets, n_codebooks, nbits, batch_path=None, lut_step=None, slices=None, made=None,
                    swap=None):
    """lowbit's AQLM kernel (groups of 8 inputs) on random codes over the whole index range
    (``lut_step``: the tabulated GEMV's (codes a step, prefetch), None for its defaults; ``slices``:
    its table's slices held in each program or not, None for ``LUT_SLICES``' default; ``made``: those
    slices made in the program, None for ``LUT_SLICE_PRODUCTS``' default; ``swap``: the tiled
    kernel's ``tl.dot`` tiles computing ``y.T`` or not, None for ``DOT_SWAP``'s default)."""
    from lowbit.kernels import triton_codebook as A
    from lowbit.kernels import triton_codebook_lut as L

    block_j, prefetch = lut_step or (None, None)

    matmul = switching(A, A.matmul_codebook, DOT_SWAP=swap)
    call = switching(L, lambda x, c, b, s, held: matmul(x, c, b, s, batch_path=batch_path, held=held),
                     LUT_BLOCK_J=block_j, LUT_PREFETCH=prefetch, LUT_SLICES=slices, LUT_SLICE_PRODUCTS=made)
    calls, err = [], 0.0
    for i in range(sets):
        codes, books, scales = random_codebook(n, k, n_codebooks, nbits, seed=i)
        held = HeldCalls()  # as an AQLM module holds its eager launches
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        if i == 0:
            err = rel_err(call(x, codes, books, scales, held),
                          reference.matmul_codebook(x.float(), codes, books, scales))
        calls.append(lambda x=x, c=codes, b=books, s=scales, h=held: call(x, c, b, s, h))
    code_bytes = n * (k // 8) * n_codebooks * (1 if nbits <= 8 else 2)
    return calls, code_bytes + books.numel() * 2 + 2 * n + 2 * m * (k + n), err


def int8_input(m: int, k: int) -> torch.Tensor:
    """``x [m, k]`` fp16 with one outlier column for threshold 6 (LLM activations hold a few)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    x[:, 7] = 8.0
    return x


def random_int8(n: int, k: int, m: int) -> tuple:
    """LLM.int8 codes and scales of a random ``[n, k]`` weight, and :func:`int8_input` ``[m, k]``."""
    from lowbit.formats.int8_outlier import quantize_rows

    cb, scb = quantize_rows(torch.randn(n, k, device="cuda", dtype=torch.float16))
    return cb, scb, int8_input(m, k)


def lowbit_int8_row(m, k, n, sets, int_mm=False, prequantize=None, tiles=None, weight_only=False, batch_path=None,
                    fused_stats=None):
    """lowbit's LLM.int8: the Triton kernel (``prequantize``, ``tiles``: its variant and launch
    configuration, ``"heuristic"`` for the shared heuristic's, ``"wide"`` for the kernel's
    :data:`~lowbit.kernels.triton_int8.WIDE_TILES`, None the defaults, a given tile always the fused
    kernel; ``batch_path``: forced, None the default's; ``weight_only``: activations left in fp16;
    ``fused_stats``: the activation statistics found in the matmul or not, None for
    ``FUSED_ROW_STATS``'s default), or
    (``int_mm``) the reference's decomposition with ``torch._int_mm``."""
    from lowbit.formats.int8_outlier import int_mm as int_mm_fn
    from lowbit.kernels import triton_int8 as I
    from lowbit.kernels.triton_common import launch_config

    if tiles == "heuristic":
        cfg = launch_config(m, n, k, I.block_k_for(k), torch.device("cuda"))
    else:
        cfg = I.WIDE_TILES if tiles == "wide" else None

    calls, err = [], 0.0
    for i in range(sets):
        cb, scb, x = random_int8(n, k, m)
        if int_mm:
            fn = lambda x=x, cb=cb, scb=scb: reference.matmul_int8_outlier(x, cb, scb, 6.0, int_matmul=int_mm_fn)
        else:  # held as an LLM.int8 module holds its eager launches
            fn = switching(I, lambda x=x, cb=cb, scb=scb, held=HeldCalls(): I.matmul_int8_outlier(
                x, cb, scb, 6.0, prequantize=prequantize, cfg=cfg, weight_only=weight_only, batch_path=batch_path,
                held=held), FUSED_ROW_STATS=fused_stats)
        if i == 0:
            want = (reference.matmul_int8_weight_only(x.float(), cb, scb) if weight_only
                    else reference.matmul_int8_outlier(x.float(), cb, scb, 6.0))
            err = rel_err(fn(), want)
        calls.append(fn)
    return calls, n * k + 4 * n + 2 * m * (k + n), err


def bnb_int8_row(m, k, n, sets):
    """bitsandbytes' ``Linear8bitLt`` (threshold 6) on the same kind of input."""
    import bitsandbytes as bnb

    calls, err = [], 0.0
    for i in range(sets):
        w = torch.randn(n, k, dtype=torch.float16)
        lin = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
        lin.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        lin = lin.cuda()
        x = int8_input(m, k)
        if i == 0:
            want = reference.matmul_int8_outlier(x.float(), lin.weight.CB, lin.weight.SCB, 6.0)
            err = rel_err(lin(x), want)
        calls.append(lambda x=x, lin=lin: lin(x))
    return calls, n * k + 4 * n + 2 * m * (k + n), err


def tinygemm_row(m, k, n, sets, group=128):
    """PyTorch's int4 tinygemm (bf16 activations), as torchao's int4 weight-only uses it (the layer
    :mod:`e2e`'s ``--peer`` model is made of)."""
    from e2e import Int4Tinygemm, tinygemm_codes

    calls, err = [], 0.0
    for i in range(sets):
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight)
        peer = Int4Tinygemm(lin, group)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        if i == 0:
            q, scale, zero = tinygemm_codes(lin.weight.detach(), group)
            deq = ((q.float().reshape(n, k // group, group) - 8) * scale + zero).reshape(n, k)
            err = rel_err(peer(x), x.float() @ deq.t())
        calls.append(lambda x=x, p=peer: p.mm(x, p.packed, group, p.scales_and_zeros))  # the op, as lowbit's rows
    return calls, k * n // 2 + (k // group) * n * 4 + 2 * m * (k + n), err


def bnb_row(m, k, n, sets):
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    calls, err = [], 0.0
    for i in range(sets):
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        qw, qs = BF.quantize_4bit(w, quant_type="nf4", blocksize=64)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        if i == 0:
            err = rel_err(bnb.matmul_4bit(x, qw.t(), quant_state=qs), x.float() @ BF.dequantize_4bit(qw, qs).float().t())
        calls.append(lambda x=x, qw=qw, qs=qs: bnb.matmul_4bit(x, qw.t(), quant_state=qs))
    return calls, k * n // 2 + (k * n // 64) * 4 + 2 * m * (k + n), err


def gemlite_row(m, k, n, sets, group=128):
    """gemlite's 4-bit Triton kernels (HQQ layout: ``(W_q - zeros) * scales``, asymmetric, fp16)."""
    import importlib.resources

    import gemlite
    from gemlite import DType, GemLiteLinear

    if "h200" in torch.cuda.get_device_name().lower():
        # the same chip as an H100 with faster memory: take gemlite's H100 tuning instead of autotuning
        GemLiteLinear.load_config(str(importlib.resources.files(gemlite) / "configs" / "h100.json"))
    calls, err = [], 0.0
    for i in range(sets):
        gen = torch.Generator(device="cuda").manual_seed(i)
        q = torch.randint(0, 16, (n, k), device="cuda", generator=gen, dtype=torch.uint8)
        scales = torch.rand(n, k // group, device="cuda", generator=gen).mul_(0.02).add_(1e-3).half()
        zeros = torch.randint(0, 16, (n, k // group), device="cuda", generator=gen).half()
        lin = GemLiteLinear(4, group_size=group, in_features=k, out_features=n, input_dtype=DType.FP16,
                            output_dtype=DType.FP16)
        lin.pack(q, scales, zeros, None)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        if i == 0:
            deq = ((q.float().view(n, -1, group) - zeros.float()[..., None]) * scales.float()[..., None]).view(n, k)
            err = rel_err(lin(x), x.float() @ deq.t())
        calls.append(lambda x=x, lin=lin: lin(x))
    return calls, k * n // 2 + (k // group) * n * 4 + 2 * m * (k + n), err


def probe_row(nbytes, sets):
    bufs = [torch.randn(int(nbytes) // 2, device="cuda", dtype=torch.float16) for _ in range(sets)]
    return [lambda b=b: b.sum() for b in bufs], nbytes, 0.0


# rows that synchronize with the host, so cannot be recorded in a CUDA graph: timed eagerly only
EAGER_ONLY = {"int_mm int8 (LLM.int8, lowbit's decomposition)", "bitsandbytes int8 (LLM.int8)"}

PEERS = {"tinygemm int4 (bf16)": tinygemm_row, "gemlite w4g128": gemlite_row, "bitsandbytes nf4": bnb_row,
         "bitsandbytes int8 (LLM.int8)": bnb_int8_row}


ROWS = ["fp16", "lowbit", "int_mm", "tinygemm", "gemlite", "bitsandbytes", "probe"]


def bench_shape(k: int, n: int, m: int, l2: int, eager: bool, only: list[str], names: list[str] | None = None) -> list[dict]:
    """Every row of one shape whose first word is in ``only`` (and, given ``names``, whose name holds
    one of them); a peer that fails is reported, not fatal."""
    rows = []
    w4_bytes = k * n // 2
    sets4 = copies_for(w4_bytes, l2)
    sets2 = copies_for(k * n // 4, l2)  # ~2 bits per weight
    sets8 = copies_for(k * n, l2)
    builders = {
        "fp16 F.linear": lambda: fp16_row(m, k, n, copies_for(2 * n * k, l2)),
        "lowbit w4g128": lambda: lowbit_row(m, k, n, sets4, act_order=False),
        "lowbit w4g128 act-order": lambda: lowbit_row(m, k, n, sets4, act_order=True),
        # from 16 rows: the tl.dot tiles computing y.T (DOT_SWAP, off by default); and each batch
        # path (the default fuses up to TILED_MAX_ROWS rows and dequantizes above)
        **({"lowbit w4g128, swapped dot tiles": lambda: lowbit_row(m, k, n, sets4, act_order=False,
                                                                    swap=True, batch_path="tiled"),
            "lowbit w4g128 (tiled)": lambda: lowbit_row(m, k, n, sets4, act_order=False, batch_path="tiled"),
            "lowbit w4g128 (dequantize)": lambda: lowbit_row(m, k, n, sets4, act_order=False,
                                                             batch_path="dequantize")}
           if m >= 16 else {}),
        # one token gathers x through perm in every program: the same with 2-byte indices
        **({"lowbit w4g128 act-order, int16 perm": lambda: lowbit_row(m, k, n, sets4, act_order=True,
                                                                       perm_dtype=torch.int16)}
           if m == 1 and k < 2**15 else {}),
        # or x permuted by an index_select launch before the plain kernel (GATHER_MAX_ROWS 0); and
        # at 16 rows, where that is the default, gathered in the kernel instead
        **({"lowbit w4g128 act-order, x permuted first": lambda: lowbit_row(m, k, n, sets4, act_order=True,
                                                                           gather_rows=0)}
           if m == 1 else {}),
        **({"lowbit w4g128 act-order, x gathered in the kernel": lambda: lowbit_row(m, k, n, sets4, act_order=True,
                                                                                   gather_rows=m, batch_path="tiled")}
           if 1 < m <= 16 else {}),
        "lowbit nf4 double-quant": lambda: lowbit_nf4_row(m, k, n, sets4),
        "lowbit aqlm 2x8": lambda: lowbit_aqlm_row(m, k, n, sets2, 2, 8),
        # the tabulated GEMV (up to 4 rows) with other steps than its default (64 codes, prefetch)
        **({f"lowbit aqlm 2x8, lut {j}-code steps{', prefetch' if ahead else ''}":
            (lambda j=j, ahead=ahead: lowbit_aqlm_row(m, k, n, sets2, 2, 8, lut_step=(j, ahead)))
            for j, ahead in ((32, False), (64, False), (128, False), (128, True), (256, True))}
           if m <= 4 else {}),
        # or with slices of the table held in each program (LUT_SLICES), and made there (LUT_SLICE_PRODUCTS:
        # one launch); both off by default
        **({"lowbit aqlm 2x8, lut slices held": lambda: lowbit_aqlm_row(m, k, n, sets2, 2, 8, slices=True),
            "lowbit aqlm 2x8, lut slices made in the program": lambda: lowbit_aqlm_row(m, k, n, sets2, 2, 8,
                                                                                        slices=True, made=True)}
           if m <= 4 else {}),
        "lowbit aqlm 1x16": lambda: lowbit_aqlm_row(m, k, n, sets2, 1, 16),
        "lowbit int8 (LLM.int8)": lambda: lowbit_int8_row(m, k, n, sets8),
        "lowbit int8 weight-only": lambda: lowbit_int8_row(m, k, n, sets8, weight_only=True),
        # up to 16 rows the matmul can find the activation statistics itself (not the default)
        **({"lowbit int8, statistics in the matmul": lambda: lowbit_int8_row(m, k, n, sets8, fused_stats=True)}
           if m <= 16 else {}),
        # above 16 rows: the kernel's variants for batches (x quantized in every program; x
        # quantized once in a launch of its own, with the shared heuristic's tiles and with 128x128
        # tiles and 8 warps), and the torch._int_mm path (it needs more than 16 rows)
        **({"lowbit int8 codes in every program": lambda: lowbit_int8_row(m, k, n, sets8, prequantize=False,
                                                                           batch_path="tiled"),
            "lowbit int8 prequantized, heuristic tiles": lambda: lowbit_int8_row(
                m, k, n, sets8, prequantize=True, tiles="heuristic"),
            "lowbit int8 prequantized 128x128": lambda: lowbit_int8_row(
                m, k, n, sets8, prequantize=True, tiles="wide"),
            "lowbit int8 (LLM.int8, tiled)": lambda: lowbit_int8_row(m, k, n, sets8, batch_path="tiled"),
            "lowbit int8 (LLM.int8, dequantize)": lambda: lowbit_int8_row(m, k, n, sets8, batch_path="dequantize"),
            "lowbit int8 weight-only (tiled)": lambda: lowbit_int8_row(m, k, n, sets8, weight_only=True,
                                                                       batch_path="tiled"),
            "lowbit int8 weight-only (dequantize)": lambda: lowbit_int8_row(m, k, n, sets8, weight_only=True,
                                                                            batch_path="dequantize"),
            "int_mm int8 (LLM.int8, lowbit's decomposition)": lambda: lowbit_int8_row(m, k, n, sets8, int_mm=True)}
           if m > 16 else {}),
        # both paths for batches (16 rows or more); the rows above take the default's
        **({"lowbit nf4 double-quant (tiled)": lambda: lowbit_nf4_row(m, k, n, sets4, "tiled"),
            "lowbit nf4 double-quant, swapped dot tiles": lambda: lowbit_nf4_row(m, k, n, sets4, "tiled", swap=True),
            "lowbit nf4 double-quant (dequantize)": lambda: lowbit_nf4_row(m, k, n, sets4, "dequantize"),
            "lowbit aqlm 2x8 (tiled)": lambda: lowbit_aqlm_row(m, k, n, sets2, 2, 8, "tiled"),
            "lowbit aqlm 2x8 (dequantize)": lambda: lowbit_aqlm_row(m, k, n, sets2, 2, 8, "dequantize"),
            "lowbit aqlm 1x16 (tiled)": lambda: lowbit_aqlm_row(m, k, n, sets2, 1, 16, "tiled"),
            "lowbit aqlm 1x16, swapped dot tiles": lambda: lowbit_aqlm_row(m, k, n, sets2, 1, 16, "tiled", swap=True),
            "lowbit aqlm 2x8, swapped dot tiles": lambda: lowbit_aqlm_row(m, k, n, sets2, 2, 8, "tiled", swap=True),
            "lowbit aqlm 1x16 (dequantize)": lambda: lowbit_aqlm_row(m, k, n, sets2, 1, 16, "dequantize")}
           if m >= 16 else {}),
        **{name: (lambda fn=fn: fn(m, k, n, sets8 if "int8" in name else sets4)) for name, fn in PEERS.items()},
        # the bytes the w4 g128 kernel must read: packed weight, fp16 scales, packed zeros, x and y
        "probe torch.sum (same bytes)": lambda: probe_row(w4_bytes + (k // 128) * n * 2.5 + 2 * m * (k + n), sets4),
    }
    for name, build in builders.items():
        if name.split()[0] not in only or (names and not any(part in name for part in names)):
            continue
        try:
            calls, nbytes, err = build()
            row = {"K": k, "N": n, "M": m, "kernel": name, "bytes": nbytes, "rel_err": err}
            if name in EAGER_ONLY:
                row.update(us=None, eager_us=time_eager(calls))
            else:
                row.update(us=time_graph(calls))
                if eager:
                    row["eager_us"] = time_eager(calls)
            row["GBps"] = nbytes / (row["us"] or row["eager_us"]) / 1e3
        except Exception as e:  # a lowbit row's failure also fails the run, after the table (main)
            if name.startswith("lowbit"):
                traceback.print_exc()
            row = {"K": k, "N": n, "M": m, "kernel": name, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)
        del build
        torch.cuda.empty_cache()
    return rows


def bench_dequantize(k: int, n: int, l2: int) -> list[dict]:
    """Standalone dequantize kernels (w4 g128, NF4 double quant, AQLM 2x8) against a copy of the same bytes."""
    from lowbit.kernels import triton_blockwise4 as B
    from lowbit.kernels import triton_codebook as A
    from lowbit.kernels import triton_int_grouped as T

    sets = copies_for(k * n * 2, l2)
    rows = []

    def add(name, calls, nbytes, err):
        us = time_graph(calls)
        rows.append({"K": k, "N": n, "M": 0, "kernel": name, "us": us, "bytes": nbytes, "GBps": nbytes / us / 1e3,
                     "rel_err": err})

    calls, err = [], 0.0
    for i in range(sets):
        qw, s, qz, g = random_w4(k, n, 128, False, seed=i)
        layout = to_group_ordered(qw, s, qz, g, 4)
        if i == 0:
            err = rel_err(T.dequantize_group_ordered(layout, k), reference.dequantize_int_grouped(qw, s, qz, g, 4))
        calls.append(lambda layout=layout: T.dequantize_group_ordered(layout, k))
    w4_bytes = k * n // 2 + (k // 128) * n * 2.5 + 2 * k * n
    add("lowbit dequantize w4g128", calls, w4_bytes, err)

    calls, err = [], 0.0
    for i in range(sets):
        a = random_nf4(n, k)
        if i == 0:
            err = rel_err(B.dequantize_blockwise4(*a), reference.dequantize_blockwise4(*a))
        calls.append(lambda a=a: B.dequantize_blockwise4(*a))
    add("lowbit dequantize nf4 double-quant", calls, k * n // 2 + k * n // 64 + 2 * k * n, err)

    calls, err = [], 0.0
    for i in range(sets):
        codes, books, scales = random_codebook(n, k, 2, 8, seed=i)
        if i == 0:
            err = rel_err(A.dequantize_codebook(codes, books, scales), reference.dequantize_codebook(codes, books, scales))
        calls.append(lambda c=codes, b=books, s=scales: A.dequantize_codebook(c, b, s))
    add("lowbit dequantize aqlm 2x8", calls, n * (k // 8) * 2 + 2 * k * n, err)

    srcs = [torch.randn(int(w4_bytes) // 4, device="cuda", dtype=torch.float16) for _ in range(sets)]
    dsts = [torch.empty_like(b) for b in srcs]
    add("probe copy (same bytes as w4g128)", [lambda a=a, b=b: b.copy_(a) for a, b in zip(srcs, dsts)], w4_bytes, 0.0)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| K x N | M | kernel | µs (graph) | µs (eager) | GB/s | % of probe | vs fp16 | rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    fp16 = {(r["K"], r["N"], r["M"]): r for r in rows if r["kernel"].startswith("fp16") and "error" not in r}
    probe = {(r["K"], r["N"], r["M"]): r["GBps"] for r in rows if r["kernel"].startswith("probe") and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"| {r['K']}x{r['N']} | {r['M']} | {r['kernel']} | failed: {r['error']} ||||||")
            continue
        fp = fp16.get((r["K"], r["N"], r["M"]), {})
        if r["us"] is None:  # eager only: against fp16's eager time
            ratio = f"{fp['eager_us'] / r['eager_us']:.2f}x (eager)" if fp.get("eager_us") else ""
        else:
            ratio = f"{fp['us'] / r['us']:.2f}x" if fp else ""
        graph = f"{r['us']:.1f}" if r["us"] is not None else "(syncs)"
        eager = f"{r['eager_us']:.1f}" if "eager_us" in r else ""
        pb = probe.get((r["K"], r["N"], r["M"]))
        of_probe = f"{100 * r['GBps'] / pb:.0f}%" if pb else ""
        print(f"| {r['K']}x{r['N']} | {r['M']} | {r['kernel']} | {graph} | {eager} | {r['GBps']:.0f} | "
              f"{of_probe} | {ratio} | {r['rel_err']:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated KxN")
    p.add_argument("--m", default="1,16,128", help="comma-separated batch rows")
    p.add_argument("--no-eager", action="store_true", help="skip the eager (launch overhead) timing")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows to time, of {','.join(ROWS)}")
    p.add_argument("--names", default=None,
                   help="comma-separated parts of row names: only rows whose name holds one (e.g. int8,fp16)")
    p.add_argument("--no-dequantize", action="store_true", help="skip the standalone dequantize rows")
    args = p.parse_args()
    names = args.names.split(",") if args.names else None
    l2 = start_gpu_bench("bench/kernels.py")
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.m.split(",")):
            rows += bench_shape(k, n, m, l2, not args.no_eager, args.rows.split(","), names)
        if "lowbit" in args.rows.split(",") and not args.no_dequantize:
            rows += bench_dequantize(k, n, l2)
        if args.json:  # after every shape, so a run cut short keeps what it measured
            write_rows(args.json, rows)
    print_table(rows)
    failed = [r["kernel"] for r in rows if "error" in r and r["kernel"].startswith("lowbit")]
    if failed:
        raise SystemExit(f"{len(failed)} lowbit rows failed: {', '.join(sorted(set(failed)))}")


if __name__ == "__main__":
    main()
