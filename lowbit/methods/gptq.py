"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's
inputs, so that the layer's output error ``||(W - Q) X||`` stays small.

The solver is pure tensor math on one layer. It takes the Hessian ``H = 2/n * sum X X^T`` that
:class:`HessianStats` accumulates from calibration inputs and returns the integer codes and
group parameters of :mod:`lowbit.methods.affine`; it never sees a storage layout. The
:class:`GptqQuantizer` wraps it for the block-by-block runner and emits
:class:`~lowbit.formats.int_grouped.IntGroupedLinear`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.config import GPTQConfig
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.methods.affine import choose_qparams, dequantize, quantize
from lowbit.methods.base import QUANTIZERS
from lowbit.methods.grouped import IntGroupedQuantizer
from lowbit.methods.walk import linear_shape, linear_weight

log = logging.getLogger(__name__)

DAMP_RETRIES = 4  # each retry multiplies the dampening by 10


class HessianStats:
    """Running ``H = 2/n * sum_i x_i x_i^T`` over every input row ``x_i`` (fp32 ``[K, K]``)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    @classmethod
    def for_linear(cls, linear: nn.Module) -> HessianStats:
        """Empty statistics for ``linear``'s inputs, on its weight's device."""
        k, _ = linear_shape(linear)
        return cls(k, device=linear_weight(linear).device)

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Fold in ``inputs`` ``[..., K]`` (every leading index is one row)."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.H.device, torch.float32)  # [R, K]
        if not torch.isfinite(x).all():
            raise ValueError("calibration activations contain NaN or Inf")
        rows = x.shape[0]
        total = self.nsamples + rows
        self.H.mul_(self.nsamples / total)
        x = x * (2.0 / total) ** 0.5
        self.H.addmm_(x.t(), x)  # [K, R] @ [R, K]
        self.nsamples = total


@dataclass(frozen=True)
class GptqResult:
    """Output of :func:`gptq_quantize`, in the original column order.

    ``q`` int32 ``[N, K]``; ``scales`` fp32 ``[G, N]`` (fp16-representable); ``zeros`` int32
    ``[G, N]``; ``g_idx`` int32 ``[K]``; ``damp`` the dampening that made H invertible.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    damp: float


def inverse_hessian_factor(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp*I)^-1`` (``U^T U = (H + damp I)^-1``).

    ``damp = damp_percent * mean(diag H)``. If the Cholesky fails, the dampening is raised
    tenfold (logged) up to ``DAMP_RETRIES`` times; then ``ValueError``.
    """
    k = H.shape[0]
    mean_diag = torch.mean(torch.diag(H)).item()
    percent = damp_percent
    for attempt in range(DAMP_RETRIES + 1):
        damp = percent * mean_diag
        Hd = H + damp * torch.eye(k, dtype=H.dtype, device=H.device)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                if attempt:
                    log.warning("Hessian was not positive definite; dampening raised to %g of its mean diagonal",
                                percent)
                return U, damp
        percent *= 10
    raise ValueError(
        f"the layer's Hessian is not positive definite even with dampening {percent / 10:g} x mean(diag H); "
        "its calibration inputs are degenerate (give more, or more varied, calibration text)"
    )


def checked_hessian(name: str, stats: HessianStats | None, in_features: int) -> torch.Tensor:
    """The Hessian ``stats`` gathered for layer ``name``; ``ValueError`` if it saw no inputs, and a
    warning if fewer input rows than columns leave only the dampening to make it invertible."""
    if stats is None or stats.nsamples == 0:
        raise ValueError(f"{name}: GPTQ got no calibration inputs for this layer")
    if stats.nsamples < in_features:
        log.warning("%s: %d calibration rows for %d inputs: the Hessian is rank-deficient and only "
                    "the dampening holds it up; give more calibration tokens", name, stats.nsamples, in_features)
    return stats.H


def _group_bounds(k: int, group_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + group_size, k)) for start in range(0, k, group_size)]


Pending = Callable[[int], torch.Tensor]
"""``pending(end)``: the error-updated weights ``[N, end - col]`` of the columns the solve meets
from the current one up to (not including) position ``end``."""

RoundColumn = Callable[[int, int, torch.Tensor, Pending], tuple[torch.Tensor, torch.Tensor]]
"""``round_column(col, k, w, pending) -> (codes [N], w_hat [N])``: round column ``k`` (the
solve's ``col``-th) whose error-updated weights are ``w`` fp32 ``[N]``; ``w_hat`` is what the
codes dequantize to."""


def gptq_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    round_column: RoundColumn,
    *,
    order: torch.Tensor | None = None,
    damp_percent: float = 0.1,
    block_size: int = 128,
) -> tuple[torch.Tensor, float]:
    """GPTQ's error feedback with any rounding: the solver behind :func:`gptq_quantize`, and
    behind grids fixed before the solve (LLM.int8's row scales, NF4's block absmax).

    Columns are rounded one at a time in ``order`` (default: left to right); each column's
    rounding error, divided by its pivot of the inverse Hessian's Cholesky factor, is pushed
    onto the columns not yet rounded.

    Args:
        W: fp ``[N, K]`` weight (not modified).
        H: fp32 ``[K, K]`` input Hessian from :class:`HessianStats` (not modified). Columns
            whose inputs were always 0 (``H[k, k] == 0``) are solved as weights of 0.
        round_column: rounds one column (see :data:`RoundColumn`).
        order: int64 ``[K]`` permutation: the original column the solve meets at each position.
        block_size: columns per lazy-batch block (the error reaches later blocks in one matmul).

    Returns:
        ``(codes int32 [N, K] in the original column order, damp)``, ``damp`` the dampening that
        made H invertible.
    """
    n, k = W.shape
    W = W.detach().to(torch.float32).clone()  # [N, K]
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()  # [K, K]
    if not torch.isfinite(W).all():
        raise ValueError("weights contain NaN or Inf")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.arange(k, device=W.device) if order is None else order.to(W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U, damp = inverse_hessian_factor(H, damp_percent)
    del H

    Q = torch.zeros_like(W, dtype=torch.int32)  # [N, K] in solve order
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()  # [N, B]
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]  # [B, B]
        for i in range(i2 - i1):
            col = i1 + i

            def pending(end: int) -> torch.Tensor:
                # the rest of this block, then later columns with the error this block has made so
                # far applied (the lazy update is still pending)
                later = W[:, i2:end] - Err1[:, :i] @ U[i1:col, i2:end]  # [N, end-i2] (empty if end <= i2)
                return torch.cat([W1[:, i : i + (end - col)], later], dim=1)  # [N, end-col]

            w = W1[:, i]  # [N]
            q, w_hat = round_column(col, int(perm[col]), w, pending)  # [N], [N]
            Q[:, col] = q
            err = (w - w_hat) / U1[i, i]  # [N]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # rank-1 update of the rest of the block
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of later blocks
    return Q[:, torch.argsort(perm)], damp


def act_order(H: torch.Tensor) -> torch.Tensor:
    """Act-order: columns by decreasing ``diag(H)`` (int64 ``[K]``), a dead column's 0 read as
    the 1 the solve gives it (GPTQ's reference sorts after that fix)."""
    d = torch.diag(H)
    return torch.argsort(torch.where(d == 0, 1.0, d), descending=True)


class _GroupRounding:
    """GPTQ's own grid: affine groups whose scale and zero are chosen when the solve reaches a
    group's first column (or up front, ``static``); ``g_idx`` records each original column's group."""

    def __init__(self, k: int, group_size: int, bits: int, sym: bool, zero_min: int,
                 static: list[tuple[torch.Tensor, torch.Tensor]] | None, device: torch.device) -> None:
        self.k, self.group_size, self.bits, self.sym, self.zero_min = k, group_size, bits, sym, zero_min
        self.static = static
        self.scales: list[torch.Tensor] = []  # per group, in the order the solve meets them
        self.zeros: list[torch.Tensor] = []
        self.g_idx = torch.empty(k, dtype=torch.int32, device=device)  # group of each original column
        self.group = -1  # the group of the column being rounded
        self.scale = self.zero = None

    def __call__(self, col: int, k: int, w: torch.Tensor, pending: Pending) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static is not None:
            self.group = k // self.group_size
            self.scale, self.zero = self.static[self.group]
        elif col % self.group_size == 0:
            cols = pending(min(col + self.group_size, self.k))  # the group's current weights
            self.scale, self.zero = choose_qparams(cols, self.bits, self.sym, zero_min=self.zero_min)
            self.scales.append(self.scale)
            self.zeros.append(self.zero)
            self.group = len(self.scales) - 1
        self.g_idx[k] = self.group
        q = quantize(w, self.scale, self.zero, self.bits)  # [N]
        return q, dequantize(q, self.scale, self.zero)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.1,
    block_size: int = 128,
    zero_min: int = 0,
) -> GptqResult:
    """Quantize one layer's weight with GPTQ.

    Args:
        W: fp ``[N, K]`` weight (not modified).
        H: fp32 ``[K, K]`` input Hessian from :class:`HessianStats` (not modified).
        group_size: columns per group (``K`` or -1 for one group per row); the last group may
            be shorter. Without ``static_groups``, a group's scale and zero are chosen from the
            error-updated weights when the solve reaches the group's first column (in act-order,
            groups are runs of the permuted order).
        desc_act: act-order: quantize columns in decreasing ``diag(H)``; ``g_idx`` records the
            resulting group of each original column.
        static_groups: choose every group's parameters up front from the original weights, in
            the original column order (``g_idx[k] = k // group_size`` even with ``desc_act``).
        block_size: columns per lazy-batch block (the error reaches later blocks in one matmul).
        zero_min: smallest allowed zero point (1 for the GPTQ v1 layout, which stores ``z - 1``).
    """
    n, k = W.shape
    group_size = k if group_size == -1 else group_size
    static = None
    if static_groups:  # choose_qparams refuses NaN or Inf weights; otherwise gptq_solve does
        Wf = W.detach().float().clone()
        Wf[:, torch.diag(H).to(W.device) == 0] = 0.0  # as the solve sees dead columns
        static = [choose_qparams(Wf[:, a:b], bits, sym, zero_min=zero_min) for a, b in _group_bounds(k, group_size)]
    order = act_order(H.to(W.device)) if desc_act else None
    rounding = _GroupRounding(k, group_size, bits, sym, zero_min, static, W.device)
    q, damp = gptq_solve(W, H, rounding, order=order, damp_percent=damp_percent, block_size=block_size)
    scales, zeros = (zip(*static) if static is not None else (rounding.scales, rounding.zeros))
    return GptqResult(q, torch.stack(list(scales)), torch.stack(list(zeros)), rounding.g_idx, damp)


@QUANTIZERS.register("gptq")
class GptqQuantizer(IntGroupedQuantizer[GPTQConfig]):
    """GPTQ into :class:`IntGroupedLinear`; needs calibration data (Hessians of the inputs)."""

    requires_calibration = True

    @property
    def true_sequential(self) -> bool:
        return self.config.true_sequential

    def zero_min(self) -> int:
        """The GPTQ v1 layout stores ``z - 1``, so asymmetric zero points start at 1 there."""
        return 1 if self.config.format == "gptq" and not self.config.sym else 0

    def collect(self, name: str, linear: nn.Module) -> HessianStats:
        return HessianStats.for_linear(linear)

    def quantize_layer(self, name: str, linear: nn.Module, stats: HessianStats | None) -> IntGroupedLinear:
        cfg = self.config
        w = self.checked_weight(name, linear)  # [N, K]
        H = checked_hessian(name, stats, w.shape[1])
        try:
            r = gptq_quantize(w, H, bits=cfg.bits, group_size=self.group_size(w.shape[1]), sym=cfg.sym,
                              desc_act=cfg.desc_act, static_groups=cfg.static_groups,
                              damp_percent=cfg.damp_percent, block_size=cfg.block_size, zero_min=self.zero_min())
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        return self.build(linear, r.q, r.scales, r.zeros, r.g_idx)
