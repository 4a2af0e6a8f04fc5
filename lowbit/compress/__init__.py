"""Compression baselines that quantization is compared against (pruning), and one entry point for both."""

from __future__ import annotations

from torch import nn

from lowbit.compress.pruning import PruneConfig, prune, save_pruned, sparsity_of

__all__ = ["PruneConfig", "compress", "prune", "save_pruned", "sparsity_of"]


def compress(model: nn.Module, config, calib=None, *, tokenizer=None, device=None, progress: bool = True) -> nn.Module:
    """Prune (a :class:`PruneConfig`) or quantize (a :class:`lowbit.QuantConfig`) ``model`` in
    place; ``calib`` is used only by methods that calibrate."""
    if isinstance(config, PruneConfig):
        return prune(model, config, calib, tokenizer=tokenizer, device=device, progress=progress)
    from lowbit.api import quantize

    return quantize(model, config, calib, tokenizer=tokenizer, device=device, progress=progress)
