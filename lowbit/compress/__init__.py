"""Compression baselines that quantization is compared against (pruning, distillation), and one
entry point for all of them."""

from __future__ import annotations

from torch import nn

from lowbit.compress.distill import DistillConfig, distill, save_distilled
from lowbit.compress.pruning import PruneConfig, prune, save_pruned, sparsity_of

__all__ = ["DistillConfig", "PruneConfig", "compress", "distill", "prune", "save_distilled", "save_pruned",
           "sparsity_of"]


def compress(model: nn.Module, config, calib=None, *, tokenizer=None, device=None, progress: bool = True,
             losses: list[float] | None = None) -> nn.Module:
    """Prune (a :class:`PruneConfig`), distill (a :class:`DistillConfig`) or quantize (a
    :class:`lowbit.QuantConfig`) ``model`` in place; ``calib`` is used only by methods that
    calibrate or train. Distillation appends its training loss per step to ``losses``."""
    if isinstance(config, PruneConfig):
        return prune(model, config, calib, tokenizer=tokenizer, device=device, progress=progress)
    if isinstance(config, DistillConfig):
        return distill(model, config, calib, tokenizer=tokenizer, device=device, progress=progress, losses=losses)
    from lowbit.api import quantize

    return quantize(model, config, calib, tokenizer=tokenizer, device=device, progress=progress)
