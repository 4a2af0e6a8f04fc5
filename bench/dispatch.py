"""Per-call CPU cost of an eager call in front of its kernel launches, in two parts.

1. Reaching a Triton wrapper: through the ``torch.ops.lowbit`` custom op, and through the modules'
   entry points (``lowbit/kernels/ops.py``), which skip the op in plain eager. The wrappers are
   replaced by stubs that return an empty tensor of the output's shape.
2. The wrappers themselves (launch configuration, output buffers, the activation statistics of
   LLM.int8, the split-K sum's launch), with every Triton kernel replaced by a stub whose launch
   does nothing, on CPU tensors of Llama-7B's 4096 x 4096 shape.

What is timed is the Python and PyTorch work an eager call adds to a kernel's graph-replay time,
less Triton's own launcher. Runs on any machine; needs Triton importable.

    python bench/dispatch.py
"""

from __future__ import annotations

import time

import torch

from lowbit.kernels import ops, triton_blockwise4, triton_codebook, triton_common, triton_int8, triton_int_grouped

KERNEL_MODULES = (triton_int_grouped, triton_blockwise4, triton_codebook, triton_int8, triton_common)


def per_call_us(fn, calls: int = 20000) -> float:
    for _ in range(200):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **options)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **options: None


def wrapper_table(k: int, n: int) -> None:
    """Part 2: each format's matmul wrapper for one token, its kernels stubbed."""
    from lowbit.formats.blockwise4 import Blockwise4Linear
    from lowbit.formats.codebook import pack_codes
    from lowbit.formats.group_order import GroupOrdered
    from lowbit.formats.int8_outlier import quantize_rows

    for mod in KERNEL_MODULES:
        for name in dir(mod):
            if name.endswith("_kernel") and not name.startswith("__"):
                setattr(mod, name, _NoLaunch())
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).half()
    x = torch.randn(1, 1, k, generator=gen).half()
    grouped = GroupOrdered(torch.zeros(k // 8, n, dtype=torch.int32), torch.rand(k // 128, n).half(),
                           torch.zeros(k // 128, n // 8, dtype=torch.int32), None, 4, 128)
    nf4 = Blockwise4Linear.from_linear(w, None, quant_type="nf4", blocksize=64, double_quant=True)
    nf4_args = (nf4.weight, nf4.absmax, nf4.quant_map, 64, (n, k), nf4.nested_absmax, nf4.nested_quant_map,
                nf4.nested_offset)
    codes = pack_codes(torch.randint(0, 256, (n, k // 8, 2), generator=gen), 8)
    books, scales = torch.randn(2, 256, 1, 8, generator=gen).half(), torch.rand(n, 1, 1, 1, generator=gen).half()
    cb, scb = quantize_rows(w)
    cases = [("grouped int w4 g128", lambda: triton_int_grouped.matmul_group_ordered(x, grouped)),
             ("nf4 double quant", lambda: triton_blockwise4.matmul_blockwise4(x, *nf4_args)),
             ("aqlm 2x8", lambda: triton_codebook.matmul_codebook(x, codes, books, scales)),
             ("LLM.int8 (threshold 6)", lambda: triton_int8.matmul_int8_outlier(x, cb, scb, 6.0))]
    print("\n| format, one token, fp16 | wrapper µs (kernels stubbed) |")
    print("|---|---|")
    for name, call in cases:
        with torch.inference_mode():
            print(f"| {name} | {per_call_us(call):.1f} |", flush=True)


def main() -> None:
    k, n = 4096, 4096
    saved = (triton_int_grouped.matmul_group_ordered, triton_blockwise4.matmul_blockwise4,
             triton_codebook.matmul_codebook)
    triton_int_grouped.matmul_group_ordered = lambda x, w, bias=None: x.new_empty(x.shape[0], n)
    triton_blockwise4.matmul_blockwise4 = lambda x, *a, **kw: x.new_empty(x.shape[0], n)
    triton_codebook.matmul_codebook = lambda x, *a, **kw: x.new_empty(x.shape[0], n)
    x = torch.randn(1, k)
    i32 = torch.zeros(k // 8, n, dtype=torch.int32)
    int_args = (i32, torch.randn(k // 128, n), torch.zeros(k // 128, n // 8, dtype=torch.int32), None, None, 4, 128)
    nf4_args = (torch.zeros(n * k // 2, 1, dtype=torch.uint8), torch.randn(n * k // 64), torch.randn(16), None, None,
                None, None, 64, n, k, None)
    aqlm_args = (torch.zeros(n, k // 8, 2, dtype=torch.int16), torch.randn(2, 256, 1, 8), torch.randn(n, 1, 1, 1), None)
    cases = [("grouped int", ops.int_grouped_matmul, ops.int_grouped_linear, int_args),
             ("nf4", ops.blockwise4_matmul, ops.blockwise4_linear, nf4_args),
             ("aqlm", ops.codebook_matmul, ops.codebook_linear, aqlm_args)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; µs per call, Triton wrapper stubbed\n")
    print("| format | mode | custom op | entry point |")
    print("|---|---|---|---|")
    for mode, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        for name, op, entry, args in cases:
            with ctx():
                via_op = per_call_us(lambda: op(x, *args))
                via_entry = per_call_us(lambda: entry(x, *args))
            print(f"| {name} | {mode} | {via_op:.1f} | {via_entry:.1f} |", flush=True)
    (triton_int_grouped.matmul_group_ordered, triton_blockwise4.matmul_blockwise4,
     triton_codebook.matmul_codebook) = saved
    wrapper_table(k, n)


if __name__ == "__main__":
    main()
