"""bitsandbytes-style quantization: LLM.int8 (``load_in_8bit``) and NF4/FP4 (``load_in_4bit``).

By default both are data-free, as bitsandbytes is: each linear is quantized from its own weight,
in the dtype the model holds it (bitsandbytes quantizes the weight as loaded, so a float16 model
gives float16-derived codes). With ``rounding="gptq"`` the grid is the same (LLM.int8's row
scales, NF4/FP4's block absmax, chosen from the weight as above), but each code is chosen by
GPTQ's error feedback (:func:`lowbit.methods.gptq.gptq_solve`, in act-order unless
``desc_act=False``) from the layer's input Hessian, so the checkpoint is an ordinary bitsandbytes
one with a smaller output error.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.config import BitsAndBytesConfig
from lowbit.formats.base import QuantLinear
from lowbit.formats.blockwise4 import Blockwise4Linear, check_geometry, nearest_code, pack_codes
from lowbit.formats.int8_outlier import Int8Linear
from lowbit.kernels import reference
from lowbit.methods.base import QUANTIZERS, Quantizer, Stats
from lowbit.methods.gptq import HessianStats, Pending, RoundColumn, act_order, checked_hessian, gptq_solve
from lowbit.methods.walk import default_skips, linear_shape

BLOCKSIZE = 64
"""bitsandbytes' 4-bit block size (transformers' config has no field for it; checkpoints say theirs)."""


def dtype_named(name: str | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """``"float16"`` -> ``torch.float16``; None -> ``default``."""
    return default if name is None else getattr(torch, name)


@QUANTIZERS.register("bitsandbytes")
class BnbQuantizer(Quantizer[BitsAndBytesConfig]):
    """Swaps linears for :class:`Int8Linear` or :class:`Blockwise4Linear`; needs calibration data
    only for ``rounding="gptq"``, which then quantizes true-sequentially (as GPTQ does)."""

    true_sequential = True

    @property
    def requires_calibration(self) -> bool:  # type: ignore[override]
        return self.config.rounding == "gptq"

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

    def collect(self, name: str, linear: nn.Module) -> HessianStats | None:
        return HessianStats.for_linear(linear) if self.requires_calibration else None

    def quantize_layer(self, name: str, linear: nn.Module, stats: Stats | None) -> QuantLinear:
        w = self.checked_weight(name, linear)  # [N, K]
        bias = None if linear.bias is None else linear.bias.data
        cfg = self.config
        if cfg.load_in_8bit:
            mod = Int8Linear.from_linear(w, bias, threshold=cfg.llm_int8_threshold,
                                         int8_activations=cfg.int8_activations)
        else:
            mod = Blockwise4Linear.from_linear(
                w, bias, quant_type=cfg.bnb_4bit_quant_type, blocksize=BLOCKSIZE,
                double_quant=cfg.bnb_4bit_use_double_quant, quant_storage=self.storage_dtype(),
                compute_dtype=dtype_named(cfg.bnb_4bit_compute_dtype))
        if cfg.rounding == "gptq":
            H = checked_hessian(name, stats, w.shape[1])
            solve = dict(order=act_order(H) if cfg.desc_act else None, damp_percent=cfg.damp_percent)
            try:
                if isinstance(mod, Int8Linear):
                    codes, _ = gptq_solve(w, H, int8_rounding(mod.SCB), **solve)
                    mod.weight = codes.to(torch.int8)
                else:
                    codes, _ = gptq_solve(w, H, blockwise4_rounding(mod), **solve)
                    mod.weight = pack_codes(codes, mod.quant_map, mod.weight.dtype)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        return mod

    def empty_module(self, name: str, linear: nn.Module, dtype: torch.dtype) -> QuantLinear:
        """The module as this config would make it; the bitsandbytes layout rebuilds 4-bit modules
        whose checkpoint records another block size, storage or dtype."""
        k, n = linear_shape(linear)
        cfg = self.config
        has_bias = linear.bias is not None
        if cfg.load_in_8bit:
            return Int8Linear(k, n, threshold=cfg.llm_int8_threshold, bias=has_bias, bias_dtype=dtype,
                              int8_activations=cfg.int8_activations, device="meta")
        return Blockwise4Linear(
            k, n, quant_type=cfg.bnb_4bit_quant_type, blocksize=BLOCKSIZE, double_quant=cfg.bnb_4bit_use_double_quant,
            bias=has_bias, bias_dtype=dtype, quant_storage=self.storage_dtype(), weight_dtype=dtype,
            compute_dtype=dtype_named(cfg.bnb_4bit_compute_dtype), device="meta")


def int8_rounding(scb: torch.Tensor) -> RoundColumn:
    """LLM.int8's grid for :func:`gptq_solve`: row ``n``'s codes are ``round(w * 127 / SCB[n])``
    clamped to [-127, 127] (the nearest one, as :func:`~lowbit.formats.int8_outlier.quantize_rows`
    computes it; an all-zero row, ``SCB = 0``, stays 0)."""
    scb = scb.float()  # [N]
    inv = torch.where(scb > 0, 127.0 / scb, 0.0)  # [N]
    step = scb / 127.0  # [N]

    def round_column(col: int, k: int, w: torch.Tensor, pending: Pending) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.clamp(torch.round(w * inv), -127, 127)  # [N]
        return q.to(torch.int32), q * step

    return round_column


def blockwise4_rounding(mod: Blockwise4Linear) -> RoundColumn:
    """NF4/FP4's grid for :func:`gptq_solve`: weight ``(n, k)`` takes the nearest entry of the code
    table to ``w / absmax`` of its block (blocks run over the row-major weight), with the absmax
    as dequantization reads it (decoded, under double quant), times its reciprocal as
    :func:`~lowbit.formats.blockwise4.quantize_blocks` scales full blocks."""
    n, k = mod.out_features, mod.in_features
    absmax = reference.blockwise4_absmax(mod.absmax, mod.nested_absmax, mod.nested_quant_map, mod.nested_offset)
    scale = absmax.repeat_interleave(mod.blocksize)[: n * k].view(n, k)  # [N, K]
    inv = torch.where(scale > 0, 1.0 / scale, 0.0)  # [N, K]
    table = mod.quant_map.float()  # [16]

    def round_column(col: int, k: int, w: torch.Tensor, pending: Pending) -> tuple[torch.Tensor, torch.Tensor]:
        q = nearest_code((w * inv[:, k]).clamp(-1, 1), table)  # [N]
        return q, table[q] * scale[:, k]

    return round_column
