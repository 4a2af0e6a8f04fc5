"""AWQ (Lin et al. 2023): activation-aware per-channel scaling and weight clipping, then RTN.

Per transformer block, for each group of linears that read one input (:mod:`lowbit.methods.awq_maps`):

1. **Scale search.** With ``x_mean[k] = mean |x[:, k]|`` over the calibration tokens (and, with
   ``duo_scaling``, ``w_mean[k]``, the mean over rows of ``|W|`` normalised by each group's max),
   try ``s = x_mean**a / w_mean**(1-a)`` (or ``x_mean**a``) for ``a = 0, 1/20, ..., 19/20``,
   normalised to ``sqrt(max s * min s) = 1``. Each candidate quantizes ``W * s`` and divides by
   ``s`` again, runs the group's ``inspect`` module on the calibration inputs and scores the mean
   squared error against its full-precision output. The best ``s`` multiplies the linears'
   input columns and divides the preceding op (norm weight/bias, or the previous linear's output
   rows), which leaves the full-precision block unchanged.
2. **Clip search.** For every linear (except query/key), each (row, group) weight range is
   shrunk to ``max|w| * (1 - i/20)``, ``i < 10``, keeping the shrink with the least error of
   that group's partial products on up to 512 calibration tokens.
3. **RTN** of the scaled, clipped weights into :class:`IntGroupedLinear` (asymmetric with
   ``zero_point=True``, the AWQ default).

Codes and zero points, in both searches and in the final rounding, are chosen with the exact fp32
scale; the module stores that scale in fp16 (a relative change under 2**-11). The clip search
makes many groups symmetric (``max = -min``: 36-42 % of each clipped linear's groups in the
embedded model's first block at 3 bits), which puts their zero point on a tie (3.5 at 3 bits).
fp32 breaks it the same way in most groups (98 % in v_proj): one end of the range keeps the extra
code. Rounding the scale to fp16 first breaks it at random, and the half of those groups that
round the other way can no longer reach their top code. In that block the fp32 choice cut each
clipped linear's output error by 1.6-3 % (``bench/awq_block.py``).

Blocks are calibrated on the full-precision outputs of the previous block, as AutoAWQ does.
"""

from __future__ import annotations

import inspect as pyinspect
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit.config import AwqConfig
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.methods.affine import choose_qparams, dequantize, fake_quantize_grouped, group_index, quantize
from lowbit.methods.awq_maps import BlockMap, ScaleGroup, block_map
from lowbit.methods.base import QUANTIZERS, Stats
from lowbit.methods.grouped import IntGroupedQuantizer
from lowbit.methods.walk import find_blocks, is_linear, linear_shape, linear_weight

log = logging.getLogger(__name__)

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512
CODE_SCALE_DTYPE = torch.float32
"""The scale that codes and zero points are chosen with (module docstring); stored as fp16."""


# --- pure functions ------------------------------------------------------------------------

def channel_mean_abs(xs: list[torch.Tensor]) -> torch.Tensor:
    """``mean |x|`` per input channel over every token of ``xs`` (each ``[..., K]``): fp32 ``[K]``."""
    total = sum(x.reshape(-1, x.shape[-1]).abs().float().sum(0) for x in xs)
    return total / sum(x.numel() // x.shape[-1] for x in xs)


def weight_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over rows of ``|w|`` normalised by each (row, group) max: ``w`` fp ``[N, K]`` -> fp32 ``[K]``."""
    a = w.abs().float()
    g = group_index(w.shape[1], group_size).long().to(w.device)
    gmax = torch.zeros(a.shape[0], int(g.max()) + 1, device=w.device).scatter_reduce(1, g.expand_as(a), a, "amax")
    return (a / gmax[:, g].clamp(min=1e-12)).mean(0)


def candidate_scale(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """``x_mean**ratio [/ w_mean**(1-ratio)]``, clamped at 1e-4, normalised to geometric centre 1: ``[K]``."""
    s = x_mean.pow(ratio)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - ratio) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scale(
    x_mean: torch.Tensor,
    w_mean: torch.Tensor | None,
    weights: list[torch.Tensor],
    loss_of: Callable[[list[torch.Tensor]], float],
    bits: int,
    group_size: int,
    sym: bool,
    n_grid: int = N_GRID,
) -> tuple[torch.Tensor, float, list[float]]:
    """Grid search of the AWQ scale.

    Args:
        x_mean: fp32 ``[K]`` mean |input| per channel; w_mean: fp32 ``[K]`` or None (no duo scaling).
        weights: the group's weights, each fp ``[N_i, K]``.
        loss_of: error of the inspected module when the group's weights are replaced by the given
            (fake-quantized) ones.
    Returns:
        the best scale fp32 ``[K]``, its ratio, and every candidate's loss (ratio ``i / n_grid``).
    """
    losses, best = [], (math.inf, None, 0.0)
    for i in range(n_grid):
        ratio = i / n_grid
        s = candidate_scale(x_mean, w_mean, ratio)
        loss = loss_of([fake_quantize_grouped(w.float() * s, bits, group_size, sym, CODE_SCALE_DTYPE) / s
                        for w in weights])
        losses.append(loss)
        if loss < best[0]:
            best = (loss, s, ratio)
    if best[1] is None:
        raise ValueError(f"AWQ scale search found no finite loss (losses {losses[:3]}...); the calibration "
                         "activations or weights contain NaN/Inf")
    return best[1], best[2], losses


def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, sym: bool,
                n_grid: int = N_GRID, max_shrink: float = MAX_SHRINK,
                scale_dtype: torch.dtype = CODE_SCALE_DTYPE) -> torch.Tensor:
    """Per (row, group) clipping range minimising the error of the group's partial products.

    Args:
        w: fp ``[N, K]``; x: fp ``[T, K]`` calibration inputs.
        scale_dtype: the scale each candidate's codes are chosen with.
    Returns:
        fp32 ``[N, G]`` clipping maxima (``|w|`` is clamped to them).
    """
    n, k = w.shape
    out = []
    for start in range(0, k, group_size):
        wg = w[:, start : start + group_size].float()  # [N, g]
        xg = x[:, start : start + group_size].float()  # [T, g]
        ref = xg @ wg.t()  # [T, N]
        org_max = wg.abs().amax(dim=1)  # [N]
        best_err = torch.full((n,), math.inf, device=w.device)
        best_max = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            mx = org_max * (1 - i / n_grid)
            cur = torch.clamp(wg, -mx[:, None], mx[:, None])
            s, z = choose_qparams(cur, bits, sym, scale_dtype)  # [N], [N]
            deq = dequantize(quantize(cur, s[:, None], z[:, None], bits), s[:, None], z[:, None])
            err = (xg @ deq.t() - ref).pow(2).mean(dim=0)  # [N]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, mx, best_max)
        out.append(best_max)
    return torch.stack(out, dim=1)  # [N, G]


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w [N, K]`` clamped to ``+-max_val [N, G]`` group-wise."""
    g = group_index(w.shape[1], group_size).long().to(w.device)
    mx = max_val[:, g].to(w.dtype)
    return torch.clamp(w, -mx, mx)


# --- module surgery ------------------------------------------------------------------------

def set_linear_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Write ``w [N, K]`` into a Linear (``[N, K]``) or Conv1D (``[K, N]``), keeping its dtype."""
    data = w if isinstance(module, nn.Linear) else w.t()
    module.weight.data.copy_(data.to(module.weight.dtype))


def fold_inverse_scale(prev: nn.Module, s: torch.Tensor) -> None:
    """Divide the output of ``prev`` by ``s [K]``: a norm's weight (and bias), or the last K
    output rows of a linear (and its bias)."""
    k = s.numel()
    if is_linear(prev):
        w = linear_weight(prev).clone()  # [N_prev, K_prev]
        w[-k:] = w[-k:] / s[:, None].to(w.dtype)
        set_linear_weight(prev, w)
        if prev.bias is not None:
            prev.bias.data[-k:] /= s.to(prev.bias.dtype)
        return
    weight = getattr(prev, "weight", None)
    if weight is None or weight.shape != (k,):
        raise ValueError(f"AWQ cannot fold a scale into {type(prev).__name__}: expected a norm with a weight of "
                         f"shape ({k},); fix the BlockMap in lowbit/methods/awq_maps.py")
    weight.data /= s.to(weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data /= s.to(prev.bias.dtype)


def can_fold(block: nn.Module, group: ScaleGroup) -> bool:
    """Whether ``group``'s scale folds into its ``prev``: a linear must have at least K outputs
    (GQA's v_proj has fewer than o_proj's inputs, so that group is skipped)."""
    prev = block.get_submodule(group.prev)
    k, _ = linear_shape(block.get_submodule(group.linears[0]))
    return not is_linear(prev) or linear_shape(prev)[1] >= k


# --- capture and the quantizer ---------------------------------------------------------------

class _Capture:
    """Inputs of every linear and, per inspected module, its inputs, kwargs and fp outputs."""

    def __init__(self, block: nn.Module, bmap: BlockMap, linears: list[str]) -> None:
        self.linear_inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        self.inspect_inputs: dict[str, list[torch.Tensor]] = {g.inspect: [] for g in bmap.groups}
        self.inspect_kwargs: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {g.inspect: [] for g in bmap.groups}
        self.handles = []
        for name in linears:
            self.handles.append(block.get_submodule(name).register_forward_hook(
                lambda _m, args, _o, n=name: self.linear_inputs[n].append(args[0].detach())))
        for name in self.inspect_inputs:
            mod = block.get_submodule(name)
            self.handles.append(mod.register_forward_pre_hook(
                lambda m, args, kw, n=name: self._pre(n, m, args, kw), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(
                lambda _m, _a, out, n=name: self.outputs[n].append(_first(out).detach())))

    def _pre(self, name: str, module: nn.Module, args: tuple, kw: dict) -> None:
        first = _first_param(module)
        x = args[0] if args else kw[first]
        self.inspect_inputs[name].append(x.detach())
        if name not in self.inspect_kwargs:
            rest = {k: v for k, v in kw.items() if k != first}
            if len(args) > 1:
                raise ValueError(f"AWQ needs {name} called with one positional input; it got {len(args)}")
            self.inspect_kwargs[name] = rest

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _first_param(module: nn.Module) -> str:
    return next(iter(pyinspect.signature(module.forward).parameters))


@QUANTIZERS.register("awq")
class AwqQuantizer(IntGroupedQuantizer[AwqConfig]):
    """AWQ scale and clip search per block (:meth:`prepare_block`), then RTN per linear."""

    requires_calibration = True

    @property
    def sym(self) -> bool:
        return not self.config.zero_point

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        _, blocks = find_blocks(model)
        block_map(type(blocks[0]).__name__)

    def prepare_block(self, block: nn.Module, name: str, linears: dict[str, nn.Module],
                      states: list[torch.Tensor], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """Search and apply AWQ scales and clipping to the block's fp weights, in place; returns
        the fp block's outputs (from the same pass that captures the search inputs), on which the
        next block is calibrated, as AutoAWQ does."""
        bmap = block_map(type(block).__name__)
        groups = [g for g in bmap.groups if can_fold(block, g)]
        cap = _Capture(block, bmap, list(linears))
        try:
            fp_outputs = [_first(block(h, **kwargs)) for h in states]
        finally:
            cap.remove()
        scales = {g: self._search(block, name, g, cap) for g in groups}
        input_scale: dict[str, torch.Tensor] = {}
        for g, s in scales.items():
            fold_inverse_scale(block.get_submodule(g.prev), s)
            for lname in g.linears:
                lin = block.get_submodule(lname)
                set_linear_weight(lin, linear_weight(lin).float() * s)
                input_scale[lname] = s
        for lname in linears:
            if lname in bmap.no_clip or not cap.linear_inputs[lname]:
                continue
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in cap.linear_inputs[lname]])
            x = x[:: max(1, x.shape[0] // CLIP_TOKENS)][:CLIP_TOKENS]
            if lname in input_scale:
                x = x / input_scale[lname]
            w = linear_weight(linears[lname])
            k, _ = linear_shape(linears[lname])
            max_val = search_clip(w, x, self.config.bits, self.group_size(k), self.sym)
            set_linear_weight(linears[lname], apply_clip(w, max_val, self.group_size(k)))
        return fp_outputs

    def _search(self, block: nn.Module, name: str, g: ScaleGroup, cap: _Capture) -> torch.Tensor:
        mods = [block.get_submodule(n) for n in g.linears]
        k, _ = linear_shape(mods[0])
        gs = self.group_size(k)
        xs, kw, ref = cap.inspect_inputs[g.inspect], cap.inspect_kwargs.get(g.inspect, {}), cap.outputs[g.inspect]
        if not xs:
            raise ValueError(f"{name}.{g.inspect} was never called by the block's forward; fix its BlockMap")
        originals = [linear_weight(m).clone() for m in mods]
        x_mean = channel_mean_abs(xs)
        w_mean = weight_mean(torch.cat(originals), gs) if self.config.duo_scaling else None
        inspect = block.get_submodule(g.inspect)

        def loss_of(new: list[torch.Tensor]) -> float:
            for m, w in zip(mods, new):
                set_linear_weight(m, w)
            err = sum((_first(inspect(x, **kw)).float() - r.float()).pow(2).sum().item() for x, r in zip(xs, ref))
            return err / sum(r.numel() for r in ref)

        try:
            s, ratio, losses = search_scale(x_mean, w_mean, originals, loss_of, self.config.bits, gs, self.sym)
        finally:
            for m, w in zip(mods, originals):
                set_linear_weight(m, w)
        if not torch.isfinite(s).all():
            raise ValueError(f"{name}: AWQ scales for {', '.join(g.linears)} are not finite")
        log.debug("%s %s: ratio %.2f, loss %.3g (ratio 0: %.3g)", name, g.linears, ratio, min(losses), losses[0])
        return s.to(originals[0].device)

    def quantize_layer(self, name: str, linear: nn.Module, stats: Stats | None) -> IntGroupedLinear:
        return self.round_to_nearest(name, linear, self.sym, CODE_SCALE_DTYPE)  # already scaled and clipped
