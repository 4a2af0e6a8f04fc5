"""Scratch memory for split-K launches: the fp32 partials and the arrival counters, held per device
for launches on its default stream, and every matmul kernel's output buffers (:func:`output_buffers`).

A split-K launch's programs write their partial sums of an output tile to the partials, and the
last to arrive (counted in the tile's counter) sums them and writes the tile
(:func:`lowbit.kernels.triton_common._split_total`), leaving its counter zero again. Eager launches
on a device's default stream run in order, so they share held buffers and nothing is zero-filled
per call; a capture or another stream gets its own. No Triton here: plain tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lowbit.kernels.triton_common import MatmulConfig


def _held_key(device: torch.device) -> tuple[int, bool]:
    """The key of ``device``'s held split-K buffers (its index; -1 for the interpreter's CPU
    tensors, whose programs run one after another), and whether the current stream is the
    device's default one (always, for the interpreter)."""
    if device.type != "cuda":
        return -1, True
    key = device.index if device.index is not None else torch.cuda.current_device()
    return key, torch._C._cuda_getCurrentRawStream(key) == 0


_COUNTERS: dict[int, torch.Tensor] = {}
"""Split-K arrival counters held for launches on each device's default stream (key: the device
index; -1 for the interpreter's CPU tensors); zero between launches (:func:`_split_total`)."""


def split_k_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """At least ``tiles`` zeroed int32 counters for a split-K launch on ``device``'s current stream.

    On the default stream (eager calls) they are allocated once and held: every launch leaves them
    zero again, and launches on that stream run in order, so no call fills them. Another stream
    gets counters zeroed for the call, as does a CUDA graph capture, except that a capture uses the
    default stream's held counters where they exist (its replays run in order with that stream's
    launches), so the graph holds no fill. Nothing is held from another stream: a graph's warm-up
    and capture allocate from the graph's private memory pool, which may hand that memory out
    again.
    """
    key, default_stream = _held_key(device)
    if not default_stream:  # a side stream, or a capture
        held = _COUNTERS.get(key)
        if held is not None and held.numel() >= tiles and torch.cuda.is_current_stream_capturing():
            return held
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < tiles:
        counters = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = counters
    return counters


_PARTIALS: dict[int, torch.Tensor] = {}
"""Split-K partials held for eager launches on each device's default stream (key as :data:`_COUNTERS`')."""

HELD_PARTIALS_MAX = 1 << 22
"""The most fp32 partials a held buffer grows to (16 MiB); a launch needing more allocates its own."""


def split_k_partials(device: torch.device, size: int) -> torch.Tensor:
    """At least ``size`` fp32 values of scratch for a split-K launch's partials on ``device``'s
    current stream (the kernel writes every value it reads, so nothing is filled).

    Launches on the default stream (eager calls) share one held buffer: they run in order, and a
    launch has read its partials before the next one starts. It grows at least twofold, up to
    :data:`HELD_PARTIALS_MAX`. A capture or another stream gets a
    buffer of its own, so a CUDA graph never holds the shared one (which a larger call may replace)."""
    key, default_stream = _held_key(device)
    if size > HELD_PARTIALS_MAX or not default_stream:
        return torch.empty(size, dtype=torch.float32, device=device)
    held = _PARTIALS.get(key)
    if held is None or held.numel() < size:
        # at least doubled, so that few buffers are ever made: a held call keeps the one it was made with
        grown = max(size, 1 << 16, 2 * held.numel() if held is not None else 0)
        held = _PARTIALS[key] = torch.empty(min(grown, HELD_PARTIALS_MAX), dtype=torch.float32, device=device)
    return held


def output_buffers(cfg: MatmulConfig, m: int, n: int, x: torch.Tensor, tiles: int | None = None,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a matmul kernel writes: ``y [M, N]`` in ``dtype`` (None: x's), never zero-filled, and for
    ``cfg.split_k > 1`` the fp32 partials (``[SPLIT_K, M, N]`` in the first values of
    :func:`split_k_partials`' buffer) and the arrival counters of its ``tiles`` output tiles (None:
    ``cfg.grid``'s); with one split both are ``y`` (unread)."""
    y = torch.empty(m, n, device=x.device, dtype=dtype or x.dtype)
    if cfg.split_k == 1:
        return y, y, y
    ws = split_k_partials(x.device, cfg.split_k * m * n)
    return y, ws, split_k_counters(x.device, tiles if tiles is not None else cfg.grid(m, n)[0])
