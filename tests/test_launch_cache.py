"""The held launches of ``triton_common.launch`` (``LOWBIT_LAUNCH_CACHE=1``): which calls reuse a
compiled kernel, checked on a stand-in kernel on CPU; real kernels on a GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import MATMUL_REL, rel_err

C = pytest.importorskip("lowbit.kernels.triton_common")


def _stand_in_fn(x_ptr, n, scale, BLOCK=8):
    """The signature the stand-in kernel declares (its body never runs)."""


class StandInKernel:
    """Records Triton-style launches: ``kernel[grid](*args, **kwargs)`` logs a launch through
    Triton and returns a compiled kernel whose ``[grid](*every)`` logs a held launch."""

    arg_names = ["x_ptr", "n", "scale", "BLOCK"]
    fn = staticmethod(_stand_in_fn)

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("run", grid, args, kwargs))
            return _Compiled(self.log)

        return run


class _Compiled:
    def __init__(self, log: list) -> None:
        self.log = log

    def __getitem__(self, grid):
        return lambda *every: self.log.append(("held", grid, every))


@pytest.fixture
def cache_on(monkeypatch):
    monkeypatch.setattr(C, "LAUNCH_CACHE", True)
    monkeypatch.setattr(C, "INTERPRET", False)
    monkeypatch.setattr(C, "_HELD", {})




def test_other_tensors_of_the_same_kind_reuse_the_compiled_kernel(cache_on):
    k = StandInKernel()
    x = torch.zeros(64)
    C.launch(k, (4,), x, 32, 0.5, BLOCK=16, num_warps=4)
    y = torch.ones(64)  # another tensor: same dtype, device and alignment
    C.launch(k, (4,), y, 32, 0.5, BLOCK=16, num_warps=4)
    assert [e[0] for e in k.log] == ["run", "held"]
    assert k.log[1][1] == (4, 1, 1) and k.log[1][2] == (y, 32, 0.5, 16)  # every parameter, in order


def test_default_constexpr_is_passed_to_the_held_launch(cache_on):
    k = StandInKernel()
    x = torch.zeros(64)
    C.launch(k, (2, 3), x, 32, 0.5)
    C.launch(k, (2, 3), x, 32, 0.5)
    assert k.log[1] == ("held", (2, 3, 1), (x, 32, 0.5, 8))


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int", "float", "constexpr", "option", "grid"])
def test_what_triton_specializes_on_is_a_new_key(cache_on, change):
    """A tensor's dtype or alignment, any other value (ints by value: finer than Triton's own
    specialization), a constexpr, a launch option or the grid: launched through Triton again."""
    k = StandInKernel()
    x = torch.zeros(64)
    C.launch(k, (4,), x, 32, 0.5, BLOCK=16, num_warps=4)
    args, kw, grid = [x, 32, 0.5], dict(BLOCK=16, num_warps=4), (4,)
    if change == "misaligned":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = x.half()
    elif change == "int":
        args[1] = 48
    elif change == "float":
        args[2] = 0.25
    elif change == "constexpr":
        kw["BLOCK"] = 32
    elif change == "option":
        kw["num_warps"] = 8
    else:
        grid = (5,)
    C.launch(k, grid, *args, **kw)
    C.launch(k, grid, *args, **kw)
    assert [e[0] for e in k.log] == ["run", "run", "held"]


def test_held_launches_are_bounded(cache_on, monkeypatch):
    monkeypatch.setattr(C._HeldLaunches, "MAX_KEYS", 3)
    k = StandInKernel()
    x = torch.zeros(64)
    for n in range(5):
        C.launch(k, (4,), x, n, 0.5)
    assert len(C._HELD[id(k)].runners) == 2  # dropped at the fourth key, then two added


def test_off_or_interpreted_goes_through_triton_every_time(monkeypatch):
    monkeypatch.setattr(C, "_HELD", {})
    for on, interpret in ((False, False), (True, True)):
        monkeypatch.setattr(C, "LAUNCH_CACHE", on)
        monkeypatch.setattr(C, "INTERPRET", interpret)
        k = StandInKernel()
        x = torch.zeros(64)
        C.launch(k, (4,), x, 32, 0.5)
        C.launch(k, (4,), x, 32, 0.5)
        assert [e[0] for e in k.log] == ["run", "run"]
    assert C._HELD == {}


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_held_launches_give_the_reference_on_gpu(monkeypatch, fmt):
    """Real kernels through the held launch: fresh inputs each call (the second call of a shape is
    held), a misaligned view (a new key), all against the reference."""
    from lowbit.formats.blockwise4 import quantize_4bit
    from lowbit.formats.int8_outlier import quantize_rows
    from lowbit.kernels import reference

    monkeypatch.setattr(C, "LAUNCH_CACHE", True)
    monkeypatch.setattr(C, "_HELD", {})
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=gen).half()
    if fmt == "int8":
        from lowbit.kernels import triton_int8 as T

        cb, scb = (t.cuda() for t in quantize_rows(w))
        ours = lambda x: T.matmul_int8_outlier(x, cb, scb, 6.0)  # noqa: E731
        want = lambda x: reference.matmul_int8_outlier(x.float(), cb, scb, 6.0)  # noqa: E731
    else:
        from lowbit.kernels import triton_blockwise4 as T

        q = quantize_4bit(w, "nf4", 64, True)
        args = [t.cuda() if t is not None else None for t in (q.weight, q.absmax, q.quant_map)]
        nested = [t.cuda() for t in (q.nested_absmax, q.nested_quant_map, q.nested_offset)]
        ours = lambda x: T.matmul_blockwise4(x, *args, 64, (256, 512), *nested)  # noqa: E731
        want = lambda x: reference.matmul_blockwise4(x.float(), *args, 64, (256, 512), *nested)  # noqa: E731
    for rows in (1, 1, 1, 16, 16):
        x = torch.randn(rows, 513, generator=gen).half().cuda()
        for view in (x[:, :512], x[:, 1:]):  # 16-byte aligned, then 2 bytes past it
            assert rel_err(ours(view), want(view)) <= MATMUL_REL[torch.float16]
    assert any(held.runners for held in C._HELD.values())
    from lowbit.kernels import direct_launch as D

    if D.triton_version() in D.VERSIONS:  # each held launch skips Triton's runner
        runners = [runner for held in C._HELD.values() for runner, _tail in held.runners.values()]
        assert all(r.__qualname__.startswith("direct_runner.") for r in runners) and D.DIRECT_LAUNCH
