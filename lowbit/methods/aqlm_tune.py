"""AQLM's block fine-tuning: codebooks and scales tuned against the full-precision block.

Once every linear of a block is quantized, the codes stay fixed and the codebooks and scales
(fp32 copies) are trained by Adam so that the quantized block's outputs match the
full-precision block's on the calibration windows, as the AQLM paper's block-wise fine-tuning
does. The rest of the block is frozen. :class:`lowbit.methods.aqlm.AqlmQuantizer` calls
:func:`finetune_block` from the block runner when ``AqlmConfig.finetune_steps > 0``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lowbit.formats.codebook import AqlmLinear
from lowbit.kernels.reference import dequantize_codebook

log = logging.getLogger(__name__)


def _detached(value):
    """``value`` with every tensor in it (nested in tuples, lists, dicts) cloned out of inference
    mode, so that autograd may save it."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def _trainable(block: nn.Module, layers: list[AqlmLinear]) -> Iterator[list[tuple[AqlmLinear, nn.Parameter, nn.Parameter]]]:
    """For the duration: the block's own parameters frozen, and each layer computing with fp32
    parameter copies of its codebooks ``[C, 2**nbits, og, ig]`` and scales ``[N/og, 1, 1, 1]``
    (dequantized by the reference, differentiable in both). Yields (layer, codebooks, scales)."""
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    tuned = []
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for m in layers:
            books = nn.Parameter(m.codebooks.detach().clone().float())
            scales = nn.Parameter(m.scales.detach().clone().float())
            codes = m.codes.detach().clone()
            bias = None if m.bias is None else m.bias.detach().clone()

            def forward(x, codes=codes, books=books, scales=scales, bias=bias):
                w = dequantize_codebook(codes, books, scales)  # fp32 [N, K]
                return nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

            m.forward = forward
            tuned.append((m, books, scales))
        yield tuned
    finally:
        for m, _, _ in tuned:
            del m.forward
        for p, flag in frozen:
            p.requires_grad_(flag)


def _block_error(block: nn.Module, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], kwargs: dict,
                 idx: Sequence[int]) -> torch.Tensor:
    """``sum ||block(x) - y||^2 / sum ||y||^2`` over the windows ``idx`` (a scalar, differentiable)."""
    num = den = 0.0
    for i in idx:
        out = block(xs[i], **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        num = num + ((out.float() - ys[i].float()) ** 2).sum()
        den = den + (ys[i].float() ** 2).sum()
    return num / den


def finetune_block(block: nn.Module, states: list[torch.Tensor], kwargs: dict, targets: list[torch.Tensor],
                   steps: int, lr: float, batch_size: int, seed: int = 0) -> tuple[float, float]:
    """Tune the codebooks and scales of ``block``'s :class:`AqlmLinear` layers, codes fixed.

    Adam (``lr``, betas 0.9/0.95) for ``steps`` steps on :func:`_block_error`, ``batch_size``
    windows of ``states`` (the block's inputs, each ``[1, T, H]``) a step, drawn with ``seed``;
    ``targets`` are the full-precision block's outputs on them. The tuned values are rounded back
    to the layers' dtypes; if the error over all windows rose, the layers keep their values.

    Returns the relative error over all windows before and after (NaN, NaN when nothing is tuned).
    """
    layers = [m for m in block.modules() if isinstance(m, AqlmLinear)]
    if not layers or steps == 0:
        return float("nan"), float("nan")
    everything = range(len(states))
    with torch.inference_mode(False), torch.enable_grad():
        xs, ys, kw = _detached(states), _detached(targets), _detached(kwargs)
        with _trainable(block, layers) as tuned:
            with torch.no_grad():
                before = float(_block_error(block, xs, ys, kw, everything))
            opt = torch.optim.Adam([t for _, b, s in tuned for t in (b, s)], lr=lr, betas=(0.9, 0.95))
            gen = torch.Generator().manual_seed(seed)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                _block_error(block, xs, ys, kw, torch.randperm(len(xs), generator=gen)[:batch_size].tolist()).backward()
                opt.step()
            with torch.no_grad():
                after = float(_block_error(block, xs, ys, kw, everything))
            values = [(m, b.detach().to(m.codebooks.dtype), s.detach().to(m.scales.dtype)) for m, b, s in tuned]
    if not after <= before:  # a step size too large for this block: keep what the solver found
        log.warning("block fine-tuning raised the block's error (%.4g -> %.4g); keeping the untuned values",
                    before, after)
        return before, before
    for m, books, scales in values:  # in inference mode if the buffers were made in it (the block runner)
        with torch.inference_mode(m.codebooks.is_inference()), torch.no_grad():
            m.codebooks.copy_(books)
            m.scales.copy_(scales)
    return before, after
