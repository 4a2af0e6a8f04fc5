"""What an eager one-token call of each Triton wrapper does besides its kernels: views and
uninitialised allocations only. A zero-fill, a reduction or a cast is a PyTorch launch of its own
on a GPU, several microseconds of CPU each (the split-K finish used to add a sum, an add and a
cast to every one-token call; ``docs/performance.md``)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit.formats.blockwise4 import quantize_4bit
from lowbit.formats.int8_outlier import quantize_rows
from test_group_order import random_module as random_int_grouped
from test_triton_codebook import random_module as random_aqlm

pytest.importorskip("triton")
C = pytest.importorskip("lowbit.kernels.triton_common")
TG = pytest.importorskip("lowbit.kernels.triton_int_grouped")
TB = pytest.importorskip("lowbit.kernels.triton_blockwise4")
TC = pytest.importorskip("lowbit.kernels.triton_codebook")
TL = pytest.importorskip("lowbit.kernels.triton_codebook_lut")
TI = pytest.importorskip("lowbit.kernels.triton_int8")
TA = pytest.importorskip("lowbit.kernels.triton_int8_activations")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOOKKEEPING = {"view", "_unsafe_view", "reshape", "detach", "empty", "t", "transpose", "alias"}
"""aten ops that launch nothing: views and allocations without a fill."""


class _Ops(TorchDispatchMode):
    """Records the aten ops a call dispatches (names without overload)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _grouped(x):
    layout = random_int_grouped(256, 512, 4, 128, True).to(DEVICE).group_ordered()
    cfg = C.MatmulConfig(1, 64, 128, 4, 4, 3)  # four K splits
    return lambda: TG.matmul_group_ordered(x, layout, None, cfg=cfg)


def _nf4(x):
    q = quantize_4bit(torch.randn(256, 512, generator=torch.Generator().manual_seed(1)).half(), "nf4", 64, True)
    t = [v.to(DEVICE) for v in (q.weight, q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map,
                                q.nested_offset)]
    return lambda: TB.matmul_blockwise4(x, *t[:3], 64, (256, 512), *t[3:])


def _aqlm(x):
    mod = random_aqlm(256, 512, 8, 2, 8, seed=2, dtype=torch.float16).to(DEVICE)
    return lambda: TC.matmul_codebook(x, mod.codes, mod.codebooks, mod.scales)


def _aqlm_products_in_program(x):
    call = _aqlm(x)

    def run():
        saved = TL.LUT_SLICES, TL.LUT_SLICE_PRODUCTS
        TL.LUT_SLICES = TL.LUT_SLICE_PRODUCTS = True
        try:
            return call()
        finally:
            TL.LUT_SLICES, TL.LUT_SLICE_PRODUCTS = saved
    return run


def _int8(weight_only):
    def build(x):
        cb, scb = (v.to(DEVICE) for v in quantize_rows(torch.randn(256, 512, generator=torch.Generator().manual_seed(3))))
        return lambda: TI.matmul_int8_outlier(x, cb, scb, 6.0, weight_only=weight_only)
    return build


def _int8_fused_stats(x):
    call = _int8(False)(x)

    def run():
        saved, TI.FUSED_ROW_STATS = TI.FUSED_ROW_STATS, True
        try:
            return call()
        finally:
            TI.FUSED_ROW_STATS = saved
    return run


# (build, its Triton launches, aten ops besides bookkeeping): AQLM's one-token path multiplies x by
# the codebooks in one matmul (its lookup table) before its kernel, or (not the default) in the kernel
# itself; LLM.int8 finds the outlier
# columns and row maxima in a launch before its matmul, or (not the default) in the matmul kernel
CASES = {
    "grouped-int-split-k": (_grouped, ["_matmul_kernel"], []),
    "nf4-double-quant": (_nf4, ["_gemv_kernel"], []),
    "aqlm-2x8": (_aqlm, ["_lut_gemv_kernel"], ["mm"]),
    "aqlm-2x8-products-in-program": (_aqlm_products_in_program, ["_lut_products_kernel"], []),
    "int8": (_int8(False), ["_stats_kernel", "_matmul_kernel"], []),
    "int8-fused-statistics": (_int8_fused_stats, ["_matmul_kernel"], []),
    "int8-weight-only": (_int8(True), ["_matmul_kernel"], []),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_one_token_call_is_allocations_and_launches(case, monkeypatch):
    """The second one-token call of each wrapper (the first may allocate the split-K counters):
    its kernels' launches, and no PyTorch work but views, allocations and the stated matmul."""
    build, want_launches, want_work = CASES[case]
    launches = []
    for mod in (TG, TB, TC, TL, TI, TA):
        monkeypatch.setattr(mod, "launch", lambda kernel, grid, *a, **kw: launches.append(kernel.fn.__name__))
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.float16)
    call = build(x)
    call()
    launches.clear()
    with _Ops() as seen:
        y = call()
    assert y.shape == (1, 256) and y.dtype == torch.float16
    assert launches == want_launches
    assert [name for name in seen.names if name not in BOOKKEEPING] == want_work
