"""The AQLM checkpoint layout, as ``aqlm.QuantizedLinear`` + transformers save it.

Per quantized linear ``p``: ``p.codes`` (int8/int16 ``[N/og, K/ig, C]``), ``p.codebooks``
(``[C, 2**nbits, og, ig]``), ``p.scales`` (``[N/og, 1, 1, 1]``) and ``p.bias``: the buffers of
:class:`~lowbit.formats.codebook.AqlmLinear` under the same names, so writing is the identity.
Reading checks that every code indexes the codebooks, and keeps the checkpoint's float dtype
for codebooks, scales and bias (fp16 in published checkpoints; another float dtype rebuilds the
module in that dtype rather than rounding).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.config import AqlmConfig
from lowbit.formats.base import modules_of
from lowbit.formats.codebook import AqlmLinear, check_codes
from lowbit.methods.walk import set_module


class AqlmLayout:
    """AQLM's layout is :class:`AqlmLinear`'s own; reading validates it."""

    def to_checkpoint(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                      config: AqlmConfig) -> dict[str, torch.Tensor]:
        return tensors

    def from_checkpoint(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                        config: AqlmConfig) -> dict[str, torch.Tensor]:
        for name, m in modules_of(model, AqlmLinear).items():
            codes = tensors.get(f"{name}.codes")
            if codes is not None:
                if codes.dtype != m.codes.dtype:
                    raise ValueError(f"{name}.codes has dtype {codes.dtype}; {m.nbits_per_codebook}-bit codebooks "
                                     f"store codes as {m.codes.dtype}")
                try:
                    check_codes(codes, m.nbits_per_codebook)
                except ValueError as e:
                    raise ValueError(f"{name}.codes: {e}") from None
            books = tensors.get(f"{name}.codebooks")
            if books is not None and books.is_floating_point() and books.dtype != m.dtype:
                set_module(model, name, _rebuilt(m, books.dtype))
        return tensors

    def extra_files(self, config: AqlmConfig) -> dict[str, str]:
        return {}


def _rebuilt(m: AqlmLinear, dtype: torch.dtype) -> AqlmLinear:
    new = AqlmLinear(m.in_features, m.out_features, in_group_size=m.in_group_size, out_group_size=m.out_group_size,
                     num_codebooks=m.num_codebooks, nbits_per_codebook=m.nbits_per_codebook, bias=m.bias is not None,
                     dtype=dtype, device="meta")
    new.kernel = m.kernel
    return new
