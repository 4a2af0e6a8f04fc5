"""Held launches through Triton's C launcher (``lowbit.kernels.direct_launch``): the same arguments
reach the C ``launch`` function as through Triton's own runner, but for the launch metadata and the
hooks; a launch hook, or the switch off, takes Triton's runner; launchers it was not written
against are left to Triton.

The compiled kernel here is Triton's ``CompiledKernel`` with its handles stood in for and its
``CudaLauncher``'s C function replaced by a recorder, so this runs without a GPU. The comparison
with Triton's runner needs a Triton whose launcher :func:`direct_runner` calls (3.5 or 3.6, the
GPU machine's); with another Triton only the refusals are checked. Real kernels go through it in
the GPU tests of ``tests/test_launch_cache.py`` and ``tests/test_held_calls.py``."""

from __future__ import annotations

import types

import pytest
import torch

triton = pytest.importorskip("triton")
D = pytest.importorskip("lowbit.kernels.direct_launch")
C = pytest.importorskip("lowbit.kernels.triton_common")

KNOWN = D.triton_version() in D.VERSIONS
GRID = (64, 16, 1)
PACKED = (4, 1, 0)  # the kernel's metadata as the launcher takes it: warps, CTAs, shared memory
FUNCTION = 0x7F00


class _Driver:
    """The active driver's two calls a launch makes: device 0 and a stream of its own."""

    STREAM = 0x5A

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        assert device == 0
        return self.STREAM


def _compiled(monkeypatch, calls: list, global_scratch: int = 0, launcher_class: str = "CudaLauncher"):
    """A ``CompiledKernel`` whose launcher records the C ``launch`` function's arguments in
    ``calls``, with the active driver stood in for."""
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver

    monkeypatch.setattr(driver, "_active", _Driver())
    launcher_type = type(launcher_class, (), {"__call__": _cuda_launcher_call})
    launcher = launcher_type()
    launcher.launch = lambda *args: calls.append(args)
    launcher.global_scratch_size, launcher.profile_scratch_size = global_scratch, 0
    launcher.global_scratch_align = launcher.profile_scratch_align = 1
    launcher.num_ctas, launcher.launch_cooperative_grid, launcher.launch_pdl = 1, False, True
    compiled = object.__new__(CompiledKernel)
    compiled.module, compiled.function, compiled.packed_metadata = object(), FUNCTION, PACKED  # handles loaded
    compiled._run = launcher
    compiled.name, compiled.metadata = "stand_in_kernel", None
    compiled.src = types.SimpleNamespace(fn=types.SimpleNamespace(launch_metadata=None, arg_names=()))
    return compiled


def _cuda_launcher_call(self, gridX, gridY, gridZ, stream, function, *args):
    """Triton 3.5/3.6's ``CudaLauncher.__call__`` for a kernel without scratch: the C ``launch``
    with the cooperative and PDL flags and no global or profile scratch, then the rest as given."""
    self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl,
                None, None, *args)


def _args() -> tuple:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(3, generator=gen), torch.randn(5, generator=gen), 4096, 11008, 0.5, True, 128)


@pytest.mark.skipif(not KNOWN, reason=f"Triton {triton.__version__}'s launcher is not one direct_runner calls")
def test_direct_launch_passes_what_tritons_runner_passes(monkeypatch):
    """The C function gets the runner's grid, stream, function, flags, metadata and arguments (the
    very objects), and None for the launch metadata and both hooks, which hold nothing."""
    calls = []
    compiled = _compiled(monkeypatch, calls)
    compiled._run.__class__.__call__ = _installed_launcher_call()
    runner = compiled[GRID]
    launch = D.direct_runner(compiled, GRID, runner)
    assert launch is not None
    args = _args()
    runner(*args)
    launch(*args)
    via_triton, direct = calls
    assert len(direct) == len(via_triton) == 13 + len(args)
    assert direct[:10] == (*GRID, _Driver.STREAM, FUNCTION, False, True, None, None) + (PACKED,)
    assert via_triton[:10] == direct[:10]
    assert all(a is b for a, b in zip(via_triton[13:], direct[13:], strict=True))
    assert direct[10:13] == (None, None, None)
    hooks = via_triton[11:13]  # what Triton passes: the hook chains, empty here
    assert not hooks[0].calls and not hooks[1].calls


def _installed_launcher_call():
    """The installed Triton's own ``CudaLauncher.__call__`` (3.5/3.6), so that the runner's
    arguments go through Triton's code, not this test's copy of it."""
    from triton.backends.nvidia.driver import CudaLauncher

    return CudaLauncher.__call__


@pytest.mark.skipif(not KNOWN, reason=f"Triton {triton.__version__}'s launcher is not one direct_runner calls")
def test_a_launch_hook_or_the_switch_off_takes_tritons_runner(monkeypatch):
    from triton import knobs

    calls = []
    compiled = _compiled(monkeypatch, calls)
    compiled._run.__class__.__call__ = _installed_launcher_call()
    launch = D.direct_runner(compiled, GRID, compiled[GRID])
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        launch(*_args())
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    assert calls[-1][11] is knobs.runtime.launch_enter_hook  # Triton's runner, which hands the hook on
    launch(*_args())
    assert calls[-1][11] is None  # hooks gone: direct again
    monkeypatch.setattr(D, "DIRECT_LAUNCH", False)
    launch(*_args())
    assert calls[-1][11] is knobs.runtime.launch_enter_hook


@pytest.mark.parametrize("case", ["other-version", "scratch", "other-launcher"])
def test_launchers_it_was_not_written_for_are_left_to_triton(monkeypatch, case):
    """Another Triton version, a kernel with global scratch or a launcher that is not CUDA's
    ``CudaLauncher`` (AMD's ``HIPLauncher``): no direct launch, and the held launch is Triton's runner."""
    calls = []
    compiled = _compiled(monkeypatch, calls, global_scratch=256 if case == "scratch" else 0,
                         launcher_class="HIPLauncher" if case == "other-launcher" else "CudaLauncher")
    monkeypatch.setattr(D, "triton_version", lambda: (3, 9) if case == "other-version" else D.VERSIONS[-1])
    runner = compiled[GRID]
    assert D.direct_runner(compiled, GRID, runner) is None


def test_held_runner_takes_the_direct_launch_where_there_is_one(monkeypatch):
    calls = []
    compiled = _compiled(monkeypatch, calls)
    monkeypatch.setattr(D, "triton_version", lambda: D.VERSIONS[-1])
    held = C.held_runner(compiled, GRID[:2])  # a 2-D grid, padded to 3
    held(*_args())
    assert calls[-1][:4] == (*GRID, _Driver.STREAM) and calls[-1][11] is None
    monkeypatch.setattr(D, "triton_version", lambda: (3, 9))
    held = C.held_runner(compiled, GRID[:2])
    assert getattr(held, "__qualname__", "").startswith("CompiledKernel.__getitem__")  # Triton's runner
