"""bitsandbytes-style quantization: LLM.int8 (``load_in_8bit``) and NF4/FP4 (``load_in_4bit``).

Both are data-free: each linear is quantized from its own weight, in the dtype the model holds
it (bitsandbytes quantizes the weight as loaded, so a float16 model gives float16-derived codes).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.config import BitsAndBytesConfig
from lowbit.formats.base import QuantLinear
from lowbit.formats.blockwise4 import Blockwise4Linear, check_geometry
from lowbit.formats.int8_outlier import Int8Linear
from lowbit.methods.base import QUANTIZERS, Quantizer, Stats
from lowbit.methods.walk import default_skips, linear_shape

BLOCKSIZE = 64
"""bitsandbytes' 4-bit block size (transformers' config has no field for it; checkpoints say theirs)."""


def dtype_named(name: str | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """``"float16"`` -> ``torch.float16``; None -> ``default``."""
    return default if name is None else getattr(torch, name)


@QUANTIZERS.register("bitsandbytes")
class BnbQuantizer(Quantizer[BitsAndBytesConfig]):
    """Swaps linears for :class:`Int8Linear` or :class:`Blockwise4Linear`; needs no data."""

    requires_calibration = False

    def validate_environment(self, device: torch.device) -> None:
        if self.config.llm_int8_has_fp16_weight:
            raise ValueError("llm_int8_has_fp16_weight=True keeps fp16 master weights for training, which lowbit "
                             "does not do; leave it False (int8 weights, inference)")

    def skip_modules(self, model: nn.Module) -> set[str]:
        """As transformers: ``llm_int8_skip_modules`` replaces the default skips (the output
        embedding) when given; ``modules_to_not_convert`` is added either way."""
        skip = self.config.llm_int8_skip_modules
        base = default_skips(model) if skip is None else set(skip)
        return base | set(self.config.modules_to_not_convert or ())

    def check_layer(self, name: str, linear: nn.Module) -> None:
        if self.config.load_in_4bit:
            k, n = linear_shape(linear)
            try:
                check_geometry(k * n, self.config.bnb_4bit_quant_type, BLOCKSIZE, self.storage_dtype())
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None

    def storage_dtype(self) -> torch.dtype:
        return dtype_named(self.config.bnb_4bit_quant_storage, torch.uint8)

    def quantize_layer(self, name: str, linear: nn.Module, stats: Stats | None) -> QuantLinear:
        w = self.checked_weight(name, linear)  # [N, K]
        bias = None if linear.bias is None else linear.bias.data
        cfg = self.config
        if cfg.load_in_8bit:
            return Int8Linear.from_linear(w, bias, threshold=cfg.llm_int8_threshold)
        return Blockwise4Linear.from_linear(
            w, bias, quant_type=cfg.bnb_4bit_quant_type, blocksize=BLOCKSIZE,
            double_quant=cfg.bnb_4bit_use_double_quant, quant_storage=self.storage_dtype(),
            compute_dtype=dtype_named(cfg.bnb_4bit_compute_dtype))

    def empty_module(self, name: str, linear: nn.Module, dtype: torch.dtype) -> QuantLinear:
        """The module as this config would make it; the bitsandbytes layout rebuilds 4-bit modules
        whose checkpoint records another block size, storage or dtype."""
        k, n = linear_shape(linear)
        cfg = self.config
        has_bias = linear.bias is not None
        if cfg.load_in_8bit:
            return Int8Linear(k, n, threshold=cfg.llm_int8_threshold, bias=has_bias, bias_dtype=dtype, device="meta")
        return Blockwise4Linear(
            k, n, quant_type=cfg.bnb_4bit_quant_type, blocksize=BLOCKSIZE, double_quant=cfg.bnb_4bit_use_double_quant,
            bias=has_bias, bias_dtype=dtype, quant_storage=self.storage_dtype(), weight_dtype=dtype,
            compute_dtype=dtype_named(cfg.bnb_4bit_compute_dtype), device="meta")
