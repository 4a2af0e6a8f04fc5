"""Static instruction counts of the kernels' inner loops in sm_90 PTX, on a machine without a GPU.

A one-token GEMV of 4-bit weights on an H100 is bound by instructions as much as by bytes: the
grouped-int GEMV reaches 74-90 % of the read probe while NF4's and AQLM's reach far less. This
compiles each kernel variant for sm_90 with the argument divisibility a real launch on
Llama-7B shapes sees (pointers and sizes multiples of 16), takes the body of its longest loop
(for loopless kernels, the whole kernel), and prints per variant:

- instructions a thread executes per loop step, and the weights one step of the program covers;
- warp instructions per 1,000 weights (instructions x warps / weights x 1,000): the issue work a
  variant asks of the GPU for the same weights, comparable across variants;
- the memory and synchronisation instructions in the step;
- for ``tl.dot`` tiles, the ``wgmma`` instructions and how many dot groups each wait in the step
  leaves pending: 0 makes every product finish before the next tile's work goes on, more lets
  the dots run beside it;
- what Triton's own ``ptxas`` makes of the kernel (``ptxas -v`` for sm_90a): registers a thread,
  bytes spilled, and whether it serialized the ``wgmma`` (its warning C7515, which undoes the
  pending waits above).

These are counts, not times: PTX before ``ptxas``, no latency, no occupancy. They rank variants
to time first; ``bench/lookup.py`` times them on a GPU.

    python bench/ptx.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces kernels with Python functions")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowbit.kernels import triton_blockwise4 as B  # noqa: E402
from lowbit.kernels import triton_codebook as A  # noqa: E402
from lowbit.kernels import triton_codebook_lut as L  # noqa: E402
from lowbit.kernels import triton_int8 as I  # noqa: E402
from lowbit.kernels import triton_int_grouped as G  # noqa: E402
from lowbit.kernels.aot_check import _with_split_outputs as split_outputs  # noqa: E402

MEMORY = r"\b(ld\.global[\.\w]*|st\.global[\.\w]*|ld\.shared[\.\w]*|st\.shared[\.\w]*|shfl\.sync[\.\w]*|bar\.sync)"


@dataclass(frozen=True)
class Case:
    label: str
    fn: object
    signature: dict
    constants: dict
    num_warps: int
    weights: int  # weights one loop step (or, without a loop, one program) covers


NF4_SIGNATURE = split_outputs({"x_ptr": "*fp16", "w_ptr": "*u8", "absmax_ptr": "*u8", "qmap_ptr": "*fp32",
                               "nabs_ptr": "*fp32", "nmap_ptr": "*fp32", "noff_ptr": "*fp32", "b_ptr": "*fp16",
                               "y_ptr": "*fp16", "N": "i32", "K": "i32"})


def cases() -> list[Case]:
    """The one-token kernels and the standalone dequantize kernels, each as its wrapper launches it
    on a 4096x4096 weight on an H100 (split-K as the wrappers choose there), and LLM.int8's batch
    tile with and without its activations quantized beforehand."""
    out = []
    int_sig = split_outputs({"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "qz_ptr": "*i32",
                             "perm_ptr": "*i32", "b_ptr": "*fp16", "y_ptr": "*fp16",
                             **{n: "i32" for n in ("M", "N", "K", "stride_xm", "stride_ym", "qw_words", "qz_words")}})
    int4 = dict(BITS=4, GROUP=128, HAS_PERM=False, HAS_BIAS=False, BLOCK_K=128, TILE_IN_GROUP=True, DOT_FP32=False,
                SWAP=False)
    out.append(Case("int4 g128 GEMV (calibration: 74-90 % of the read probe)", G._matmul_kernel, int_sig,
                    dict(int4, BLOCK_M=1, BLOCK_N=64, SPLIT_K=16), 2, 64 * 128))
    for bm, split in ((16, 8), (64, 2), (128, 2)):  # tl.dot tiles of 16 and 128 rows; 128 rows in one tile
        for swap in (False, True):
            out.append(Case(f"int4 g128 {bm}x64 tile{', y.T (swapped)' if swap else ''}", G._matmul_kernel,
                            int_sig, dict(int4, BLOCK_M=bm, BLOCK_N=64, SPLIT_K=split, SWAP=swap), 4, 64 * 128))
    nf4_tile = split_outputs({"x_ptr": "*fp16", "w_ptr": "*u8", "absmax_ptr": "*u8", "qmap_ptr": "*fp32",
                              "nabs_ptr": "*fp32", "nmap_ptr": "*fp32", "noff_ptr": "*fp32", "b_ptr": "*fp16",
                              "y_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32"})
    for bm, split in ((16, 8), (64, 2)):  # NF4's tl.dot tiles (blocks of 64), and the same as y.T (DOT_SWAP)
        for swap in (False, True):
            out.append(Case(f"nf4 {bm}x64 tile{', y.T (swapped)' if swap else ''}", B._matmul_kernel, nf4_tile,
                            dict(BLOCKSIZE=64, NESTED=True, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64,
                                 SPLIT_K=split, DOT_FP32=False, ROW_BLOCKS=True, LOOKUP=1, SWAP=swap), 4, 64 * 64))
    nf4 = dict(BLOCKSIZE=64, NESTED=True, HAS_BIAS=False, BLOCK_N=64, SPLIT_K=16)
    step = B.gemv_step_blocks(64)
    for lookup in B.GEMV_LOOKUPS:
        out.append(Case(f"nf4 GEMV, {lookup}", B._gemv_kernel, NF4_SIGNATURE,
                        dict(nf4, LOOKUP=B.GEMV_LOOKUPS.index(lookup), STEP_BLOCKS=step), 4, 64 * 64 * step))
    aqlm_sig = split_outputs({"x_ptr": "*fp16", "codes_ptr": "*i8", "books_ptr": "*fp16", "scales_ptr": "*fp16",
                              "b_ptr": "*fp16", "y_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "GI": "i32",
                              "stride_xm": "i32"})
    for table in (0, 4096):
        out.append(Case(f"aqlm 2x8 GEMV, {'gather' if table else 'global'}", A._matmul_kernel, aqlm_sig,
                        dict(C=2, SIZE=256, IG=8, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8,
                             DOT_FP32=False, WHOLE_WORDS=True, TABLE=table, SWAP=False), 4, 64 * 128))
    for size, table in ((256, 4096), (65536, 0)):  # the tiled kernel's 64x64 tiles, and as y.T (DOT_SWAP)
        for swap in (False, True):
            c = 2 if size == 256 else 1
            out.append(Case(f"aqlm {c}x{size.bit_length() - 1} 64x64 tile{', y.T (swapped)' if swap else ''}",
                            A._matmul_kernel, dict(aqlm_sig, codes_ptr="*i8" if size == 256 else "*i16"),
                            dict(C=c, SIZE=size, IG=8, HAS_BIAS=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2,
                                 DOT_FP32=False, WHOLE_WORDS=True, TABLE=table, SWAP=swap), 4, 64 * 128))
    lut_sig = split_outputs({"codes_ptr": "*i8", "lut_ptr": "*fp16", "scales_ptr": "*fp16", "b_ptr": "*fp16",
                             "y_ptr": "*fp16", "N": "i32", "GI": "i32"})
    for block_j, prefetch in ((64, False), (256, True)):  # the first version's step, and the default
        out.append(Case(f"aqlm 2x8 GEMV, lut, {block_j} codes a step{', prefetch' if prefetch else ''} "
                        "(table matmul not counted)", L._lut_gemv_kernel, lut_sig,
                        dict(C=2, SIZE=256, HAS_BIAS=False, BLOCK_N=16, BLOCK_J=block_j, SPLIT_K=1,
                             PREFETCH=prefetch), 4, 16 * block_j // 2 * 8))
    out.append(Case("aqlm 2x8 GEMV, lut slices held (LUT_SLICES; table matmul not counted)", L._lut_slice_kernel,
                    lut_sig, dict(C=2, SIZE=256, HAS_BIAS=False, BLOCK_N=L.LUT_SLICE_ROWS, BLOCK_J=64, SPLIT_K=8),
                    8, L.LUT_SLICE_ROWS * 64 // 2 * 8))
    products_sig = split_outputs({"codes_ptr": "*i8", "x_ptr": "*fp16", "books_ptr": "*fp16", "scales_ptr": "*fp16",
                                  "b_ptr": "*fp16", "y_ptr": "*fp16", "N": "i32", "GI": "i32", "stride_xm": "i32"})
    out.append(Case("aqlm 2x8 GEMV, lut slices made in the program (LUT_SLICE_PRODUCTS; one launch)",
                    L._lut_products_kernel, products_sig,
                    dict(C=2, SIZE=256, IG=8, HAS_BIAS=False, BLOCK_N=L.LUT_SLICE_ROWS, BLOCK_J=64, SPLIT_K=8,
                         EXACT=False), 8, L.LUT_SLICE_ROWS * 64 // 2 * 8))
    nf4_deq = {"w_ptr": "*u8", "absmax_ptr": "*u8", "qmap_ptr": "*fp32", "nabs_ptr": "*fp32", "nmap_ptr": "*fp32",
               "noff_ptr": "*fp32", "out_ptr": "*fp16", "numel": "i32"}
    out.append(Case("nf4 dequantize, global (calibration: 86 % of the copy probe)", B._dequantize_kernel, nf4_deq,
                    dict(BLOCKSIZE=64, NESTED=True, BLOCKS=32, LOOKUP=0), 4, 2048))
    deq_sig = {"codes_ptr": "*i8", "books_ptr": "*fp16", "scales_ptr": "*fp16", "out_ptr": "*fp16",
               "N": "i32", "K": "i32", "GI": "i32"}
    for words in (False, True):
        for table in (0, 4096):
            out.append(Case(f"aqlm 2x8 dequantize, {'gather' if table else 'global'}{' words' if words else ''}",
                            A._dequantize_kernel, deq_sig,
                            dict(C=2, SIZE=256, IG=8, BLOCK_N=32, BLOCK_K=64, TABLE=table, WHOLE_WORDS=words),
                            4, 32 * 64))
    int8_sig = split_outputs({"x_ptr": "*fp16", "ca_ptr": "*i8", "w_ptr": "*i8", "scb_ptr": "*fp32",
                              "outlier_ptr": "*u8", "part_ptr": "*fp32", "b_ptr": "*fp16", "y_ptr": "*fp16",
                              **{n: "i32" for n in ("M", "N", "K", "stride_xm", "stride_wn", "stride_ym",
                                                    "n_parts")}, "threshold": "fp32"})
    for pre in (False, True):  # a 64x64 output tile of 64 or more rows, as the heuristic launches it
        out.append(Case(f"LLM.int8 64x64 tile, {'codes loaded' if pre else 'x quantized in the program'}",
                        I._matmul_kernel, int8_sig,
                        dict(HAS_OUTLIERS=False, HAS_BIAS=False, PREQUANTIZED=pre, WEIGHT_ONLY=False,
                             BLOCK_M=64, BLOCK_N=64,
                             BLOCK_K=128, SPLIT_K=1, DOT_FP32=False, ROW_STATS=False), 4, 128 * 64))
    return out


def compile_ptx(case: Case) -> str:
    fn = case.fn
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in case.signature.items()
             if kind != "fp32"}  # pointers and ints
    src = ASTSource(fn=fn, signature=dict(case.signature, **{n: "constexpr" for n in case.constants}),
                    constexprs=dict(case.constants), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": case.num_warps}).asm["ptx"]


def assemble(ptx: str) -> str:
    """``ptxas -v`` of ``ptx`` for sm_90a with a ``ptxas`` Triton ships (its newer one where the
    first does not take this PTX version): "registers, spilled bytes", and "wgmma serialized" where
    it warns C7515."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for name in ("ptxas", "ptxas-blackwell"):
            run = subprocess.run([os.path.join(tools, name), "-v", "--gpu-name", "sm_90a", src, "-o",
                                  os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
            if run.returncode == 0:
                break
        log = run.stderr
    if run.returncode:
        return f"ptxas failed: {log.strip().splitlines()[0] if log.strip() else run.returncode}"
    regs = re.search(r"Used (\d+) registers", log)
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", log))
    out = f"{regs.group(1) if regs else '?'} registers, {spills} B spilled"
    return out + (", wgmma serialized" if "C7515" in log else "")


def loop_body(ptx: str) -> tuple[list[str], bool]:
    """The instructions of the longest loop (a label and the backward branch to it), or of the
    whole kernel if it has none; and whether a loop was found."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__\w+):", line.strip()))}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i and i - labels[m.group(1)] > len(best):
            best = lines[labels[m.group(1)] : i + 1]
    body = best or lines
    keep = [ln.strip() for ln in body if ln.strip() and not ln.strip().startswith(("//", "$", ".", "{", "}", ")"))]
    return keep, bool(best)


def main() -> None:
    print(f"sm_90 PTX, Triton {triton.__version__}; per loop step (or per program for loopless kernels)\n")
    print("| kernel variant | instructions / thread | warps | weights | warp instructions / 1k weights | "
          "memory and sync instructions | wgmma, pending at each wait | ptxas |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases():
        ptx = compile_ptx(case)
        body, looped = loop_body(ptx)
        per_k = len(body) * case.num_warps / case.weights * 1000
        mem = Counter(re.findall(MEMORY, "\n".join(body)))
        detail = ", ".join(f"{k} {v}" for k, v in sorted(mem.items()))
        text = "\n".join(body)
        dots = len(re.findall(r"\bwgmma\.mma_async", text))
        waits = ",".join(re.findall(r"\bwgmma\.wait_group\.sync\.aligned\s+(\d+)", text))
        print(f"| {case.label} | {len(body)}{'' if looped else ' (no loop)'} | {case.num_warps} | {case.weights} | "
              f"{per_k:.0f} | {detail} | {f'{dots}, {waits}' if dots else ''} | {assemble(ptx)} |", flush=True)


if __name__ == "__main__":
    main()
