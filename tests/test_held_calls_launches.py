"""Held eager calls of the formats that make more than one launch a call: AQLM (its table of
codeword products, then the lookup kernel) and LLM.int8 (its activation statistics, then the
matmul); then, for every format, what a held repeat does and a module forward holding its calls.
The grouped-int and NF4 wrappers, and the helpers these share, are ``test_held_calls.py``'s."""

from __future__ import annotations

import pytest
import torch

from conftest import MATMUL_REL
from lowbit.kernels import reference
from lowbit.kernels.held import HeldCalls
from test_eager_work import BOOKKEEPING, TB, TC, TG, TI, TL, C, _Ops
from test_group_order import random_module
from test_held_calls import INT8_STATISTICS, TABULATED, _eager_calls_match, _nf4, _record, _record_wrapper, _x2k
from test_triton_blockwise4 import random_module as random_nf4
from test_triton_codebook import args as aqlm_args
from test_triton_codebook import random_module as random_aqlm
from test_triton_int8 import random_case as random_int8


# --- AQLM ---------------------------------------------------------------------------------------


@pytest.fixture
def recorded_aqlm(monkeypatch):
    """As the others, and each table of codeword products the wrapper makes."""
    kernels, _log, launches = _record(monkeypatch, TC, ("_matmul_kernel",), TABULATED)
    tables = []
    products = TL.codeword_products

    def tabulated(x2, books):
        tables.append(products(x2, books))
        return tables[-1]

    monkeypatch.setattr(TL, "codeword_products", tabulated)
    return kernels, launches, tables


def _aqlm(mod, x, **kwargs):
    return TC.matmul_codebook(x, *aqlm_args(mod), mod.bias, held=mod.held_calls, **kwargs)


@pytest.mark.parametrize("rows,kernel,x_at,y_at", [(1, "_lut_gemv_kernel", 1, 4), (1, "_lut_products_kernel", 1, 5),
                                                  (5, "_matmul_kernel", 0, 5)],
                         ids=["tabulated", "products-in-program", "tiled"])
def test_aqlm_second_call_repeats_the_launch(recorded_aqlm, monkeypatch, rows, kernel, x_at, y_at):
    """One token goes through its table of codeword products (made each call, and passed to the held
    launch) or, with ``LUT_SLICE_PRODUCTS``, x itself; five rows through the tiled kernel."""
    products = kernel == "_lut_products_kernel"
    monkeypatch.setattr(TL, "LUT_SLICES", products)
    monkeypatch.setattr(TL, "LUT_SLICE_PRODUCTS", products)
    kernels, launches, tables = recorded_aqlm
    mod = random_aqlm(32, 2048, 8, 2, 8, seed=2).cpu()  # stand-in kernels: CPU tensors
    _aqlm(mod, _x2k(rows, seed=0))
    x = _x2k(rows, seed=1)
    y = _aqlm(mod, x)
    assert len(launches) == 1 and len(mod.held_calls) == 1
    held = kernels[kernel].log[-1]
    TC.matmul_codebook(x, *aqlm_args(mod), mod.bias)  # nothing held: through launch's held kernel
    want = kernels[kernel].log[-1]
    assert held[0] == want[0] == "held"
    for i, (a, b) in enumerate(zip(held[2], want[2], strict=True)):
        if i == x_at and kernel == "_lut_gemv_kernel":  # this call's table, from this call's x
            assert a is tables[-2] and torch.equal(a, b)
        elif i == x_at:
            assert a.data_ptr() == b.data_ptr() == x.data_ptr()
        elif i == y_at:
            assert a is y and a.dtype == b.dtype and a.numel() == b.numel()
        elif isinstance(a, torch.Tensor):
            assert a is b
        else:
            assert a == b
    assert y.shape == (1, rows, 32)
    assert held[2][y_at + 1] is not held[2][y_at]  # split K: the partials are not the output


@pytest.mark.parametrize("change", ["replaced", "bias", "lut-switch", "slices-switch", "products-switch",
                                    "not-contiguous"])
def test_aqlm_a_change_goes_through_the_wrapper(recorded_aqlm, monkeypatch, change):
    _kernels, launches, _tables = recorded_aqlm
    mod = random_aqlm(32, 2048, 8, 2, 8, seed=2).cpu()  # stand-in kernels: CPU tensors
    if change == "not-contiguous":  # the codes as a strided view: copied for each call, never held
        mod.codes = torch.cat([mod.codes, mod.codes], dim=2)[..., ::2]
    _aqlm(mod, _x2k())
    if change == "replaced":
        mod.scales = mod.scales.clone()
    elif change == "bias":
        mod.bias = torch.randn(32).half()
    elif change == "lut-switch":
        monkeypatch.setattr(TL, "LUT_BLOCK_J", 32)
    elif change == "slices-switch":
        monkeypatch.setattr(TL, "LUT_SLICES", not TL.LUT_SLICES)
    elif change == "products-switch":
        monkeypatch.setattr(TL, "LUT_SLICE_PRODUCTS", not TL.LUT_SLICE_PRODUCTS)
    _aqlm(mod, _x2k())
    assert len(launches) == 2
    _aqlm(mod, _x2k())
    assert len(launches) == (3 if change == "not-contiguous" else 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")
@pytest.mark.parametrize("n_codebooks,nbits", [(2, 8), (1, 16)], ids=["2x8", "1x16"])
def test_aqlm_held_calls_give_the_reference_on_gpu(monkeypatch, n_codebooks, nbits):
    """An AQLM module's eager forward with real kernels: fresh inputs (the second call of a layout is
    held), one token (tabulated for 2x8), five rows (tiled), a misaligned view, a replaced buffer."""
    monkeypatch.setattr(C, "LAUNCH_CACHE", True)
    mod = random_aqlm(256, 2048, 8, n_codebooks, nbits, seed=2).cuda()
    _eager_calls_match(mod, (1, 1, 1, 5, 5, 1), lambda m: setattr(m, "scales", m.scales.clone()),
                       lambda v: reference.matmul_codebook(v.float(), *aqlm_args(mod), mod.bias),
                       MATMUL_REL[torch.float16])


# --- LLM.int8 -----------------------------------------------------------------------------------


@pytest.fixture
def recorded_int8(monkeypatch):
    _kernels, log, launches = _record(monkeypatch, TI, ("_matmul_kernel",), INT8_STATISTICS)
    return log, launches


INT8_CASES = {  # (threshold, weight_only, statistics in the matmul): the slots made each call
    "outliers": (6.0, False, False, [(0, 1, 2), (0, 4, 5, 7)]),
    "no-threshold": (0.0, False, False, [(0, 1, 2), (0, 5, 7)]),
    "weight-only": (6.0, True, False, [(0, 7)]),
    "statistics-in-matmul": (6.0, False, True, [(0, 7)]),
}


@pytest.mark.parametrize("case", list(INT8_CASES))
def test_int8_second_call_repeats_its_launches(recorded_int8, monkeypatch, case):
    """Each launch of a held call gets this call's tensors in its slots (x, the statistics, the
    output) and the first call's everywhere else, as the call through the wrapper passes them."""
    threshold, weight_only, fused, slots = INT8_CASES[case]
    monkeypatch.setattr(TI, "FUSED_ROW_STATS", fused)
    log, launches = recorded_int8
    held = HeldCalls()
    _x0, cb, scb, bias = (t.cpu() for t in random_int8(1, 32, 1024, seed=0, threshold=threshold))

    def call(x, **kwargs):
        return TI.matmul_int8_outlier(x, cb, scb, threshold, bias, weight_only=weight_only, **kwargs)

    call(torch.randn(1, 1, 1024, generator=torch.Generator().manual_seed(0)).half(), held=held)
    per_call = len(launches)
    x = torch.randn(1, 1, 1024, generator=torch.Generator().manual_seed(1)).half()
    y = call(x, held=held)
    assert len(launches) == per_call and len(held) == 1  # nothing through the wrapper's launches
    got = log[-len(slots):]
    call(x)  # not held: through launch's held kernels
    want = log[-len(slots):]
    for (kind_a, _grid_a, a_args), (kind_b, _grid_b, b_args), made in zip(got, want, slots, strict=True):
        assert kind_a == kind_b == "held" and len(a_args) == len(b_args)
        for i, (a, b) in enumerate(zip(a_args, b_args, strict=True)):
            if i == 0:
                assert a.data_ptr() == b.data_ptr() == x.data_ptr()
            elif i in made:  # made for this call: new, of the same kind (the output in x's leading shape)
                assert a is not b and a.numel() == b.numel() and a.dtype == b.dtype
            elif isinstance(a, torch.Tensor):
                assert a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype
            else:
                assert a == b
    assert got[-1][2][7] is y and y.shape == (1, 1, 32) and y.dtype == torch.float16

    def sharing(launched):  # which slots of the call's launches get the same tensor
        made = [args[i] for (_kind, _grid, args), at in zip(launched, slots, strict=True) for i in at]
        return [[a is b for b in made] for a in made]

    assert sharing(got) == sharing(want)  # the statistics the first launch writes are what the matmul reads


def test_int8_a_replaced_buffer_or_threshold_goes_through_the_wrapper(recorded_int8):
    _log, launches = recorded_int8
    held = HeldCalls()
    _x0, cb, scb, bias = (t.cpu() for t in random_int8(1, 32, 1024, seed=0, threshold=6.0))
    x = torch.randn(1, 1, 1024, generator=torch.Generator().manual_seed(1)).half()
    TI.matmul_int8_outlier(x, cb, scb, 6.0, bias, held=held)
    first = len(launches)
    TI.matmul_int8_outlier(x, cb, scb.clone(), 6.0, bias, held=held)
    assert len(launches) == 2 * first
    TI.matmul_int8_outlier(x, cb, scb, 4.0, bias, held=held)
    assert len(launches) == 3 * first and len(held) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")
@pytest.mark.parametrize("case", ["outliers", "no-threshold", "weight-only"])
def test_int8_held_calls_give_the_reference_on_gpu(monkeypatch, case):
    """An LLM.int8 module's eager forward with real kernels: fresh inputs with an outlier column (the
    second call of a layout is held), one token and three rows, a misaligned view, a replaced
    buffer, against the reference."""
    from lowbit.formats.int8_outlier import Int8Linear

    monkeypatch.setattr(C, "LAUNCH_CACHE", True)
    threshold = 0.0 if case == "no-threshold" else 6.0
    gen = torch.Generator().manual_seed(0)
    mod = Int8Linear.from_linear(torch.randn(256, 1024, generator=gen).half(), torch.randn(256, generator=gen),
                                 threshold=threshold, int8_activations=case != "weight-only").cuda()

    def want(view):
        if mod.int8_activations:
            return reference.matmul_int8_outlier(view.float(), mod.weight, mod.SCB, threshold, mod.bias)
        return reference.matmul_int8_weight_only(view.float(), mod.weight, mod.SCB, mod.bias)

    _eager_calls_match(mod, (1, 1, 1, 3, 3, 1), lambda m: setattr(m, "SCB", m.SCB.clone()), want,
                       MATMUL_REL[torch.float16], outlier=True)


# --- what a held call does ----------------------------------------------------------------------


def _held_repeat(case):
    """A wrapper call of one token that holds its launches, for :func:`test_a_held_call_only_allocates`."""
    x = torch.randn(1, 1, 2048, generator=torch.Generator().manual_seed(1)).half()
    if case == "grouped-int":
        w = random_module(256, 2048, 4, 128, True).group_ordered()
        return lambda: TG.matmul_group_ordered(x, w)
    if case == "nf4":
        mod = random_nf4(256, 2048, 64, "nf4", True, seed=0).cpu()
        return lambda: _nf4(mod, x)
    if case == "aqlm":
        mod = random_aqlm(32, 2048, 8, 2, 8, seed=2).cpu()
        return lambda: _aqlm(mod, x)
    held = HeldCalls()
    _x0, cb, scb, bias = (t.cpu() for t in random_int8(1, 32, 2048, seed=0, threshold=6.0))
    return lambda: TI.matmul_int8_outlier(x, cb, scb, 6.0, bias, held=held)


@pytest.mark.parametrize("case,work", [("grouped-int", []), ("nf4", []), ("aqlm", ["mm"]), ("int8", [])])
def test_a_held_call_only_allocates(monkeypatch, case, work):
    """A held repeat dispatches no PyTorch work but views and allocations (and AQLM's table of
    codeword products, one matmul), and calls no wrapper's ``launch``."""
    module = {"grouped-int": TG, "nf4": TB, "aqlm": TC, "int8": TI}[case]
    _kernels, log, launches = _record_wrapper(monkeypatch, module)
    call = _held_repeat(case)
    call()
    launches.clear()
    held_before = len(log)
    with _Ops() as seen:
        y = call()
    assert launches == [] and all(kind == "held" for kind, *_ in log[held_before:]) and len(log) > held_before
    assert [name for name in seen.names if name not in BOOKKEEPING] == work
    assert y.dtype == torch.float16


# --- through the modules ------------------------------------------------------------------------


def _module(case):
    """(module, its wrapper's kernel module) for one format, on CPU."""
    if case == "grouped-int":
        return random_module(256, 2048, 4, 128, False), TG
    if case == "nf4":
        return random_nf4(256, 2048, 64, "nf4", True, seed=0).cpu(), TB
    if case == "aqlm":
        return random_aqlm(32, 2048, 8, 2, 8, seed=2).cpu(), TC
    from lowbit.formats.int8_outlier import Int8Linear

    return Int8Linear.from_linear(torch.randn(32, 2048, generator=torch.Generator().manual_seed(3)).half(), None), TI


@pytest.mark.parametrize("case", ["grouped-int", "nf4", "aqlm", "int8"])
def test_a_module_forward_holds_its_calls(monkeypatch, case):
    """A quantized module's eager forward on its Triton path (made available on CPU tensors, kernels
    recorded) hands the wrapper what it holds calls in: the second forward launches nothing through
    the wrapper; with a gradient to record, it goes through the op and holds nothing."""
    import dataclasses

    import lowbit.kernels as K

    mod, module = _module(case)
    _kernels, log, launches = _record_wrapper(monkeypatch, module)
    fmt = type(mod).format
    monkeypatch.setitem(K._KERNELS, fmt, [dataclasses.replace(i, available=K.always, supports=lambda m, x: True)
                                          if i.name == "triton" else i for i in K._KERNELS[fmt]])
    monkeypatch.setattr(K, "_AVAILABLE", {})
    held = mod.group_ordered().held_calls if case == "grouped-int" else mod.held_calls
    x = torch.randn(1, 1, 2048, generator=torch.Generator().manual_seed(1)).half()
    with torch.no_grad():
        assert K.select_kernel(mod, x).name == "triton"
        mod(x)
        first = len(launches)
        y = mod(x)
    assert first > 0 and len(launches) == first and len(held) == 1 and log[-1][0] == "held"
    assert y.shape == (1, 1, mod.out_features)
    held.clear()
    for _ in range(2):
        mod(x.clone().requires_grad_(True))
    assert len(launches) == 3 * first and len(held) == 0
