"""The AutoAWQ GEMM checkpoint layout (AutoAWQ, transformers, vLLM), 4-bit.

Per quantized linear, K inputs, N outputs, group size g (g must divide K, 8 must divide N):

========  =======  ===============  ===================================================
name      dtype    shape            contents
========  =======  ===============  ===================================================
qweight   int32    ``[K, N/8]``     codes packed **along N**, eight per word, interleaved
qzeros    int32    ``[K/g, N/8]``   true zero points (no GPTQ "minus one"), same packing
scales    fp16     ``[K/g, N]``
bias      fp16     ``[N]``          optional
========  =======  ===============  ===================================================

Interleaving: nibble ``i`` (bits ``4i..4i+3``) of word ``j`` holds column ``8j + AWQ_ORDER[i]``
with ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``. There is no ``g_idx`` (groups are contiguous, so
act-order weights cannot be written). Symmetric weights are stored with zero point 8.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.config import AwqConfig
from lowbit.formats.base import modules_of
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.formats.packing import pack_int, unpack_int
from lowbit.methods.affine import group_index

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
BITS = 4


def _column_order(n: int, device: torch.device | None = None) -> torch.Tensor:
    """``perm`` with ``perm[8j + i] = 8j + AWQ_ORDER[i]``: int64 ``[N]``."""
    base = torch.arange(0, n, 8, device=device).repeat_interleave(8)
    return base + torch.tensor(AWQ_ORDER, device=device).repeat(n // 8)


def awq_pack(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes int ``[R, N]`` -> int32 ``[R, N/8]`` in AWQ's interleaved order.

    Example: a row of codes ``[0, 1, 2, 3, 4, 5, 6, 7]`` packs to the word ``0x75316420``.
    """
    return pack_int(q[:, _column_order(q.shape[1], q.device)], BITS, dim=1)


def awq_unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`awq_pack`: int32 ``[R, N/8]`` -> int32 codes ``[R, N]``."""
    u = unpack_int(packed, BITS, n, dim=1)  # u[:, 8j+i] = q[:, perm[8j+i]]
    q = torch.empty_like(u)
    q[:, _column_order(n, packed.device)] = u
    return q


def check_awq_shape(name: str, k: int, n: int, bits: int, group_size: int) -> None:
    """``ValueError`` unless a K -> N layer with these settings fits the GEMM layout."""
    if bits != BITS:
        raise ValueError(f"{name}: the AWQ GEMM layout holds 4-bit weights only, not {bits}-bit; quantize with "
                         "bits=4, or use GPTQ (2/3/4/8-bit) for other widths")
    if k % group_size:
        raise ValueError(f"{name}: group_size={group_size} does not divide in_features={k}; the AWQ GEMM layout "
                         f"needs whole groups (use a group size that divides {k}, e.g. 64 or 32)")
    if n % 8:
        raise ValueError(f"{name}: out_features={n} is not a multiple of 8, which the AWQ GEMM layout packs")


class AwqLayout:
    """Translate :class:`IntGroupedLinear` buffers to and from the AutoAWQ GEMM layout."""

    def to_checkpoint(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                      config: AwqConfig) -> dict[str, torch.Tensor]:
        if config.format != "gemm":
            raise ValueError(f"lowbit writes the AWQ GEMM layout; AwqConfig.format={config.format!r} is read-only")
        out = dict(tensors)
        for name, m in modules_of(model, IntGroupedLinear).items():
            k, n = m.in_features, m.out_features
            check_awq_shape(name, k, n, m.bits, m.group_size)
            if m.is_act_order():
                raise ValueError(f"{name}: act-order (permuted g_idx) weights cannot be stored in the AWQ layout, "
                                 "which has no g_idx")
            q = unpack_int(m.qweight, BITS, k, dim=0)  # [K, N]
            out[f"{name}.qweight"] = awq_pack(q)  # [K, N/8]
            out[f"{name}.qzeros"] = awq_pack(unpack_int(m.qzeros, BITS, n, dim=1))  # [G, N/8]
            del out[f"{name}.g_idx"]
        return out

    def from_checkpoint(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                        config: AwqConfig) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for name, m in modules_of(model, IntGroupedLinear).items():
            if f"{name}.qweight" not in tensors:
                continue  # reported as missing by the strict loader
            k, n = m.in_features, m.out_features
            check_awq_shape(name, k, n, m.bits, m.group_size)
            for buf, want in (("qweight", (k, n // 8)), ("qzeros", (k // m.group_size, n // 8))):
                t = tensors.get(f"{name}.{buf}")
                if t is not None and (tuple(t.shape) != want or t.dtype != torch.int32):
                    raise ValueError(f"{name}.{buf} is {t.dtype} {tuple(t.shape)}; the AWQ GEMM layout of a {k}->{n} "
                                     f"layer with group size {m.group_size} is int32 {want}")
            out[f"{name}.qweight"] = pack_int(awq_unpack(tensors[f"{name}.qweight"], n), BITS, dim=0)  # [K, N] -> [K/8, N]
            if f"{name}.qzeros" in tensors:
                out[f"{name}.qzeros"] = pack_int(awq_unpack(tensors[f"{name}.qzeros"], n), BITS, dim=1)
            out[f"{name}.g_idx"] = group_index(k, m.group_size)
        return out

    def extra_files(self, config: AwqConfig) -> dict[str, str]:
        return {}
