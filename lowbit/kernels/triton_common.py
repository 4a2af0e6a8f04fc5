"""Launch configuration and device helpers shared by the Triton kernels.

One heuristic picks tiles for every fused dequant-matmul: a vector-unit GEMV for fewer than 16
rows, ``tl.dot`` tiles above, and split-K when the output alone would leave most of the GPU's
multiprocessors idle. No autotuning at call time: the choice is a cached function of the
shape, so an eager call does no search.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowbit.kernels import device_arch
from lowbit.kernels.direct_launch import direct_runner

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""Kernels run under the Triton interpreter (CPU tensors; the tests use it)."""


LAUNCH_CACHE = os.environ.get("LOWBIT_LAUNCH_CACHE", "1") not in ("", "0")
"""Whether :func:`launch` holds each compiled kernel and launches it directly after its first call
(on unless ``LOWBIT_LAUNCH_CACHE=0``). On the H100 machine (``bench/dispatch.py --gpu``, Triton
3.6) a held launch took 7-13 µs of CPU against 14-20 µs through ``JITFunction.run``;
``tests/test_launch_cache.py`` runs real kernels through it on a GPU."""


class _HeldLaunches:
    """The compiled launches of one ``@triton.jit`` kernel, keyed by the arguments.

    Triton's ``kernel[grid](*args, **kwargs)`` binds the arguments, derives their specialization
    and looks the compiled kernel up on every call. Here the first call of a key goes through it,
    and the :class:`CompiledKernel` it returns is launched directly for later calls of that key.
    The key holds the grid, every value that is not a tensor (ints, floats, constexprs, launch
    options: finer than Triton's own specialization, which looks only at an int's equality to 1,
    divisibility by 16 and range), and for each tensor what Triton specializes it on: dtype,
    device and 16-byte alignment. Tensors must be passed by position.
    """

    MAX_KEYS = 4096
    """Held launches per kernel before they are dropped (a new grid or M is a new key: prefill
    lengths vary)."""

    def __init__(self, kernel) -> None:
        import inspect

        self.kernel = kernel
        self.names = list(kernel.arg_names)  # every parameter, constexprs included, in order
        self.defaults = {name: p.default for name, p in inspect.signature(kernel.fn).parameters.items()
                         if p.default is not inspect.Parameter.empty}
        self.runners: dict[tuple, tuple] = {}  # key -> (held runner, the parameters after the positional ones)

    def __call__(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> tuple:
        """Launch; returns the held launch ``(runner, tail)``: ``runner(*args, *tail)`` repeats it."""
        key = (grid, tuple(kwargs.items()),
               *[(a.dtype, a.get_device(), not a.data_ptr() & 15) if isinstance(a, torch.Tensor) else a for a in args])
        held = self.runners.get(key)
        if held is not None:
            runner, tail = held
            runner(*args, *tail)
            return held
        compiled = self.kernel[grid](*args, **kwargs)
        if len(self.runners) >= self.MAX_KEYS:
            self.runners.clear()
        held = self.runners[key] = (held_runner(compiled, grid), self.every_argument(args, kwargs)[len(args):])
        return held

    def every_argument(self, args: tuple, kwargs: dict) -> tuple:
        """Every parameter's value in order, constexprs and defaults included (what a compiled
        kernel's launch takes; launch options left out). The values after ``args`` are all in the
        key, so each held launch keeps them."""
        return (*args, *(kwargs[name] if name in kwargs else self.defaults[name] for name in self.names[len(args):]))


def held_runner(compiled, grid: tuple[int, ...]):
    """The launch of a ``CompiledKernel`` over ``grid``: ``runner(*every_argument)``; without Triton's
    Python runner where :func:`lowbit.kernels.direct_launch.direct_runner` knows the launcher, else
    through it."""
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    runner = compiled[grid3]
    return direct_runner(compiled, grid3, runner) or runner


_HELD: dict[int, _HeldLaunches] = {}  # by id of the kernel (a JITFunction hashes through a property)


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> tuple | None:
    """``kernel[grid](*args, **kwargs)``; with :data:`LAUNCH_CACHE` on a GPU, through the held
    compiled kernel after the first call with the same specialization (:class:`_HeldLaunches`).
    Constexprs and launch options must be passed by name. Returns the held launch
    ``(runner, tail)`` (for :class:`~lowbit.kernels.held.HeldCall`), None when nothing is held."""
    if not LAUNCH_CACHE or INTERPRET:
        kernel[grid](*args, **kwargs)
        return None
    held = _HELD.get(id(kernel))
    if held is None or held.kernel is not kernel:
        held = _HELD[id(kernel)] = _HeldLaunches(kernel)
    return held(grid, args, kwargs)


def held_call_key(x: torch.Tensor, *switches) -> tuple | None:
    """The key of a :class:`~lowbit.kernels.held.HeldCall` on input ``x`` (with the calling
    module's ``switches``, constants that change its launch), or None where no call may be held:
    the launch cache off, the interpreter, or a stream other than the device's default one (a
    capture included).

    The key holds what the launch depends on in ``x``: its shape and strides (the rows and their
    stride), dtype, device and 16-byte alignment (which Triton specializes on)."""
    if not LAUNCH_CACHE or INTERPRET:
        return None
    device = x.get_device()  # _held_key's test, inline: this runs on every eager call (x.device costs more)
    if device >= 0 and torch._C._cuda_getCurrentRawStream(device) != 0:
        return None
    return (x.shape, x.stride(), x.dtype, device, not x.data_ptr() & 15, *switches)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints. The wrappers use this, not ``triton.cdiv``: Triton 3.9
    wraps that in a constexpr-function object whose call costs about 1.4 µs on a CPU core, several
    times per eager call (``bench/dispatch.py``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``); ``triton.next_power_of_2`` without its call cost."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@triton.jit
def _probe_kernel(p_ptr, BLOCK: tl.constexpr):
    """Adds 1 to ``BLOCK`` fp32 values: the kernel :func:`compiles_for` compiles."""
    offs = tl.arange(0, BLOCK)
    tl.store(p_ptr + offs, tl.load(p_ptr + offs) + 1.0)


@functools.cache
def compiles_for(arch: str) -> bool:
    """Whether the installed Triton compiles a kernel for the AMD architecture ``arch`` (wave32, as
    RDNA runs): Triton 3.5 to 3.8 compile for RDNA2's gfx1030, 3.9 refuses it. Asked once per
    architecture, about a second. False under the interpreter, which compiles nothing."""
    if INTERPRET:
        return False
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        triton.compile(ASTSource(fn=_probe_kernel, signature={"p_ptr": "*fp32", "BLOCK": "constexpr"},
                                 constexprs={"BLOCK": 64}), target=GPUTarget("hip", arch, 32))
    except Exception:  # the backend refuses the architecture: any error of its pipeline
        return False
    return True


@triton.jit
def _product(x, w, BLOCK_M: tl.constexpr, DOT_FP32: tl.constexpr):
    """``x [BM, BK] @ w [BK, BN]`` in fp32; ``w`` holds fp32 values, rounded to x's dtype for ``tl.dot``.

    ``BLOCK_M >= 16`` uses ``tl.dot`` (tensor cores); smaller tiles multiply and sum on the
    vector units. ``DOT_FP32`` makes the dot's operands fp32: only for bf16 under the Triton
    interpreter, whose bf16 dot and int-to-bf16 casts are wrong.

    One ``return`` after a full if/else: Triton generates the code that follows a constexpr branch's
    early ``return`` too, and the vector product of a 128x128x128 tile is over its tensor size limit.
    """
    if BLOCK_M >= 16:
        if DOT_FP32:
            out = tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32))
        else:
            out = tl.dot(x, w.to(x.dtype))
    else:
        out = tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    return out


@triton.jit
def _dot_weight_first(w, x, acc, DOT_FP32: tl.constexpr):
    """``acc [BN, BM] + w [BN, BK] @ x [BM, BK].T`` in fp32 with ``tl.dot``: a tile of ``y.T``, the
    weight the dot's first operand and the sum accumulated in the dot. ``w`` holds fp32 values,
    rounded to x's dtype (its scale applied before, as the dequantize path rounds it); ``BM`` may
    be under 16 (Triton pads it). ``DOT_FP32`` as in :func:`_product`.

    In the sm_90 code of Triton 3.6 and 3.9 the weight then comes to the ``wgmma`` from registers
    and the dots run asynchronously, each step waiting only for earlier ones, so the next tile's
    dequantize overlaps the product; ``x @ w`` with a scale applied after it waits for every dot
    to finish before the next step (``bench/ptx.py``)."""
    if DOT_FP32:
        out = tl.dot(_round_to_bf16(w), tl.trans(x.to(tl.float32)), acc)
    else:
        out = tl.dot(w.to(x.dtype), tl.trans(x), acc)
    return out


@triton.jit
def _accumulator(K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr):
    """A fused matmul's fp32 zeros: ``[BLOCK_M, BLOCK_N]``, or with ``SWAP`` the ``y.T`` tile
    ``[BLOCK_N, BLOCK_M]`` that :func:`_dot_weight_first` accumulates into.

    With ``SWAP`` the caller's K loop (``range(program_id(1) * BLOCK_K, K, ...)``) is assumed to run
    at least once: every split has a K tile. With no path around the loop, ptxas keeps its
    ``wgmma`` asynchronous; otherwise the zeros that path leaves in the accumulator made it
    serialize them (warning C7515)."""
    if SWAP:
        tl.assume(tl.program_id(1) * BLOCK_K < K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return acc


@triton.jit
def _round_to_bf16(v):
    """fp32 ``v`` rounded to the nearest bf16 value (ties to even), as fp32: what ``v.to(tl.bfloat16)``
    does on a GPU. The interpreter's cast truncates instead (a bias of -2.8e-3 on average over
    random values here), which the tests would count as the kernel's error. Finite values only."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's output rows and columns: program 0 walks the ``[M, N]`` tiles, N fastest."""
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // grid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % grid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n


@triton.jit
def _split_total(ws_ptr, lock_ptr, tile, acc, ws_at, mask, stride_split, SPLIT_K: tl.constexpr):
    """Serial split-K: store this split's fp32 ``acc`` at ``ws_at + split * stride_split`` and count
    its arrival on ``lock_ptr[tile]``. Returns whether this program arrived last, and then the sum
    of every split's partials in split order (so the result does not depend on which one is last);
    the last program also sets the counter back to 0 for the next launch.

    The barrier before the count makes every thread's partial visible before the (acquire-release,
    device-scope) atomic publishes it; the last program reads the partials from L2 (``.cg``).
    """
    tl.store(ws_at + tl.program_id(1) * stride_split, acc, mask=mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    total = acc
    if last:
        tl.debug_barrier()
        total = tl.load(ws_at, mask=mask, other=0.0, cache_modifier=".cg")
        for s in tl.static_range(1, SPLIT_K):
            total += tl.load(ws_at + s * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")
    return last, total


@triton.jit
def _store_output(y_ptr, ws_ptr, lock_ptr, b_ptr, acc, offs_m, offs_n, M, N, stride_ym, tile,
                  HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """Write the fp32 tile ``+ bias`` in y's dtype. With ``SPLIT_K > 1`` the partials of output tile
    ``tile`` (this program's index among the output tiles, its K split being ``program_id(1)``)
    meet in ``ws[SPLIT_K, M, N]`` and the last split to finish writes y (:func:`_split_total`):
    one launch, no zero-filled output, no reduction kernel after it.

    ``TRANSPOSED``: ``acc`` is a tile of ``y.T``, ``[BN, BM]``, written as it is. Transposed in
    registers first (``tl.trans``), the accumulator made ``ptxas`` serialize the ``wgmma`` of the
    loop that produced it (warning C7515, Triton 3.6, tiles of 32 rows and more)."""
    if TRANSPOSED:
        rows = offs_m[None, :]
        cols = offs_n[:, None]
        mask = (offs_m < M)[None, :] & (offs_n < N)[:, None]
    else:
        rows = offs_m[:, None]
        cols = offs_n[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    last = True
    if SPLIT_K > 1:
        last, acc = _split_total(ws_ptr, lock_ptr, tile, acc, ws_ptr + rows * N + cols, mask, M * N, SPLIT_K)
    if last:
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            if TRANSPOSED:
                acc += bias[:, None]
            else:
                acc += bias[None, :]
        tl.store(y_ptr + rows * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes and compiler options of one matmul launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    hip: tuple[tuple[str, int], ...] = ()  # HIP-only compiler options (waves_per_eu, ...)
    swap: bool = False  # tl.dot tiles of y.T, the weight first (:func:`_dot_weight_first`; grouped int only)

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **dict(self.hip)}

    def grid(self, m: int, n: int) -> tuple[int, int]:
        """Programs of a launch: output tiles (axis 0, as :func:`_output_tile` walks them) x K splits."""
        return cdiv(m, self.block_m) * cdiv(n, self.block_n), self.split_k

    def kernel_options(self, dtype: torch.dtype) -> dict:
        """The tile constexprs every fused matmul kernel takes, ``DOT_FP32`` for ``dtype`` operands
        (see :func:`_product`), and the launch options."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "SPLIT_K": self.split_k,
                "DOT_FP32": INTERPRET and dtype == torch.bfloat16, **self.launch_options()}


def hip_options(arch: str) -> tuple[tuple[str, int], ...]:
    """Triton compiler options for an AMD target such as ``"gfx942"``.

    CDNA (``gfx9xx``: MI200/MI300, wave64, MFMA matrix cores) gets the matrix-core options
    (16x16 MFMA instructions, ``kpack``); RDNA (``gfx11xx``/``gfx12xx``: Radeon, wave32, WMMA) has no
    MFMA, so only the occupancy hint applies.
    """
    if arch.startswith("gfx9"):
        return (("waves_per_eu", 2), ("matrix_instr_nonkdim", 16), ("kpack", 1))
    return (("waves_per_eu", 2),)


def split_for(programs: int, steps: int, sms: int, waves: int, most: int, steps_per_split: int = 1) -> int:
    """The K split of a launch of ``programs`` programs per split over ``steps`` K steps: doubled from 1,
    up to ``most``, while the programs stay within ``waves`` a multiprocessor of ``sms`` and every
    split keeps at least ``steps_per_split`` steps (the launch heuristics of every kernel here)."""
    split = 1
    while split < most and programs * split * 2 <= waves * sms and steps >= split * 2 * steps_per_split:
        split *= 2
    return split


@functools.lru_cache(maxsize=None)
def matmul_config(m: int, n: int, k: int, block_k: int, sms: int, hip_arch: str | None,
                  gemv_tile: tuple[int, int] | None = None) -> MatmulConfig:
    """Heuristic tiles for ``[m, k] @ [k, n]`` with K tiles of ``block_k``.

    FMA GEMV for ``m < 16``, ``tl.dot`` tiles above. Split-K doubles while the programs stay
    under ``waves`` times the GPU's ``sms`` multiprocessors and each split keeps two K tiles, up to
    16 ways for a GEMV and 8 for ``tl.dot`` tiles. From the sweeps of ``bench/sweep.py`` (w4 g128,
    Llama-7B shapes; H200 2026-11-26, H100 2026-11-27): one token is fastest with many small
    programs (64 columns, 2 warps, K split 16 ways); 16 rows with 16x64 tiles and K split 8 ways
    on every shape (16 waves let 4096x11008 split so far; on the H100, 4096x4096 took 13.2 µs
    against 18.9 split 16 ways, 11008x4096 26.2 against 33.2); above, 64x64 tiles, which read each
    weight tile once for 64 rows, and 3 waves (32 rows on the H100: 14.9 / 34.8 / 31.6 µs against
    21.6 / 51.5 / 47.0 in 16x64 tiles). ``gemv_tile``: (columns, warps) of a one-token program on
    NVIDIA instead of (64, 2), for a kernel whose sweep found others. An AMD target (``hip_arch``,
    None on NVIDIA) gets its own compiler options (:func:`hip_options`).
    """
    if m == 1:
        block_n, num_warps = gemv_tile if gemv_tile is not None and not hip_arch else (64, 2)
        block_m, waves = 1, 64
    elif m < 16:
        block_m = next_power_of_2(m)
        block_n, num_warps, waves = (64 if block_m <= 2 else 32), 4, 8
    elif m == 16:
        block_m, block_n, num_warps, waves = 16, 64, 4, 16
    else:
        block_m, block_n, num_warps, waves = 64, 64, 4, 3
    tiles = cdiv(m, block_m) * cdiv(n, block_n)
    k_tiles = cdiv(k, block_k)
    max_split = 16 if m < 16 else 8
    split_k = split_for(tiles, k_tiles, sms, waves, max_split, steps_per_split=2)
    hip_opts = hip_options(hip_arch) if hip_arch else ()
    num_stages = 2 if hip_arch else 3
    return MatmulConfig(block_m, block_n, block_k, split_k, num_warps, num_stages, hip_opts)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (4 for CPU tensors under the interpreter: a small grid)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def launch_config(m: int, n: int, k: int, block_k: int, device: torch.device,
                  gemv_tile: tuple[int, int] | None = None) -> MatmulConfig:
    return matmul_config(m, n, k, block_k, device_sms(device), device_arch(device), gemv_tile)


def input_rows(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [..., K]`` as ``[M, K]`` rows in ``dtype`` (default: x's), unit stride along K (a view where possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    if dtype is not None and dtype != x.dtype:  # a same-dtype .to() returns x, but costs a call
        x2 = x2.to(dtype)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def check_batch_path(batch_path: str | None) -> None:
    """``batch_path`` of a format's matmul wrapper: None (its own choice), ``"tiled"`` or ``"dequantize"``."""
    if batch_path not in (None, "tiled", "dequantize"):
        raise ValueError(f"batch_path must be 'tiled' or 'dequantize', not {batch_path!r}")
