"""Ecosystem checkpoint layouts <-> lowbit's canonical modules, one translator per ``quant_method``.

A :class:`Layout` rewrites the tensors of a model's state dict on the way to disk
(:meth:`Layout.to_checkpoint`) and back (:meth:`Layout.from_checkpoint`), and names extra files
the ecosystem expects beside ``config.json``. Translations are exact: canonical -> layout ->
canonical gives the same tensors bit for bit.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from lowbit.config import QuantConfig
from lowbit.registry import Registry


class Layout(Protocol):
    def to_checkpoint(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                      config: QuantConfig) -> dict[str, torch.Tensor]: ...

    def from_checkpoint(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                        config: QuantConfig) -> dict[str, torch.Tensor]: ...

    def extra_files(self, config: QuantConfig) -> dict[str, str]: ...


class CanonicalLayout:
    """lowbit's own layout: the module buffers as they are (RTN)."""

    def to_checkpoint(self, model, tensors, config):
        return tensors

    def from_checkpoint(self, model, tensors, config):
        return tensors

    def extra_files(self, config):
        return {}


LAYOUTS: Registry[Layout] = Registry("checkpoint layout for quant_method")
LAYOUTS.add("rtn", CanonicalLayout())

from lowbit.checkpoint.layouts.aqlm import AqlmLayout  # noqa: E402
from lowbit.checkpoint.layouts.awq import AwqLayout  # noqa: E402
from lowbit.checkpoint.layouts.bnb import BnbLayout  # noqa: E402
from lowbit.checkpoint.layouts.gptq import GptqLayout  # noqa: E402

LAYOUTS.add("gptq", GptqLayout())
LAYOUTS.add("bitsandbytes", BnbLayout())
LAYOUTS.add("awq", AwqLayout())
LAYOUTS.add("aqlm", AqlmLayout())
