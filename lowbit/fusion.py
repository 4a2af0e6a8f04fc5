"""Fused projections: q/k/v (and gate/up) of a block run as one quantized matmul.

Decode multiplies one token by every projection of every layer; each is a small, launch-bound
call. :func:`fuse` joins the quantized linears of a group that read the same input (see
:mod:`lowbit.formats.concat`) into one :class:`FusedLinears`, registered on their parent as
``fused_<names>``, and puts a :class:`FusedPart` in each original slot. The model's own forward is
unchanged: the first part called computes the joined product and keeps it, the others take their
slice of it when called on the same input tensor (the same object, not written in place between
the calls, as transformers' blocks do), and the product is dropped once every part has taken its
slice. A part called on another input (a model that does not feed q/k/v the same
tensor) computes the joined product again: slower, never wrong.

The checkpoint never changes: :func:`unfused` splits the groups back for saving, and
:func:`lowbit.save_quantized` uses it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from lowbit.formats.base import QuantLinear
from lowbit.formats.concat import Part, concat_outputs, split_outputs

DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""The groups :func:`fuse` looks for by default (transformers' names in Llama-family blocks)."""


class FusedLinears(nn.Module):
    """The joined quantized linear of one group and the bookkeeping of its parts' slices."""

    def __init__(self, linear: QuantLinear, parts: Sequence[Part]) -> None:
        super().__init__()
        self.linear = linear
        self.parts = tuple(parts)
        self._sizes = [p.out_features for p in parts]
        self._pending: tuple[torch.Tensor, tuple[torch.Tensor, ...], int] | None = None

    def slice_for(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Part ``index``'s output for input ``x`` (``[..., K] -> [..., N_index]``)."""
        pending = self._pending
        if pending is None or pending[0] is not x:
            outs = self.linear(x).split(self._sizes, dim=-1)
            pending = (x, outs, 0)
        left = pending[2] + 1
        self._pending = None if left == len(self._sizes) else (pending[0], pending[1], left)
        return pending[1][index]

    def extra_repr(self) -> str:
        return "parts=" + ", ".join(f"{p.name}({p.out_features})" for p in self.parts)


class FusedPart(nn.Module):
    """Stands in for one linear of a fused group: its slice of the group's product."""

    def __init__(self, group: FusedLinears, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "group", group)  # not a child: the group is registered once, on the parent
        self.index = index
        part = group.parts[index]
        self.in_features, self.out_features = group.linear.in_features, part.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.slice_for(self.index, x)

    def extra_repr(self) -> str:
        return f"part {self.index} of {self.group.parts[self.index].name}"


def fused_name(names: Sequence[str]) -> str:
    return "fused_" + "_".join(names)


def fuse(model: nn.Module, groups: Sequence[Sequence[str]] | None = None, *, strict: bool = False) -> list[str]:
    """Join each group of sibling quantized linears in ``model``; return the fused modules' names.

    Args:
        groups: child names to join, e.g. ``[("q_proj", "k_proj", "v_proj")]`` (default
            :data:`DEFAULT_GROUPS`). A parent module holding every name of a group as quantized
            linears gets them fused.
        strict: raise ``ValueError`` when a group is found nowhere in the model (set for groups
            the user named).
    Raises:
        ValueError: a group found whose modules cannot be joined (naming them and why), or, with
            ``strict``, a group that matches no module.
    """
    groups = [tuple(g) for g in (DEFAULT_GROUPS if groups is None else groups)]
    for g in groups:
        if len(g) < 2 or len(set(g)) != len(g) or not all(isinstance(n, str) and n and "." not in n for n in g):
            raise ValueError(f"fusion group {g!r} must name two or more distinct child modules (no dots)")
    found: list[str] = []
    for g in groups:
        hits = [(name, parent) for name, parent in model.named_modules()
                if all(isinstance(getattr(parent, n, None), QuantLinear) for n in g)]
        if strict and not hits:
            raise ValueError(f"modules_to_fuse: no module of the model has quantized linears named {', '.join(g)}")
        for name, parent in hits:
            found.append(_fuse_group(parent, name, g))
    return found


def _fuse_group(parent: nn.Module, parent_name: str, names: tuple[str, ...]) -> str:
    mods = [getattr(parent, n) for n in names]
    full = [f"{parent_name}.{n}" if parent_name else n for n in names]
    linear = concat_outputs(mods, full)
    group = FusedLinears(linear, [Part(n, m.out_features, m.bias is not None) for n, m in zip(names, mods)])
    parent.add_module(fused_name(names), group)
    for i, n in enumerate(names):
        setattr(parent, n, FusedPart(group, i))
    return f"{parent_name}.{fused_name(names)}" if parent_name else fused_name(names)


def _fused_groups(model: nn.Module) -> list[tuple[nn.Module, str, FusedLinears]]:
    return [(parent, child, mod) for parent in model.modules() for child, mod in parent.named_children()
            if isinstance(mod, FusedLinears)]


def unfuse(model: nn.Module) -> None:
    """Split every fused group of ``model`` back into its linears, in place."""
    for parent, child, group in _fused_groups(model):
        _split_group(parent, child, group)


def _split_group(parent: nn.Module, child: str, group: FusedLinears) -> None:
    for part, mod in zip(group.parts, split_outputs(group.linear, group.parts)):
        setattr(parent, part.name, mod)
    delattr(parent, child)


@contextlib.contextmanager
def unfused(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its fused groups split for the duration (for saving), then put back as they were."""
    taken = _fused_groups(model)
    restore = [(parent, child, group, [(p.name, getattr(parent, p.name)) for p in group.parts])
               for parent, child, group in taken]
    for parent, child, group in taken:
        _split_group(parent, child, group)
    try:
        yield model
    finally:
        for parent, child, group, slots in restore:
            for name, mod in slots:
                setattr(parent, name, mod)
            parent.add_module(child, group)


def awq_groups(modules_to_fuse: Mapping) -> list[tuple[str, ...]]:
    """The projection groups of AutoAWQ's ``modules_to_fuse`` (``{"attention": [q, k, v, o],
    "mlp": [gate, up, down], ...}``): q/k/v and gate/up."""
    groups = []
    for key, count in (("attention", 3), ("mlp", 2)):
        names = modules_to_fuse.get(key)
        if names is None:
            continue
        if not isinstance(names, (list, tuple)) or len(names) < count or not all(isinstance(n, str) for n in names):
            raise ValueError(f"modules_to_fuse[{key!r}] must list at least {count} module names, got {names!r}")
        groups.append(tuple(names[:count]))
    if not groups:
        raise ValueError("modules_to_fuse names no 'attention' or 'mlp' modules to fuse")
    return groups
