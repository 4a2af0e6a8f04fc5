"""One generic layer-walker: find the linears and decoder blocks of any transformers model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2 style ``Conv1D`` (weight stored transposed, ``[K, N]``)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear as ``[N, K]`` (out, in), whichever class holds it."""
    if isinstance(module, nn.Linear):
        return module.weight.data
    return module.weight.data.t()  # Conv1D stores [K, N]


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features K, out_features N)``."""
    n, k = linear_weight(module).shape
    return k, n


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a dotted module name is covered by any pattern.

    A pattern matches whole name components: ``lm_head`` matches ``lm_head`` and
    ``model.lm_head``; ``layers.0`` matches ``model.layers.0.mlp.up_proj``; ``proj`` does not
    match ``up_proj``.
    """
    padded = f".{name}."
    return any(f".{p.strip('.')}." in padded for p in patterns)


def default_skips(model: nn.Module) -> set[str]:
    """Module names never quantized by default: the output embedding (often tied)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, m in model.named_modules() if out is not None and m is out}


def find_linears(root: nn.Module, skip: Iterable[str] = (), prefix: str = "") -> dict[str, nn.Module]:
    """All linears under ``root`` whose full name (``prefix`` + local name) is not skipped.

    Returns a dict from local name (relative to ``root``) to module, in definition order.
    """
    skip = tuple(skip)
    found = {}
    for name, m in root.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (name or prefix)
        if is_linear(m) and not matches(full, skip):
            found[name] = m
    return found


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` under ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder/encoder block list: the ModuleList of same-class blocks with most parameters.

    Raises ``ValueError`` when the model has no such list.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(b) for b in m}) != 1 or not any(is_linear(x) for x in m[0].modules()):
            continue
        size = sum(p.numel() for p in m.parameters())
        if best is None or size > best[0]:
            best = (size, name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks containing linear layers")
    return best[1], best[2]
