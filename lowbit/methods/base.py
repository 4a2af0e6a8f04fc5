"""The ``Quantizer`` contract and its registry (the role transformers' ``HfQuantizer`` plays).

A quantizer turns one ``nn.Linear`` (or ``Conv1D``) into a :class:`QuantLinear`. Methods that
need calibration statistics return a stats object from :meth:`Quantizer.collect` whose
``add_batch(inputs)`` is fed each calibration input of that linear by the block-wise runner
(:mod:`lowbit.methods.calibration`); the stats are handed to :meth:`quantize_layer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Generic, Protocol, TypeVar

import torch
from torch import nn

from lowbit.config import QuantConfig
from lowbit.formats.base import QuantLinear
from lowbit.registry import Registry

C = TypeVar("C", bound=QuantConfig)


class Stats(Protocol):
    """Calibration statistics of one linear, fed its inputs ``[..., K]`` batch by batch."""

    def add_batch(self, inputs: torch.Tensor) -> None: ...


class Quantizer(ABC, Generic[C]):
    """Validate, choose dtypes, build quantized modules for one method's config."""

    requires_calibration: ClassVar[bool]
    is_serializable: ClassVar[bool] = True
    is_trainable: ClassVar[bool] = True
    """Adapters on a quantized model train: every quantized layer passes the gradient to its input
    (the product with its dequantized weight); the quantized weights themselves stay frozen."""

    def __init__(self, config: C) -> None:
        self.config = config

    def validate_environment(self, device: torch.device) -> None:
        """Raise if this method cannot run on ``device`` (default: runs everywhere)."""

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the model's unquantized parts should use (default: unchanged)."""
        return dtype

    def skip_modules(self, model: nn.Module) -> set[str]:
        """Names of linears left unquantized: the config's plus the defaults."""
        from lowbit.methods.walk import default_skips

        return set(self.config.modules_to_not_convert or ()) | default_skips(model)

    def check_layer(self, name: str, linear: nn.Module) -> None:
        """Raise ``ValueError`` naming ``name`` if the config cannot hold this linear (default: it can)."""

    def checked_weight(self, name: str, linear: nn.Module) -> torch.Tensor:
        """The weight ``[N, K]`` after :meth:`check_layer` and a NaN/Inf check."""
        from lowbit.methods.walk import linear_weight

        self.check_layer(name, linear)
        w = linear_weight(linear)
        if not torch.isfinite(w).all():
            raise ValueError(f"{name}: weight contains NaN or Inf; refusing to quantize it")
        return w

    def check_model(self, model: nn.Module) -> None:
        """:meth:`check_layer` on every linear to be quantized, before any work starts."""
        from lowbit.methods.walk import find_linears

        for name, linear in find_linears(model, self.skip_modules(model)).items():
            self.check_layer(name, linear)

    def prepare_block(self, block: nn.Module, name: str, linears: dict[str, nn.Module],
                      states: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor] | None:
        """Transform the block's full-precision weights before its linears are quantized (AWQ's
        scaling and clipping); ``states`` are its calibration inputs.

        Returns the full-precision block's outputs when the next block should be calibrated on
        them (AWQ), or None to pass on the quantized block's outputs (GPTQ; the default, which
        does nothing).
        """
        return None

    def tunes_blocks(self) -> bool:
        """Whether :meth:`finish_block` wants the full-precision block's outputs (default: no)."""
        return False

    def finish_block(self, block: nn.Module, name: str, states: list[torch.Tensor], kwargs: dict,
                     targets: list[torch.Tensor]) -> None:
        """After the block's linears are quantized: adjust them, given the block's calibration
        inputs ``states`` and the full-precision block's outputs ``targets`` (AQLM's fine-tuning;
        called only when :meth:`tunes_blocks`)."""

    def collect(self, name: str, linear: nn.Module) -> Stats | None:
        """Statistics object gathering this linear's calibration inputs (None: none needed)."""
        return None

    def finish_config(self, model: nn.Module, config: C) -> C:
        """The config to record on the quantized ``model`` (default: ``config`` unchanged); a method
        whose loaders read their own skip list (AQLM) writes it here."""
        return config

    @abstractmethod
    def quantize_layer(self, name: str, linear: nn.Module, stats: Stats | None) -> QuantLinear:
        """The quantized replacement of ``linear``."""

    @abstractmethod
    def empty_module(self, name: str, linear: nn.Module, dtype: torch.dtype) -> QuantLinear:
        """A module with the right buffer shapes and dtypes, on the meta device, to load into."""


QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer for quant_method")
