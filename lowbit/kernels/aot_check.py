"""Ahead-of-time compilation of every Triton kernel for NVIDIA sm_90 (H100), AMD CDNA gfx942 (MI300)
and AMD RDNA3 gfx1100 (RX 7900 class), and for AMD RDNA2 gfx1030 (RX 6800 XT class) wherever the
installed Triton compiles for it.

Triton 3.5 to 3.8 compile for RDNA2: every kernel variant here with Triton 3.6, and one variant
with each of 3.5, 3.7 and 3.8 (2026-11-28). Triton 3.9 dropped it ("unsupported target:
'gfx1030'"). So for each target of :data:`WHERE_SUPPORTED` the check first asks
:func:`lowbit.kernels.triton_common.compiles_for`, the probe that also decides whether such a GPU
gets the Triton kernels (:func:`lowbit.kernels.triton_gpu_available`). If it compiles, every variant
must compile for it as well; if it is refused, the check says so, and such a GPU takes the
reference path.

Runs on a machine without a GPU: ``triton.compile`` lowers each kernel variant through the
target's whole pipeline (PTX and cubin for CUDA, AMDGCN and hsaco for HIP, with the HIP
options the launch configuration uses). A kernel that stops compiling for either vendor fails
here before anyone runs it there::

    python -m lowbit.kernels.aot_check            # prints one line per variant, exit 1 on failure

``TRITON_INTERPRET`` must be unset (the interpreter replaces kernels with Python functions).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

TARGETS = (("cuda", 90, 32), ("hip", "gfx942", 64), ("hip", "gfx1100", 32))
"""(backend, architecture, warp size) of each target."""

WHERE_SUPPORTED = (("hip", "gfx1030", 32),)
"""Targets of some Triton versions only: RDNA2 (see above), wave32 AMD architectures that
:func:`lowbit.kernels.triton_common.compiles_for` asks about."""


@dataclass(frozen=True)
class Variant:
    """One compile of one kernel: its argument types and constexpr values."""

    module: str  # under lowbit.kernels
    kernel: str
    signature: dict
    constants: dict
    options: tuple = ()  # (name, value) compile options the launch passes, e.g. enable_fp_fusion
    backends: tuple = ("cuda", "hip")  # the targets' backends it is for (PTX inline assembly: cuda)

    def label(self) -> str:
        return f"{self.module}.{self.kernel}[{', '.join(f'{k}={v}' for k, v in self.constants.items())}]"


def _with_split_outputs(sig: dict) -> dict:
    """``sig`` with the split-K partials (fp32) and arrival counters (int32) after ``y_ptr``."""
    out = {}
    for name, kind in sig.items():
        out[name] = kind
        if name == "y_ptr":
            out.update(ws_ptr="*fp32", lock_ptr="*i32")
    return out


def _matmul_variants() -> list[Variant]:
    ptrs = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "qz_ptr": "*i32", "perm_ptr": "*i32",
            "b_ptr": "*fp16", "y_ptr": "*fp16"}
    ints = {name: "i32" for name in ("M", "N", "K", "stride_xm", "stride_ym", "qw_words", "qz_words")}
    out = []
    # (bits, group, perm, block_m, block_n, block_k, split_k, tile_in_group, dtype)
    for bits, group, perm, bm, bn, bk, split, in_group, dt in (
        (4, 128, False, 1, 64, 128, 8, True, "fp16"),  # GEMV, split-K
        (4, 128, True, 1, 128, 128, 16, True, "fp16"),  # act-order GEMV (x gathered), its wider tile
        (4, 128, True, 16, 64, 128, 4, True, "fp16"),  # act-order, tl.dot, split-K
        (4, 128, False, 64, 128, 128, 1, True, "bf16"),  # GEMM, bias in-kernel
        (3, 64, False, 16, 64, 64, 1, True, "fp16"),  # 3-bit straddling words
        (2, 32, True, 4, 32, 32, 2, True, "bf16"),
        (8, 100, False, 16, 64, 32, 1, False, "fp16"),  # tiles spanning groups
        (2, 64, False, 16, 64, 64, 1, True, "fp16"),  # dot tiles of 2 and 8 bits
        (8, 128, False, 32, 64, 128, 2, True, "bf16"),
    ):
        sig = dict(ptrs, **ints)
        for name in ("x_ptr", "s_ptr", "b_ptr"):
            sig[name] = f"*{dt}"
        sig = _with_split_outputs(sig)
        consts = dict(BITS=bits, GROUP=group, HAS_PERM=perm, HAS_BIAS=split == 1, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_K=bk, SPLIT_K=split, TILE_IN_GROUP=in_group, DOT_FP32=False, SWAP=False)
        out.append(Variant("triton_int_grouped", "_matmul_kernel", sig, consts))
        if bm >= 16 and in_group and bits != 3:  # tiles of y.T, the weight first (DOT_SWAP)
            out.append(Variant("triton_int_grouped", "_matmul_kernel", sig, dict(consts, SWAP=True)))
    return out


def _dequantize_variants() -> list[Variant]:
    sig = {"qw_ptr": "*i32", "s_ptr": "*fp16", "qz_ptr": "*i32", "perm_ptr": "*i32", "out_ptr": "*fp16",
           "N": "i32", "K": "i32", "qw_words": "i32", "qz_words": "i32"}
    return [Variant("triton_int_grouped", "_dequantize_kernel", sig,
                    dict(BITS=bits, GROUP=128, HAS_PERM=perm, BLOCK_N=64, BLOCK_K=64))
            for bits, perm in ((2, False), (3, True), (4, False), (4, True), (8, False))]


def _blockwise4_variants() -> list[Variant]:
    out = []
    # LOOKUP: the code table read from memory (0) or with tl.gather (1)
    for nested, bm, split, dt, lookup in ((False, 1, 8, "fp16", 0), (True, 1, 8, "bf16", 1),
                                          (True, 16, 2, "fp16", 1), (False, 64, 1, "bf16", 0)):
        sig = {"x_ptr": f"*{dt}", "w_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "qmap_ptr": "*fp32",
               "nabs_ptr": "*fp32", "nmap_ptr": "*fp32", "noff_ptr": "*fp32", "b_ptr": f"*{dt}",
               "y_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32"}
        sig = _with_split_outputs(sig)
        consts = dict(BLOCKSIZE=64, NESTED=nested, HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=64 if bm < 64 else 128,
                      BLOCK_K=64, SPLIT_K=split, DOT_FP32=False, ROW_BLOCKS=nested, LOOKUP=lookup, SWAP=False)
        out.append(Variant("triton_blockwise4", "_matmul_kernel", sig, consts))
        if bm >= 16:  # tiles of y.T (DOT_SWAP), on rows of whole blocks
            out.append(Variant("triton_blockwise4", "_matmul_kernel", sig, dict(consts, ROW_BLOCKS=True, SWAP=True)))
    # the one-token kernel: gathered table, table in memory, and (NVIDIA only) byte permutes (2)
    for nested, split, dt, lookup in ((True, 16, "fp16", 1), (False, 1, "bf16", 0), (True, 16, "fp16", 2),
                                      (False, 8, "bf16", 2)):
        sig = {"x_ptr": f"*{dt}", "w_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "qmap_ptr": "*fp32",
               "nabs_ptr": "*fp32", "nmap_ptr": "*fp32", "noff_ptr": "*fp32", "b_ptr": f"*{dt}",
               "y_ptr": f"*{dt}", "N": "i32", "K": "i32"}
        sig = _with_split_outputs(sig)
        consts = dict(BLOCKSIZE=64, NESTED=nested, HAS_BIAS=split > 1, BLOCK_N=64, SPLIT_K=split, LOOKUP=lookup,
                      STEP_BLOCKS=4)
        out.append(Variant("triton_blockwise4", "_gemv_kernel", sig, consts,
                           backends=("cuda",) if lookup == 2 else ("cuda", "hip")))
    for nested, blocksize, lookup in ((False, 64, 0), (True, 64, 1), (False, 4096, 0)):
        sig = {"w_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "qmap_ptr": "*fp32", "nabs_ptr": "*fp32",
               "nmap_ptr": "*fp32", "noff_ptr": "*fp32", "out_ptr": "*fp16", "numel": "i32"}
        out.append(Variant("triton_blockwise4", "_dequantize_kernel", sig,
                           dict(BLOCKSIZE=blocksize, NESTED=nested, BLOCKS=max(1, 2048 // blocksize),
                                LOOKUP=lookup)))
    return out


def _codebook_variants() -> list[Variant]:
    out = []
    # (codebooks, entries, in_group, block_m, split_k, dtype): AQLM 2x8 and 1x16 GEMV/GEMM
    for c, size, ig, bm, split, dt in ((2, 256, 8, 1, 8, "fp16"), (1, 65536, 8, 1, 8, "bf16"),
                                        (2, 256, 8, 16, 2, "fp16"), (1, 65536, 16, 64, 1, "fp16")):
        sig = {"x_ptr": f"*{dt}", "codes_ptr": "*i8" if size <= 256 else "*i16", "books_ptr": f"*{dt}",
               "scales_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}",
               "M": "i32", "N": "i32", "K": "i32", "GI": "i32", "stride_xm": "i32"}
        sig = _with_split_outputs(sig)
        consts = dict(C=c, SIZE=size, IG=ig, HAS_BIAS=split == 1, BLOCK_M=bm, BLOCK_N=64 if bm < 64 else 128,
                      BLOCK_K=128, SPLIT_K=split, DOT_FP32=False, WHOLE_WORDS=True,
                      TABLE=c * size * ig if c * size * ig <= 4096 else 0, SWAP=False)  # 2x8 gathers: a held table
        out.append(Variant("triton_codebook", "_matmul_kernel", sig, consts))
        if bm >= 16:  # tiles of y.T (DOT_SWAP)
            out.append(Variant("triton_codebook", "_matmul_kernel", sig, dict(consts, SWAP=True)))
    # (codebooks, entries, whole words, gathered): the 2x8 default (whole words from memory) and the rest
    for c, size, words, table in ((2, 256, True, 0), (2, 256, False, 4096), (1, 65536, False, 0),
                                  (1, 65536, True, 0)):
        sig = {"codes_ptr": "*i8" if size <= 256 else "*i16", "books_ptr": "*fp16", "scales_ptr": "*fp16",
               "out_ptr": "*fp16", "N": "i32", "K": "i32", "GI": "i32"}
        out.append(Variant("triton_codebook", "_dequantize_kernel", sig,
                           dict(C=c, SIZE=size, IG=8, BLOCK_N=32, BLOCK_K=64, TABLE=table, WHOLE_WORDS=words)))
    # 2x8 through tabulated codeword products: the default step (64 codes, the next codes loaded
    # ahead), and without the prefetch (the bench's comparison row)
    for split, lut, block_j, prefetch in ((4, "fp32", 64, True), (1, "fp16", 64, False)):
        sig = {"codes_ptr": "*i8", "lut_ptr": f"*{lut}", "scales_ptr": "*fp16", "b_ptr": "*fp16",
               "y_ptr": "*fp16", "N": "i32", "GI": "i32"}
        out.append(Variant("triton_codebook_lut", "_lut_gemv_kernel", _with_split_outputs(sig),
                           dict(C=2, SIZE=256, HAS_BIAS=split > 1, BLOCK_N=16, BLOCK_J=block_j, SPLIT_K=split,
                                PREFETCH=prefetch)))
        # the same with slices of the table held in the program (LUT_SLICES), 64 KiB of fp32 or 32 of fp16
        out.append(Variant("triton_codebook_lut", "_lut_slice_kernel", _with_split_outputs(sig),
                           dict(C=2, SIZE=256, HAS_BIAS=split > 1, BLOCK_N=256, BLOCK_J=64, SPLIT_K=split),
                           options=(("num_warps", 8),)))
        # or made in the program from x and the codebooks (LUT_SLICE_PRODUCTS): fp32 dots for bf16 x
        x_dtype = "bf16" if lut == "fp32" else "fp16"
        sig = {"codes_ptr": "*i8", "x_ptr": f"*{x_dtype}", "books_ptr": "*fp16", "scales_ptr": "*fp16",
               "b_ptr": "*fp16", "y_ptr": f"*{x_dtype}", "N": "i32", "GI": "i32", "stride_xm": "i32"}
        out.append(Variant("triton_codebook_lut", "_lut_products_kernel", _with_split_outputs(sig),
                           dict(C=2, SIZE=256, IG=8, HAS_BIAS=split > 1, BLOCK_N=256, BLOCK_J=64, SPLIT_K=split,
                                EXACT=lut == "fp32"), options=(("num_warps", 8),)))
    return out


def _int8_variants() -> list[Variant]:
    out = []
    # (block_m, split_k, outliers, prequantized, weight-only, dtype): one-token GEMV with split-K,
    # int8 tl.dot tiles, no outliers, codes written by the quantize kernel, weight-only GEMV and tiles
    for bm, split, outliers, pre, wo, dt in ((1, 8, True, False, False, "fp16"), (16, 2, True, False, False, "bf16"),
                                             (64, 1, False, False, False, "fp16"), (64, 1, True, True, False, "fp16"),
                                             (128, 1, True, True, False, "fp16"), (1, 8, False, False, True, "fp16"),
                                             (64, 1, False, False, True, "bf16")):
        sig = {"x_ptr": f"*{dt}", "ca_ptr": "*i8", "w_ptr": "*i8", "scb_ptr": "*fp32", "outlier_ptr": "*u8",
               "part_ptr": "*fp32", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "M": "i32",
               "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32", "n_parts": "i32",
               "threshold": "fp32"}
        consts = dict(HAS_OUTLIERS=outliers, HAS_BIAS=split == 1, PREQUANTIZED=pre, WEIGHT_ONLY=wo, BLOCK_M=bm,
                      BLOCK_N=64 if bm < 64 else 128, BLOCK_K=128, SPLIT_K=split, DOT_FP32=False)  # 128: 128^3
        consts["ROW_STATS"] = False  # the statistics come from a launch of their own, as the wrapper runs them
        out.append(Variant("triton_int8", "_matmul_kernel", _with_split_outputs(sig), consts,
                           (("enable_fp_fusion", False),)))
        if bm <= 16 and outliers and not (pre or wo):  # and found in the matmul (FUSED_ROW_STATS)
            out.append(Variant("triton_int8", "_matmul_kernel", _with_split_outputs(sig), dict(consts, ROW_STATS=True),
                               (("enable_fp_fusion", False),)))
    # the int8 codes, and (grid) the values they stand for in x's dtype, outlier columns as they are
    for outliers, dt, grid in ((True, "fp16", False), (False, "bf16", False), (True, "bf16", True)):
        sig = {"x_ptr": f"*{dt}", "outlier_ptr": "*u8", "part_ptr": "*fp32", "ca_ptr": f"*{dt}" if grid else "*i8",
               "M": "i32", "K": "i32", "stride_xm": "i32", "n_parts": "i32"}
        out.append(Variant("triton_int8_activations", "_quantize_kernel", sig,
                           dict(HAS_OUTLIERS=outliers, BLOCK_M=16, BLOCK_K=256, GRID=grid),
                           (("enable_fp_fusion", False),)))
    for dt in ("fp16", "bf16"):
        sig = {"w_ptr": "*i8", "scb_ptr": "*fp32", "out_ptr": f"*{dt}", "N": "i32", "K": "i32", "stride_wn": "i32"}
        out.append(Variant("triton_int8_activations", "_dequantize_kernel", sig, dict(BLOCK_N=32, BLOCK_K=128)))
    for outliers, bm, dt in ((True, 1, "fp16"), (False, 16, "bf16")):
        sig = {"x_ptr": f"*{dt}", "outlier_ptr": "*u8", "part_ptr": "*fp32", "M": "i32", "K": "i32",
               "stride_xm": "i32", "threshold": "fp32"}
        out.append(Variant("triton_int8_activations", "_stats_kernel", sig,
                           dict(HAS_OUTLIERS=outliers, BLOCK_M=bm, BLOCK_K=512)))
    return out


def variants() -> list[Variant]:
    """Every kernel variant the check compiles."""
    return (_matmul_variants() + _dequantize_variants() + _blockwise4_variants() + _codebook_variants()
            + _int8_variants())


def compile_variant(v: Variant, target: tuple) -> str:
    """Compile ``v`` for ``target`` (backend, arch, warp size); returns the final binary's kind."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import importlib

    from lowbit.kernels.triton_common import hip_options

    fn = getattr(importlib.import_module(f"lowbit.kernels.{v.module}"), v.kernel)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("kernels are interpreted (TRITON_INTERPRET is set); unset it to compile")
    signature = dict(v.signature, **{name: "constexpr" for name in v.constants})
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(v.constants))
    backend = target[0]
    options = {"num_warps": 4, **dict(v.options)}
    if backend == "hip":
        options.update(hip_options(target[1]), num_stages=2)  # as the launches on that GPU use
    kernel = triton.compile(src, target=GPUTarget(*target), options=options)
    binary = "cubin" if backend == "cuda" else "hsaco"
    if not kernel.asm.get(binary):
        raise RuntimeError(f"no {binary} produced")
    return binary


def main() -> int:
    from lowbit.kernels.triton_common import compiles_for

    failed = 0
    targets = [*TARGETS]
    for target in WHERE_SUPPORTED:
        if compiles_for(target[1]):
            targets.append(target)
        else:
            print(f"refused  {target[0]}:{target[1]}  (Triton's backend does not compile for it)")
    for v in variants():
        for target in (t for t in targets if t[0] in v.backends):
            try:
                kind = compile_variant(v, target)
                print(f"ok    {target[0]}:{target[1]}  {v.label()}  -> {kind}")
            except Exception as e:  # report every failing variant, not only the first
                failed += 1
                print(f"FAIL  {target[0]}:{target[1]}  {v.label()}: {type(e).__name__}: {str(e)[:400]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
