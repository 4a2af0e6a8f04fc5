"""Per-call CPU cost of an eager call in front of its kernel launches, in two parts.

1. Reaching a Triton wrapper: through the ``torch.ops.lowbit`` custom op, and through the modules'
   entry points (``lowbit/kernels/ops.py``), which skip the op in plain eager. The wrappers are
   replaced by stubs that return an empty tensor of the output's shape.
2. The wrappers themselves (launch configuration, output buffers, the activation statistics of
   LLM.int8), with every Triton kernel replaced by a stub whose launch does nothing, on CPU
   tensors of Llama-7B's 4096 x 4096 shape; and again with ``LAUNCH_CACHE`` on: the held launches
   of ``triton_common.launch`` and, given a weight's held calls as a module gives them, the held
   calls (``lowbit.kernels.held.HeldCall``), which repeat a call after its first. Then each format's
   whole module forward (kernel selection, the entry point, the wrapper) with the same stubs. With
   Triton 3.5 to 3.9, also one held launch through Triton's runner and through lowbit's held runner,
   which skips it (the C function stubbed: :func:`runner_table`).

What is timed is the Python and PyTorch work an eager call adds to a kernel's graph-replay time,
less Triton's own launcher. Runs on any machine; needs Triton importable.

3. With ``--gpu``, on a CUDA or ROCm GPU: the same wrappers with their real kernels, called
   eagerly (CPU µs per call); a launch of an empty Triton kernel (Triton's own floor there); each
   kernel those wrappers launch, through Triton's ``JITFunction.run`` and from the compiled kernel
   that call returned (what a launch cache would save), through Triton's runner and through
   lowbit's held runner (which skips Triton's runner where
   ``lowbit.kernels.direct_launch`` knows it); the wrappers again with lowbit's launch cache
   (``LOWBIT_LAUNCH_CACHE=1``, ``triton_common.launch``), with Triton's runner skipped and
   through it; and a ``cProfile`` of each call's functions, to show where an eager
   call's time goes.

    python bench/dispatch.py
    python bench/dispatch.py --gpu
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import pstats
import time

import torch
import triton
import triton.language as tl

from lowbit.formats.group_order import GroupOrdered
from lowbit.kernels.held import HeldCalls
from lowbit.kernels import (aot_check, direct_launch, ops, triton_blockwise4, triton_codebook, triton_codebook_lut,
                            triton_common, triton_int8, triton_int_grouped)

KERNEL_MODULES = tuple(importlib.import_module(f"lowbit.kernels.{name}")
                       for name in sorted({v.module for v in aot_check.variants()}))
"""Every module that defines Triton kernels: those the compile check compiles kernels of."""


@triton.jit
def _empty_kernel(p_ptr, n, BLOCK: tl.constexpr):
    """Does nothing: its eager launch is Triton's own cost."""


def per_call_us(fn, calls: int = 20000) -> float:
    for _ in range(200):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **options)`` does nothing,
    and returns a compiled kernel whose launches do nothing either (for the launch cache)."""

    def __init__(self, kernel) -> None:
        self.arg_names, self.fn = kernel.arg_names, kernel.fn

    def __getitem__(self, grid):
        return lambda *args, **options: self

    def __call__(self, *every) -> None:
        return None


def runner_table(calls: int = 200000) -> None:
    """Part 2b (a Triton whose launcher ``lowbit.kernels.direct_launch`` calls): one held launch of a
    compiled kernel with a matmul's ten tensor and eight scalar arguments, through Triton's runner
    and through lowbit's held runner. Triton's own ``CompiledKernel`` and ``CudaLauncher`` code
    runs, with the handles stood in for and the C ``launch`` function replaced by a Python one that
    calls the hooks it is given, as the C function does; the driver's device and stream are
    PyTorch's CPU-side calls. So the difference is the Python each way runs around the C launcher."""
    import types

    from triton.backends.nvidia.driver import CudaLauncher
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver

    at = 10 if direct_launch.LAYOUTS[direct_launch.triton_version()] == "arguments" else 8  # the launch metadata

    def c_launch(*given):
        for hook in given[at + 1:at + 3]:  # enter, exit
            if hook is not None:
                hook(given[at])

    class _Driver:
        get_current_device = staticmethod(torch.get_num_threads)  # a C call returning an int, as the CUDA one
        get_current_stream = staticmethod(lambda device: 0)

    launcher = object.__new__(CudaLauncher)
    launcher.launch, launcher.num_ctas, launcher.launch_cooperative_grid, launcher.launch_pdl = c_launch, 1, False, False
    launcher.global_scratch_size = launcher.profile_scratch_size = 0
    launcher.global_scratch_align = launcher.profile_scratch_align = 1
    launcher.gsan_enabled, launcher.arg_annotations, launcher.kernel_signature = False, (), b""
    stand_in = type("StandInCompiledKernel", (CompiledKernel,), {"__del__": lambda self: None})  # unloads nothing
    compiled = object.__new__(stand_in)
    compiled.module, compiled.function, compiled.packed_metadata, compiled._run = object(), 1, (4, 1, 0), launcher
    compiled.name, compiled.metadata = "stand_in", None
    compiled.src = types.SimpleNamespace(fn=types.SimpleNamespace(launch_metadata=None, arg_names=()))
    args = (*(torch.empty(1) for _ in range(10)), 1, 4096, 4096, 4096, 4096, 1, 6.0, True)
    saved, driver._active = driver._active, _Driver()
    try:
        tritons = compiled[(64, 16, 1)]
        held = triton_common.held_runner(compiled, (64, 16))
        print(f"\n| held launch, C launcher stubbed (Triton {triton.__version__}) | µs per launch |")
        print("|---|---|")
        for name, fn in (("Triton's runner", tritons), ("lowbit's held runner (direct)", held)):
            print(f"| {name} | {per_call_us(lambda: fn(*args), calls):.2f} |", flush=True)
    finally:
        driver._active = saved


def wrapper_cases(k: int, n: int, device: str) -> list:
    """(name, call) for each format's matmul wrapper on one fp16 token of a random ``[n, k]`` weight."""
    from lowbit.formats.blockwise4 import Blockwise4Linear
    from lowbit.formats.codebook import pack_codes
    from lowbit.formats.int8_outlier import quantize_rows

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).half()
    x = torch.randn(1, 1, k, generator=gen).half().to(device)
    words = lambda *shape: torch.randint(-2**31, 2**31 - 1, shape, generator=gen, dtype=torch.int32).to(device)
    grouped = GroupOrdered(words(k // 8, n), torch.rand(k // 128, n, generator=gen).half().to(device),
                           words(k // 128, n // 8), None, 4, 128)
    nf4 = Blockwise4Linear.from_linear(w, None, quant_type="nf4", blocksize=64, double_quant=True).to(device)
    nf4_args = (nf4.weight, nf4.absmax, nf4.quant_map, 64, (n, k), nf4.nested_absmax, nf4.nested_quant_map,
                nf4.nested_offset)
    codes = pack_codes(torch.randint(0, 256, (n, k // 8, 2), generator=gen), 8).to(device)
    books = torch.randn(2, 256, 1, 8, generator=gen).half().to(device)
    scales = torch.rand(n, 1, 1, 1, generator=gen).half().to(device)
    cb, scb = (t.to(device) for t in quantize_rows(w))
    aqlm_held, int8_held = HeldCalls(), HeldCalls()  # as the modules hold their one-token launches
    return [("grouped int w4 g128", lambda: triton_int_grouped.matmul_group_ordered(x, grouped)),
            ("nf4 double quant", lambda: triton_blockwise4.matmul_blockwise4(x, *nf4_args, held=nf4.held_calls)),
            ("aqlm 2x8", lambda: triton_codebook.matmul_codebook(x, codes, books, scales, held=aqlm_held)),
            ("LLM.int8 (threshold 6)", lambda: triton_int8.matmul_int8_outlier(x, cb, scb, 6.0, held=int8_held))]


def wrapper_table(k: int, n: int) -> None:
    """Part 2: each format's matmul wrapper for one token, its kernels stubbed."""
    for mod in KERNEL_MODULES:
        for name in dir(mod):
            if name.endswith("_kernel") and not name.startswith("__"):
                setattr(mod, name, _NoLaunch(getattr(mod, name)))
    # AQLM's one-token path tabulates codeword products with a small matmul first: one cuBLAS
    # launch on a GPU, but a slow fp16 matmul on a CPU, so it is stubbed here too
    triton_codebook_lut.codeword_products = lambda x2, books: torch.empty(
        x2.shape[0], x2.shape[1] // books.shape[3], books.shape[0] * books.shape[1], dtype=x2.dtype)
    cases = wrapper_cases(k, n, "cpu")
    print("\n| format, one token, fp16 | wrapper µs (kernels stubbed) | with the launch cache and held calls |")
    print("|---|---|---|")
    for name, call in cases:
        with torch.inference_mode():
            triton_common.LAUNCH_CACHE = False
            plain = per_call_us(call)
            triton_common.LAUNCH_CACHE = True
            held = per_call_us(call)
            triton_common.LAUNCH_CACHE = False
            print(f"| {name} | {plain:.1f} | {held:.1f} |", flush=True)


def module_table(k: int, n: int) -> None:
    """Part 2b (after :func:`wrapper_table`'s stubs): a quantized module's whole eager forward for one
    token, through ``select_kernel`` and the Triton path (made available on CPU tensors, its
    ``supports`` check kept but for the device), on fp16 CPU tensors with every kernel stubbed."""
    import dataclasses

    import lowbit.kernels as K
    from lowbit.formats.blockwise4 import Blockwise4Linear
    from lowbit.formats.codebook import AqlmLinear
    from lowbit.formats.int8_outlier import Int8Linear
    from lowbit.formats.int_grouped import IntGroupedLinear

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    half = (torch.float16, torch.bfloat16)
    grouped = IntGroupedLinear.from_quantized(
        torch.randint(0, 16, (n, k), generator=gen), torch.rand(k // 128, n, generator=gen).half(),
        torch.randint(0, 16, (k // 128, n), generator=gen), (torch.arange(k) // 128).to(torch.int32),
        bits=4, group_size=128)
    modules = {
        "grouped int w4 g128": (grouped, lambda m, x: x.dtype in half and m.group_ordered() is not None),
        "nf4 double quant": (Blockwise4Linear.from_linear(w.half(), None, quant_type="nf4", blocksize=64,
                                                          double_quant=True),
                             lambda m, x: (m.compute_dtype or x.dtype) in half),
        "aqlm 2x8": (AqlmLinear(k, n, in_group_size=8, out_group_size=1, num_codebooks=2, nbits_per_codebook=8),
                     lambda m, x: x.dtype in half),
        "LLM.int8 (threshold 6)": (Int8Linear.from_linear(w.half(), None, threshold=6.0), lambda m, x: x.dtype in half),
    }
    x = torch.randn(1, 1, k, generator=gen).half()
    print("\n| format, one token, fp16 | module forward µs (kernels stubbed, launch cache on) |")
    print("|---|---|")
    saved = dict(K._KERNELS)
    triton_common.LAUNCH_CACHE = True
    try:
        for name, (module, supports) in modules.items():
            fmt = type(module).format
            K._KERNELS[fmt] = [dataclasses.replace(i, available=K.always, supports=supports) if i.name == "triton"
                               else i for i in saved[fmt]]
            K._AVAILABLE.clear()
            module = module.half() if name.startswith("aqlm") else module
            with torch.inference_mode():
                if K.select_kernel(module, x).name != "triton":
                    raise AssertionError(f"{name}: the Triton path was not selected")
                print(f"| {name} | {per_call_us(lambda: module(x)):.1f} |", flush=True)
    finally:
        K._KERNELS.clear()
        K._KERNELS.update(saved)
        K._AVAILABLE.clear()
        triton_common.LAUNCH_CACHE = False


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: launches it and keeps the last launch (grid,
    arguments, options and the compiled kernel Triton returns)."""

    def __init__(self, kernel):
        self.kernel, self.last = kernel, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.kernel[grid](*args, **kwargs)
            self.last = (grid, args, kwargs, compiled)
            return compiled

        return launch


def held_launches(cases: list) -> list[tuple[str, object, object, object, object]]:
    """Each Triton kernel the wrapper ``cases`` launch, as (name, launch through Triton's
    ``JITFunction.run``, launch of the compiled kernel Triton returned through Triton's runner,
    the same through lowbit's held runner, and that with every tensor passed as its address, with
    the same arguments): the second skips the argument binding, specialization and cache lookup an
    eager call repeats, which is what a launch cache held by a module saves; the third skips
    Triton's runner where ``lowbit.kernels.direct_launch`` knows it (else it is the second); the
    fourth also skips the C launcher's work per tensor (a ``data_ptr`` call and the driver's pointer
    check). Each is checked to write the same output."""
    triton_common.LAUNCH_CACHE = False  # every launch through kernel[grid], where the recorders sit
    recorders = []
    for mod in KERNEL_MODULES:
        for attr in dir(mod):
            kernel = getattr(mod, attr)
            if attr.endswith("_kernel") and hasattr(kernel, "arg_names"):
                recorders.append((mod, attr, _Recorder(kernel)))
                setattr(mod, attr, recorders[-1][2])
    with torch.inference_mode():
        for _, call in cases:
            call()
    torch.cuda.synchronize()
    for mod, attr, rec in recorders:
        setattr(mod, attr, rec.kernel)
    out = []
    for mod, attr, rec in recorders:
        name = f"{mod.__name__.rsplit('.', 1)[-1]}.{attr}"
        if rec.last is None:
            continue
        grid, args, kwargs, compiled = rec.last
        every = triton_common._HeldLaunches(rec.kernel).every_argument(args, kwargs)
        tritons = compiled[tuple(grid) + (1,) * (3 - len(grid))]
        runner = triton_common.held_runner(compiled, grid)
        via_run = (lambda kernel=rec.kernel, grid=grid, args=args, kwargs=kwargs: kernel[grid](*args, **kwargs))
        held_tritons = (lambda runner=tritons, every=every: runner(*every))
        held = (lambda runner=runner, every=every: runner(*every))
        # the same with every tensor passed as its address: what Triton's C launcher would then skip
        # per tensor (its data_ptr call and the driver's pointer check), for a variant to come
        addresses = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in every)
        held_addresses = (lambda runner=runner, every=addresses: runner(*every))
        names = list(rec.kernel.arg_names)
        written = args[names.index(next(n for n in ("y_ptr", "out_ptr", "part_ptr") if n in names))]  # an output
        with torch.inference_mode():  # the recorded tensors were made in inference mode
            via_run()
            want = written.clone()
            for way, call in (("Triton's runner", held_tritons), ("lowbit's held runner", held),
                              ("addresses", held_addresses)):
                written.fill_(float("nan"))
                call()
                torch.cuda.synchronize()
                if not torch.equal(written, want):
                    raise AssertionError(f"{name}: the held compiled kernel wrote another output ({way})")
        out.append((name, via_run, held_tritons, held, held_addresses))
    return out


def gpu_table(k: int, n: int, calls: int = 2000) -> None:
    """Part 3: the wrappers with their kernels on the GPU, called eagerly; an empty Triton kernel's
    launch; each kernel's launch through Triton and from its held compiled kernel; and the
    functions each call spends its time in (cProfile, per call)."""
    buf = torch.empty(1, device="cuda")
    wrappers = wrapper_cases(k, n, "cuda")
    direct = direct_launch.triton_version() in direct_launch.VERSIONS
    held = [(f"{name}, {way}", fn) for name, via_run, tritons, from_held, addresses in held_launches(wrappers)
            for way, fn in (("through JITFunction.run", via_run), ("held compiled kernel, Triton's runner", tritons),
                            ("held compiled kernel, lowbit's runner" + (" (Triton's runner skipped)" if direct
                                                                        else ""), from_held),
                            ("the same, tensors passed as addresses", addresses))]
    cases = [("empty Triton kernel (one pointer, one int)", lambda: _empty_kernel[(1,)](buf, 1, BLOCK=64)),
             ("torch.add (one PyTorch launch)", lambda: torch.add(buf, 1.0)),
             *held, *wrappers]
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"CPU µs per eager call over {calls} calls (then synchronized)\n")
    print("| call | µs per call |")
    print("|---|---|")

    def timed(name, call):
        for _ in range(20):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
        print(f"| {name} | {(time.perf_counter() - start) / calls * 1e6:.1f} |", flush=True)

    with torch.inference_mode():
        cached = triton_common.LAUNCH_CACHE
        for on in (False, True):  # the wrappers, then with held launches and held calls (HeldCall)
            triton_common.LAUNCH_CACHE = on
            for name, call in cases if not on else wrappers:
                timed(f"{name}, launch cache and held calls" if on else name, call)
        if direct:  # and the held calls through Triton's runner (the held launches were made above)
            direct_launch.DIRECT_LAUNCH = False
            for name, call in wrappers:
                timed(f"{name}, launch cache and held calls, Triton's runner", call)
            direct_launch.DIRECT_LAUNCH = True
        triton_common.LAUNCH_CACHE = cached
        for name, call in cases[2 + len(held):]:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls // 4):
                call()
            prof.disable()
            torch.cuda.synchronize()
            print(f"\n{name}: the 12 functions with the most time of their own, µs per call")
            stats = pstats.Stats(prof).stats
            top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
            for (path, line, func), (_, ncalls, tottime, cumtime, _) in top:
                print(f"  {tottime / (calls // 4) * 1e6:7.2f} own, {cumtime / (calls // 4) * 1e6:7.2f} with callees, "
                      f"{ncalls / (calls // 4):4.1f}x  {func} ({path.rsplit('/', 2)[-1]}:{line})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="time and profile the real kernels' eager calls on a GPU")
    args = p.parse_args()
    k, n = 4096, 4096
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA or ROCm GPU")
        gpu_table(k, n)
        return
    saved = (triton_int_grouped.matmul_group_ordered, triton_blockwise4.matmul_blockwise4,
             triton_codebook.matmul_codebook)
    triton_int_grouped.matmul_group_ordered = lambda x, w, bias=None, **kw: x.new_empty(x.shape[0], n)
    triton_blockwise4.matmul_blockwise4 = lambda x, *a, **kw: x.new_empty(x.shape[0], n)
    triton_codebook.matmul_codebook = lambda x, *a, **kw: x.new_empty(x.shape[0], n)
    x = torch.randn(1, k)
    i32 = torch.zeros(k // 8, n, dtype=torch.int32)
    int_args = (i32, torch.randn(k // 128, n), torch.zeros(k // 128, n // 8, dtype=torch.int32), None, None, 4, 128)
    nf4_args = (torch.zeros(n * k // 2, 1, dtype=torch.uint8), torch.randn(n * k // 64), torch.randn(16), None, None,
                None, None, 64, n, k, None)
    aqlm_args = (torch.zeros(n, k // 8, 2, dtype=torch.int16), torch.randn(2, 256, 1, 8), torch.randn(n, 1, 1, 1), None)
    int_layout = (GroupOrdered(*int_args[:3], None, 4, 128), None)
    cases = [("grouped int", ops.int_grouped_matmul, ops.int_grouped_linear, int_args, int_layout),
             ("nf4", ops.blockwise4_matmul, ops.blockwise4_linear, nf4_args, nf4_args),
             ("aqlm", ops.codebook_matmul, ops.codebook_linear, aqlm_args, aqlm_args)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; µs per call, Triton wrapper stubbed\n")
    print("| format | mode | custom op | entry point |")
    print("|---|---|---|---|")
    for mode, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        for name, op, entry, args, entry_args in cases:
            with ctx():
                via_op = per_call_us(lambda: op(x, *args))
                via_entry = per_call_us(lambda: entry(x, *entry_args))
            print(f"| {name} | {mode} | {via_op:.1f} | {via_entry:.1f} |", flush=True)
    (triton_int_grouped.matmul_group_ordered, triton_blockwise4.matmul_blockwise4,
     triton_codebook.matmul_codebook) = saved
    wrapper_table(k, n)
    module_table(k, n)
    if direct_launch.triton_version() in direct_launch.VERSIONS:
        runner_table()


if __name__ == "__main__":
    main()
