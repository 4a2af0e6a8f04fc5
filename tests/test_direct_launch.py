"""Held launches without Triton's runner (``lowbit.kernels.direct_launch``): the same arguments
reach the C ``launch`` function as through Triton's own runner, but for the launch metadata and the
hooks, whether the direct launch calls the C function or the launcher; a launch hook, or the switch
off, takes Triton's runner; versions and launchers it does not know are left to Triton.

The compiled kernel here is the installed Triton's ``CompiledKernel`` and ``CudaLauncher`` (or
``HIPLauncher``) code with the handles stood in for and the C ``launch`` function replaced by a
recorder, so this runs without a GPU. The comparison with Triton's runner needs a Triton whose
runner :func:`direct_runner` stands in for (3.5 to 3.9; each was run); with another only the
refusals are checked. Real kernels go through it in the GPU tests of ``tests/test_launch_cache.py`` and
``tests/test_held_calls*.py``."""

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
    """A ``CompiledKernel`` whose launcher (the installed Triton's ``CudaLauncher.__call__``, or
    ``HIPLauncher.__call__``) records the C ``launch`` function's arguments in ``calls``, with the
    active driver stood in for. Any other class name gets ``CudaLauncher.__call__``."""
    from triton.backends.amd.driver import HIPLauncher
    from triton.backends.nvidia.driver import CudaLauncher
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver

    monkeypatch.setattr(driver, "_active", _Driver())
    call = (HIPLauncher if launcher_class == "HIPLauncher" else CudaLauncher).__call__
    launcher = type(launcher_class, (), {"__call__": call})()
    launcher.launch = lambda *args: calls.append(args)
    launcher.global_scratch_size, launcher.profile_scratch_size = global_scratch, 0
    launcher.global_scratch_align = launcher.profile_scratch_align = 1
    launcher.num_ctas, launcher.launch_cooperative_grid, launcher.launch_pdl = 1, False, True
    launcher.gsan_enabled = False  # 3.8, 3.9
    launcher.arg_annotations, launcher.kernel_signature = ("annotations",), b"signature"  # 3.7 to 3.9
    launcher.warp_size = 64  # AMD's, 3.7 to 3.9
    stand_in = type("StandInCompiledKernel", (CompiledKernel,), {"__del__": lambda self: None})  # unloads nothing
    compiled = object.__new__(stand_in)
    compiled.module, compiled.function, compiled.packed_metadata = object(), FUNCTION, PACKED  # handles loaded
    compiled._run = launcher
    compiled.name, compiled.metadata = "stand_in_kernel", None
    compiled.src = types.SimpleNamespace(fn=types.SimpleNamespace(launch_metadata=None, arg_names=()))
    return compiled


def _hooks_at(call: tuple) -> list[int]:
    """Where the C function got the hook chains (Triton's runner passes them; a direct launch None)."""
    from triton import knobs

    return [i for i, a in enumerate(call) if a is knobs.runtime.launch_enter_hook or a is knobs.runtime.launch_exit_hook]


def _same_but_hooks(via_triton: tuple, direct: tuple) -> None:
    """The C function's arguments through Triton's runner and directly: the same objects but in
    three places (the launch metadata and the two hook chains), which the direct launch leaves None,
    and the hook chains empty."""
    assert len(direct) == len(via_triton)
    differ = [i for i, (a, b) in enumerate(zip(via_triton, direct, strict=True))
              if not (a is b or (type(a) is type(b) and a == b and not isinstance(a, tuple))
                      or (isinstance(a, tuple) and len(a) == len(b) and all(x is y for x, y in zip(a, b))))]
    hooks = _hooks_at(via_triton)
    assert len(hooks) == 2 and not via_triton[hooks[0]].calls and not via_triton[hooks[1]].calls
    assert len(differ) == 3 and set(hooks) < set(differ)  # the hooks and the launch metadata
    assert all(direct[i] is None for i in differ)


def _args() -> tuple:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(3, generator=gen), torch.randn(5, generator=gen), 4096, 11008, 0.5, True, 128)


LAUNCHERS = {  # launcher class, global scratch: whether the direct launch calls the C function itself
    "cuda": ("CudaLauncher", 0, True),
    "cuda-with-scratch": ("CudaLauncher", 256, False),
    "amd": ("HIPLauncher", 0, False),
}


@pytest.mark.skipif(not KNOWN, reason=f"Triton {triton.__version__}'s runner is not one direct_runner stands in for")
@pytest.mark.parametrize("case", list(LAUNCHERS))
def test_direct_launch_passes_what_tritons_runner_passes(monkeypatch, case):
    """The C function gets, from the runner and from the direct launch, the same grid, stream,
    function, flags, metadata, scratch and arguments (the very objects), but for the launch
    metadata and both hooks (empty), which the direct launch leaves None. A CUDA kernel without
    scratch skips the launcher too; with scratch, and on AMD, the launcher's own call runs."""
    launcher_class, scratch, skips_launcher = LAUNCHERS[case]
    calls = []
    compiled = _compiled(monkeypatch, calls, global_scratch=scratch, launcher_class=launcher_class)
    if scratch:  # Triton's allocator would need a GPU: stand in for it (the same buffer both ways)
        from triton.runtime import _allocation

        buffer = object()
        monkeypatch.setattr(_allocation, "_allocator", types.SimpleNamespace(get=lambda: lambda *a: buffer))
    runner = compiled[GRID]
    launch = D.direct_runner(compiled, GRID, runner)
    assert launch is not None
    args = _args()
    runner(*args)
    entered = []
    compiled.run.__class__.__call__ = lambda *a, _call=type(compiled.run).__call__: entered.append(1) or _call(*a)
    launch(*args)
    via_triton, direct = calls
    _same_but_hooks(via_triton, direct)
    assert bool(entered) != skips_launcher
    ints = [a for a in direct if type(a) is int]
    assert _Driver.STREAM in ints and FUNCTION in ints and any(a is PACKED for a in direct)
    last = direct[-1]
    given = last if isinstance(last, tuple) and len(last) == len(args) else direct[-len(args):]  # 3.7+: one tuple
    assert all(a is b for a, b in zip(given, args, strict=True))


@pytest.mark.skipif(not KNOWN, reason=f"Triton {triton.__version__}'s runner is not one direct_runner stands in for")
def test_a_launch_hook_or_the_switch_off_takes_tritons_runner(monkeypatch):
    from triton import knobs

    calls = []
    compiled = _compiled(monkeypatch, calls)
    launch = D.direct_runner(compiled, GRID, compiled[GRID])
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        launch(*_args())
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    assert len(_hooks_at(calls[-1])) == 2  # Triton's runner, which hands the hooks on
    launch(*_args())
    assert _hooks_at(calls[-1]) == []  # hooks gone: direct again
    monkeypatch.setattr(D, "DIRECT_LAUNCH", False)
    launch(*_args())
    assert len(_hooks_at(calls[-1])) == 2


@pytest.mark.parametrize("case", ["older-version", "newer-version", "other-launcher"])
def test_versions_and_launchers_it_does_not_know_are_left_to_triton(monkeypatch, case):
    """A Triton version whose runner it does not stand in for, or a launcher class it does not
    know: no direct launch, and the held launch is Triton's runner."""
    calls = []
    compiled = _compiled(monkeypatch, calls, launcher_class="XPULauncher" if case == "other-launcher" else "CudaLauncher")
    version = {"older-version": (3, 4), "newer-version": (3, 10)}.get(case, D.VERSIONS[-1])
    monkeypatch.setattr(D, "triton_version", lambda: version)
    assert D.direct_runner(compiled, GRID, compiled[GRID]) is None
    assert C.held_runner(compiled, GRID).__qualname__.startswith("CompiledKernel.__getitem__")  # Triton's runner


@pytest.mark.parametrize("case", ["scratch", "sanitizer", "amd"])
def test_the_launcher_runs_where_the_c_arguments_are_not_known(monkeypatch, case):
    """Scratch, 3.8/3.9's sanitizer or AMD's launcher: the direct launch calls the launcher (which
    allocates and passes what those need), not the C function."""
    calls = []
    compiled = _compiled(monkeypatch, calls, global_scratch=256 if case == "scratch" else 0,
                         launcher_class="HIPLauncher" if case == "amd" else "CudaLauncher")
    compiled.run.gsan_enabled = case == "sanitizer"
    monkeypatch.setattr(D, "triton_version", lambda: D.VERSIONS[-1])
    entered = []
    compiled.run.__class__.__call__ = lambda *a: entered.append(a[1:])
    D.direct_runner(compiled, GRID, compiled[GRID])(*_args())
    assert entered and entered[0][:9] == (*GRID, _Driver.STREAM, FUNCTION, PACKED, None, None, None) and not calls


@pytest.mark.skipif(not KNOWN, reason=f"Triton {triton.__version__}'s runner is not one direct_runner stands in for")
def test_held_runner_takes_the_direct_launch(monkeypatch):
    calls = []
    compiled = _compiled(monkeypatch, calls)
    held = C.held_runner(compiled, GRID[:2])  # a 2-D grid, padded to 3
    assert held.__qualname__.startswith("direct_runner.")
    held(*_args())
    assert calls[-1][:4] == (*GRID, _Driver.STREAM) and _hooks_at(calls[-1]) == []
