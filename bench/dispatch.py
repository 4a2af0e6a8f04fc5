"""Per-call CPU cost of reaching a Triton wrapper: through the ``torch.ops.lowbit`` custom op, and
through the modules' entry points (``lowbit/kernels/ops.py``), which skip the op in plain eager.

The Triton wrappers are replaced by stubs that return an empty tensor of the output's shape, so
what is timed is only the Python and dispatcher work in front of a kernel launch (the part an eager
call adds to a kernel's graph-replay time). Runs on any machine; needs Triton importable.

    python bench/dispatch.py
"""

from __future__ import annotations

import time

import torch

from lowbit.kernels import ops, triton_blockwise4, triton_codebook, triton_int_grouped


def per_call_us(fn, calls: int = 20000) -> float:
    for _ in range(200):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    k, n = 4096, 4096
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


if __name__ == "__main__":
    main()
