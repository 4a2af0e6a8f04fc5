"""Held eager calls (``lowbit.kernels.held``): each format's wrapper repeats the launches of an
earlier call with the same input layout, allocating its output (and LLM.int8's statistics) and
nothing else. Checked on CPU with stand-ins for the kernels that record their launches; with real
kernels on a GPU. Here the grouped-int and NF4 wrappers and the recording helpers; AQLM, LLM.int8
and the module forwards of every format in ``test_held_calls_launches.py``."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from conftest import MATMUL_REL, rel_err
from lowbit.kernels import reference
from lowbit.kernels.held import HeldCalls
from test_eager_work import TA, TB, TC, TG, TI, TL, C
from test_group_order import random_module
from test_launch_cache import StandInKernel
from test_triton_blockwise4 import args as nf4_args
from test_triton_blockwise4 import random_module as random_nf4


class Recorder(StandInKernel):
    """Stands in for one of a wrapper's kernels, with its parameters: logs each launch through
    Triton, and each held launch with every argument (``("held", grid, every)``)."""

    def __init__(self, kernel, log: list) -> None:
        self.arg_names, self.fn, self.log = kernel.arg_names, kernel.fn, log


def _record(monkeypatch, module, names: tuple[str, ...], others: tuple = ()) -> tuple[dict, list, list]:
    """The launch cache on (outside the interpreter), ``module``'s kernels ``names`` (and those of
    each ``(module, names)`` of ``others``) recorded into one log in launch order, and a count of
    the wrappers' calls to ``launch`` (a held call makes none): ``(recorders by name, the log, the
    count)``."""
    monkeypatch.setattr(C, "LAUNCH_CACHE", True)
    monkeypatch.setattr(C, "INTERPRET", False)
    monkeypatch.setattr(C, "_HELD", {})
    log, launches = [], []

    def counted(*args, **kwargs):
        launches.append(1)
        return C.launch(*args, **kwargs)

    kernels = {}
    for mod, of_mod in ((module, names), *others):
        for name in of_mod:
            kernels[name] = Recorder(getattr(mod, name), log)
            monkeypatch.setattr(mod, name, kernels[name])
        monkeypatch.setattr(mod, "launch", counted)
    return kernels, log, launches


TABULATED = ((TL, ("_lut_gemv_kernel", "_lut_slice_kernel", "_lut_products_kernel")),)
"""AQLM's tabulated path's kernels, for :func:`_record`'s ``others``."""

INT8_STATISTICS = ((TA, ("_stats_kernel",)),)
"""LLM.int8's statistics kernel, for :func:`_record`'s ``others``."""


def _record_wrapper(monkeypatch, module) -> tuple[dict, list, list]:
    """:func:`_record` for every kernel a format's wrapper in ``module`` launches (AQLM's tabulated
    path's kernels and LLM.int8's statistics kernel too)."""
    names = tuple(name for name in ("_matmul_kernel", "_gemv_kernel") if hasattr(module, name))
    return _record(monkeypatch, module, names, {TC: TABULATED, TI: INT8_STATISTICS}.get(module, ()))


@pytest.fixture
def recorded(monkeypatch):
    kernels, _log, launches = _record(monkeypatch, TG, ("_matmul_kernel",))
    return kernels["_matmul_kernel"], launches


def _layout(act_order=False):
    return random_module(256, 512, 4, 128, act_order).group_ordered()


def _x(rows=1, seed=0, dtype=torch.float16):
    return torch.randn(1, rows, 512, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
def test_second_call_repeats_the_launch_with_new_rows_and_output(recorded, act_order):
    kernel, launches = recorded
    w = _layout(act_order)
    TG.matmul_group_ordered(_x(seed=0), w)
    x = _x(seed=1)
    y = TG.matmul_group_ordered(x, w)
    assert len(launches) == 1 and len(w.held_calls) == 1
    held = kernel.log[-1]
    TG.matmul_group_ordered(x, w, hold=False)  # the same call through launch's own held kernel
    assert len(launches) == 2
    want = kernel.log[-1]
    assert held[0] == want[0] == "held" and len(held[2]) == len(want[2])
    for i, (a, b) in enumerate(zip(held[2], want[2], strict=True)):
        if i == 0:  # the rows of x
            assert a.data_ptr() == b.data_ptr() == x.data_ptr() and a.shape == b.shape == (1, 512)
        elif i == 6:  # the output: a new tensor each call, in the output's shape
            assert a is y and a.dtype == b.dtype and a.numel() == b.numel()
        elif isinstance(a, torch.Tensor):
            assert a is b
        else:
            assert a == b
    assert y.shape == (1, 1, 256) and y.dtype == torch.float16 and y.is_contiguous()


def _changes():
    """(name, call after a first ``matmul_group_ordered(_x(), w)``): each is a new key, or not held."""
    return {
        "rows": lambda w: TG.matmul_group_ordered(_x(rows=2), w),
        "dtype": lambda w: TG.matmul_group_ordered(_x(dtype=torch.bfloat16), w),
        "misaligned": lambda w: TG.matmul_group_ordered(torch.randn(513).half()[1:].reshape(1, 1, 512), w),
        "strides": lambda w: TG.matmul_group_ordered(torch.randn(1, 512, 2).half()[..., 0].unsqueeze(0), w),
        "bias": lambda w: TG.matmul_group_ordered(_x(), w, torch.randn(256).half()),
    }


@pytest.mark.parametrize("change", list(_changes()))
def test_a_new_input_layout_or_bias_goes_through_the_wrapper(recorded, change):
    _kernel, launches = recorded
    w = _layout()
    TG.matmul_group_ordered(_x(), w)
    call = _changes()[change]
    call(w)
    assert len(launches) == 2
    if change != "bias":  # a new bias is a new tensor each call here
        call(w)
        assert len(launches) == 2  # and then held


@pytest.mark.parametrize("switch,value", [("ACT_ORDER_GEMV_TILE", (64, 2)), ("GATHER_MAX_ROWS", 4),
                                          ("DOT_SWAP", True)])
def test_a_switch_changed_is_a_new_key(recorded, monkeypatch, switch, value):
    _kernel, launches = recorded
    w = _layout(act_order=True)
    TG.matmul_group_ordered(_x(), w)
    monkeypatch.setattr(TG, switch, value)
    TG.matmul_group_ordered(_x(), w)
    assert len(launches) == 2 and len(w.held_calls) == 2


@pytest.mark.parametrize("case", ["16-rows", "act-order-permuted-rows", "cfg", "hold-false", "cache-off"])
def test_what_is_never_held(recorded, monkeypatch, case):
    """16 rows or more, act-order rows permuted before the kernel (an ``index_select`` each call),
    a launch configuration or ``hold=False`` given, or the launch cache off: every call launches
    through the wrapper."""
    _kernel, launches = recorded
    w = _layout(act_order=case == "act-order-permuted-rows")
    x = _x(rows={"16-rows": 16, "act-order-permuted-rows": 2}.get(case, 1))
    kwargs = {"cfg": {"cfg": C.MatmulConfig(1, 64, 128, 4, 2, 3)}, "hold-false": {"hold": False}}.get(case, {})
    if case == "cache-off":
        monkeypatch.setattr(C, "LAUNCH_CACHE", False)
    for _ in range(2):
        TG.matmul_group_ordered(x, w, **kwargs)
    assert len(launches) == 2 and w.held_calls == {}


def test_held_calls_are_bounded(recorded, monkeypatch):
    monkeypatch.setattr(HeldCalls, "MAX", 3)
    w = _layout()
    for rows in range(1, 6):
        TG.matmul_group_ordered(_x(rows=rows), w)
    assert len(w.held_calls) == 2  # dropped at the fourth key, then two added


def test_a_rebuilt_layout_holds_nothing(recorded):
    """The module's layout is rebuilt when a buffer is replaced, and the held calls go with it."""
    mod = random_module(256, 512, 4, 128, False)
    TG.matmul_group_ordered(_x(), mod.group_ordered())
    assert mod.group_ordered().held_calls
    mod.scales = mod.scales.clone()
    assert mod.group_ordered().held_calls == {}


def test_a_copy_holds_nothing(recorded):
    layout = _layout()
    TG.matmul_group_ordered(_x(), layout)
    assert layout.held_calls and copy.deepcopy(layout).held_calls == {}
    assert pickle.loads(pickle.dumps(layout.held_calls)) == {}


# --- NF4 ----------------------------------------------------------------------------------------


@pytest.fixture
def recorded_nf4(monkeypatch):
    kernels, _log, launches = _record(monkeypatch, TB, ("_gemv_kernel", "_matmul_kernel"))
    return kernels, launches


def _x2k(rows=1, seed=0):
    return torch.randn(1, rows, 2048, generator=torch.Generator().manual_seed(seed)).half()


def _nf4(mod, x, **kwargs):
    return TB.matmul_blockwise4(x, *nf4_args(mod), bias=mod.bias, compute_dtype=mod.compute_dtype,
                                held=mod.held_calls, **kwargs)


@pytest.mark.parametrize("rows,kernel", [(1, "_gemv_kernel"), (3, "_matmul_kernel")])
def test_nf4_second_call_repeats_the_launch(recorded_nf4, rows, kernel):
    kernels, launches = recorded_nf4
    mod = random_nf4(256, 2048, 64, "nf4", True, seed=0).cpu()  # stand-in kernels: CPU tensors
    _nf4(mod, _x2k(rows, seed=0))
    x = _x2k(rows, seed=1)
    y = _nf4(mod, x)
    assert len(launches) == 1 and len(mod.held_calls) == 1
    held = kernels[kernel].log[-1]
    TB.matmul_blockwise4(x, *nf4_args(mod), bias=mod.bias)  # nothing held: through launch's held kernel
    want = kernels[kernel].log[-1]
    assert held[0] == want[0] == "held"
    for i, (a, b) in enumerate(zip(held[2], want[2], strict=True)):
        if i == 0:
            assert a.data_ptr() == b.data_ptr() == x.data_ptr()
        elif i == 8:  # the output
            assert a is y and a.dtype == b.dtype and a.numel() == b.numel()
        elif isinstance(a, torch.Tensor):
            assert a.data_ptr() == b.data_ptr() and a.dtype == b.dtype  # the same buffers (views made per call)
        else:
            assert a == b
    assert y.shape == (1, rows, 256)
    assert held[2][9] is not held[2][8]  # split K: the partials are not the output


@pytest.mark.parametrize("change", ["replaced", "new-data", "bias", "compute-dtype", "lookup-switch", "warps-switch"])
def test_nf4_a_changed_buffer_or_switch_goes_through_the_wrapper(recorded_nf4, monkeypatch, change):
    """A buffer replaced (every held call is dropped), a weight given new memory with ``.data`` (held
    calls pass a view of it), a new bias, another compute dtype, a changed lookup default or warps."""
    _kernels, launches = recorded_nf4
    mod = random_nf4(256, 2048, 64, "nf4", True, seed=0).cpu()  # stand-in kernels: CPU tensors
    _nf4(mod, _x2k())
    if change == "replaced":
        _nf4(mod, _x2k(rows=3))  # a second held call, made from the old buffer too
        launches.pop()
        mod.absmax = mod.absmax.clone()
    elif change == "new-data":
        mod.weight.data = mod.weight.clone()
    elif change == "bias":
        mod.bias = torch.randn(256)
    elif change == "compute-dtype":
        mod.compute_dtype = torch.bfloat16
    elif change == "warps-switch":
        monkeypatch.setattr(TB, "GEMV_WARPS", 8)
    else:
        monkeypatch.setitem(TB.DEFAULT_LOOKUP, "gemv", "global")
    _nf4(mod, _x2k())
    assert len(launches) == 2
    _nf4(mod, _x2k())
    kept = 2 if change in ("compute-dtype", "lookup-switch", "warps-switch") else 1
    assert len(launches) == 2 and len(mod.held_calls) == kept


def test_nf4_moved_module_holds_nothing(recorded_nf4):
    mod = random_nf4(256, 2048, 64, "nf4", True, seed=0).cpu()  # stand-in kernels: CPU tensors
    _nf4(mod, _x2k())
    assert mod.held_calls
    mod.to(torch.float32)  # _apply: new buffers
    assert mod.held_calls == {}
    assert copy.deepcopy(mod).held_calls == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
def test_held_calls_give_the_reference_on_gpu(monkeypatch, act_order):
    """A module's eager forward with real kernels: fresh inputs each call (the second call of a layout
    is held), with a bias and without, a misaligned view (a new key), all against the reference; a
    side stream holds nothing."""
    monkeypatch.setattr(C, "LAUNCH_CACHE", True)
    mod = random_module(256, 512, 4, 128, act_order).cuda()
    gen = torch.Generator().manual_seed(0)
    bias = torch.randn(256, generator=gen).half().cuda()
    for rows, with_bias in ((1, False), (1, False), (1, False), (3, True), (3, True), (3, False)):
        mod.bias = bias if with_bias else None
        x = torch.randn(1, rows, 513, generator=gen).half().cuda()
        for view in (x[..., :512], x[..., 1:]):  # 16-byte aligned, then 2 bytes past it
            want = reference.matmul_int_grouped(view.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx,
                                                mod.bits, mod.bias)
            with torch.no_grad():
                assert rel_err(mod(view), want) <= MATMUL_REL[torch.float16]
    w = mod.group_ordered()
    assert w.held_calls
    w.held_calls.clear()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), torch.no_grad():
        x = torch.randn(1, 1, 512, generator=gen).half().cuda()
        for _ in range(2):
            y = mod(x)
    side.synchronize()
    assert w.held_calls == {}
    assert rel_err(y, reference.matmul_int_grouped(x.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx,
                                                   mod.bits, mod.bias)) <= MATMUL_REL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16], ids=["fp16", "bf16-compute"])
def test_nf4_held_calls_give_the_reference_on_gpu(monkeypatch, compute_dtype):
    """An NF4 module's eager forward with real kernels: fresh inputs (the second call of a layout is
    held), one token and three rows, a misaligned view, a replaced buffer, against the reference."""
    monkeypatch.setattr(C, "LAUNCH_CACHE", True)
    mod = random_nf4(256, 2048, 64, "nf4", True, seed=0).cuda()
    mod.compute_dtype = compute_dtype
    _eager_calls_match(mod, (1, 1, 1, 3, 3, 1), lambda m: setattr(m, "absmax", m.absmax.clone()),
                       lambda v: reference.matmul_blockwise4(v.float(), *nf4_args(mod), mod.bias),
                       MATMUL_REL[compute_dtype or torch.float16])


def _eager_calls_match(mod, rows: tuple[int, ...], replace, want, tol: float, outlier: bool = False) -> None:
    """``mod``'s eager forward on a fresh fp16 input of each of ``rows`` rows, 16-byte aligned and 2
    bytes past it (a new key), each against ``want(view)`` within ``tol``; ``replace(mod)`` replaces
    a buffer before the last; ``outlier``: inputs under 2 in magnitude but column 9, at 8."""
    k = mod.in_features
    gen = torch.Generator().manual_seed(0)
    for step, r in enumerate(rows):
        if step == len(rows) - 1:
            replace(mod)
        x = torch.randn(1, r, k + 1, generator=gen)
        if outlier:
            x = x.clamp(-1.9, 1.9)
            x[..., 9] = 8.0
        x = x.half().cuda()
        for view in (x[..., :k], x[..., 1:]):
            with torch.no_grad():
                assert rel_err(mod(view), want(view)) <= tol
    assert mod.held_calls
