"""Quantized linears that read the same input, joined along the output dimension, and split back.

``concat_outputs([q, k, v])`` is one module whose output is ``cat([q(x), k(x), v(x)], -1)``, with
the same stored numbers (so the same outputs, to the rounding of one wider matmul);
``split_outputs(fused, parts)`` gives the original modules back, buffer for buffer. Formats whose
layout cannot be joined without changing numbers refuse with ``ValueError``:

- grouped int (GPTQ, AWQ, RTN): bits, group size, scale dtype and ``g_idx`` must match (q/k/v of
  an act-order checkpoint share ``g_idx``: they see the same inputs); zero points are repacked
  along N.
- LLM.int8: the same outlier threshold, and all with int8 activations or all weight-only.
- NF4/FP4: the same code table, block size and storage; every part but the last must hold whole
  blocks (and whole storage elements). Double-quantized parts must also share the absmax offset
  (``nested_offset``, the mean of each layer's block maxima, is one per layer) and hold whole
  runs of 256 blocks, so in practice double-quantized layers are not joined.
- AQLM: never (each layer has its own codebooks).

A part without a bias gets zeros in the joined bias; ``split_outputs`` drops them again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lowbit.formats.base import QuantLinear
from lowbit.formats.blockwise4 import NESTED_BLOCKSIZE, Blockwise4Linear
from lowbit.formats.int8_outlier import Int8Linear
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.formats.packing import pack_int, unpack_int


@dataclass(frozen=True)
class Part:
    """One of the joined modules: its name (for errors), width and whether it had a bias."""

    name: str
    out_features: int
    has_bias: bool


def _fail(parts: Sequence[str], why: str) -> ValueError:
    return ValueError(f"cannot fuse {', '.join(parts)}: {why}")


def _same(mods: Sequence[QuantLinear], names: Sequence[str], attr: str) -> None:
    values = [getattr(m, attr) for m in mods]
    if any(v != values[0] for v in values[1:]):
        raise _fail(names, f"their {attr} differ ({', '.join(map(str, values))})")


def _joined_bias(mods: Sequence[QuantLinear], names: Sequence[str]) -> torch.Tensor | None:
    biases = [m.bias for m in mods]
    present = [b for b in biases if b is not None]
    if not present:
        return None
    if any(b.dtype != present[0].dtype for b in present):
        raise _fail(names, "their biases have different dtypes")
    like = present[0]
    return torch.cat([b if b is not None else like.new_zeros(m.out_features) for m, b in zip(mods, biases)])


def _slices(parts: Sequence[Part]):
    start = 0
    for p in parts:
        yield p, start, start + p.out_features
        start += p.out_features


def _dtype(t: torch.Tensor | None) -> dict:
    """``bias_dtype`` for a module constructor, from the bias it will hold (None: the default)."""
    return {} if t is None else {"bias_dtype": t.dtype}


def _widths(mods: Sequence[QuantLinear]) -> int:
    return sum(m.out_features for m in mods)


# --- grouped int ---------------------------------------------------------------------------

def _concat_int_grouped(mods: Sequence[IntGroupedLinear], names: Sequence[str]) -> IntGroupedLinear:
    for attr in ("bits", "group_size"):
        _same(mods, names, attr)
    first = mods[0]
    if any(m.scales.dtype != first.scales.dtype for m in mods):
        raise _fail(names, "their scales have different dtypes")
    if any(not torch.equal(m.g_idx, first.g_idx) for m in mods):
        raise _fail(names, "their g_idx differ (act-order layers quantized with different column orders)")
    bias = _joined_bias(mods, names)
    fused = _empty_int_grouped(first, _widths(mods), bias)
    zeros = [unpack_int(m.qzeros, m.bits, m.out_features, dim=1) for m in mods]  # [G, N_i]
    fused.qweight = torch.cat([m.qweight for m in mods], dim=1)  # [K*bits/32, N]
    fused.qzeros = pack_int(torch.cat(zeros, dim=1), first.bits, dim=1)
    fused.scales = torch.cat([m.scales for m in mods], dim=1)  # [G, N]
    fused.g_idx = first.g_idx.clone()
    fused.bias = bias
    return fused


def _empty_int_grouped(like: IntGroupedLinear, out_features: int, bias: torch.Tensor | None) -> IntGroupedLinear:
    return IntGroupedLinear(like.in_features, out_features, bits=like.bits, group_size=like.group_size,
                            bias=bias is not None, scales_dtype=like.scales.dtype, device="meta", **_dtype(bias))


def _split_int_grouped(fused: IntGroupedLinear, parts: Sequence[Part]) -> list[IntGroupedLinear]:
    zeros = unpack_int(fused.qzeros, fused.bits, fused.out_features, dim=1)  # [G, N]
    out = []
    for p, a, b in _slices(parts):
        m = _empty_int_grouped(fused, p.out_features, fused.bias if p.has_bias else None)
        m.qweight = fused.qweight[:, a:b].contiguous()
        m.qzeros = pack_int(zeros[:, a:b], fused.bits, dim=1)
        m.scales = fused.scales[:, a:b].contiguous()
        m.g_idx = fused.g_idx.clone()
        m.bias = fused.bias[a:b].clone() if p.has_bias else None
        out.append(m)
    return out


# --- LLM.int8 ------------------------------------------------------------------------------

def _concat_int8(mods: Sequence[Int8Linear], names: Sequence[str]) -> Int8Linear:
    _same(mods, names, "threshold")
    _same(mods, names, "int8_activations")
    bias = _joined_bias(mods, names)
    fused = _empty_int8(mods[0], _widths(mods), bias)
    fused.weight = torch.cat([m.weight for m in mods])  # [N, K] int8
    fused.SCB = torch.cat([m.SCB for m in mods])
    fused.weight_format = mods[0].weight_format.clone()
    fused.bias = bias
    return fused


def _empty_int8(like: Int8Linear, out_features: int, bias: torch.Tensor | None) -> Int8Linear:
    return Int8Linear(like.in_features, out_features, threshold=like.threshold, bias=bias is not None,
                      int8_activations=like.int8_activations, device="meta", **_dtype(bias))


def _split_int8(fused: Int8Linear, parts: Sequence[Part]) -> list[Int8Linear]:
    out = []
    for p, a, b in _slices(parts):
        m = _empty_int8(fused, p.out_features, fused.bias if p.has_bias else None)
        m.weight = fused.weight[a:b].clone()
        m.SCB = fused.SCB[a:b].clone()
        m.weight_format = fused.weight_format.clone()
        m.bias = fused.bias[a:b].clone() if p.has_bias else None
        out.append(m)
    return out


# --- NF4 / FP4 -----------------------------------------------------------------------------

def _check_blockwise4(mods: Sequence[Blockwise4Linear], names: Sequence[str]) -> None:
    for attr in ("quant_type", "blocksize", "double_quant", "compute_dtype", "weight_dtype"):
        _same(mods, names, attr)
    first = mods[0]
    if any(m.weight.dtype != first.weight.dtype for m in mods):
        raise _fail(names, "their quant_storage dtypes differ")
    step = first.blocksize * (NESTED_BLOCKSIZE if first.double_quant else 1)
    unit = max(step, 2 * first.weight.element_size())
    for name, m in zip(names[:-1], mods[:-1]):
        if (m.in_features * m.out_features) % unit:
            raise _fail(names, f"{name} holds {m.in_features * m.out_features} values, not whole runs of {unit} "
                               "(blocks would straddle two layers)")
    if first.double_quant and any(not torch.equal(m.nested_offset, first.nested_offset) for m in mods):
        raise _fail(names, "they are double-quantized with different absmax offsets (one per layer); "
                           "quantize with bnb_4bit_use_double_quant=False to fuse")


def _concat_blockwise4(mods: Sequence[Blockwise4Linear], names: Sequence[str]) -> Blockwise4Linear:
    _check_blockwise4(mods, names)
    first = mods[0]
    bias = _joined_bias(mods, names)
    fused = _empty_blockwise4(first, _widths(mods), bias)
    fused.weight = torch.cat([m.weight.reshape(-1) for m in mods]).reshape(-1, 1)
    fused.absmax = torch.cat([m.absmax for m in mods])
    fused.quant_map = first.quant_map.clone()
    if first.double_quant:
        fused.nested_absmax = torch.cat([m.nested_absmax for m in mods])
        fused.nested_quant_map = first.nested_quant_map.clone()
        fused.nested_offset = first.nested_offset.clone()
    fused.bias = bias
    return fused


def _empty_blockwise4(like: Blockwise4Linear, out_features: int, bias: torch.Tensor | None) -> Blockwise4Linear:
    return Blockwise4Linear(like.in_features, out_features, quant_type=like.quant_type, blocksize=like.blocksize,
                            double_quant=like.double_quant, bias=bias is not None, quant_storage=like.weight.dtype,
                            weight_dtype=like.weight_dtype, compute_dtype=like.compute_dtype, device="meta",
                            **_dtype(bias))


def _split_blockwise4(fused: Blockwise4Linear, parts: Sequence[Part]) -> list[Blockwise4Linear]:
    k, out = fused.in_features, []
    per_element = 2 * fused.weight.element_size()  # codes per storage element
    at = {"weight": 0, "absmax": 0, "nested_absmax": 0}
    for p, a, b in _slices(parts):
        m = _empty_blockwise4(fused, p.out_features, fused.bias if p.has_bias else None)
        numel = p.out_features * k
        sizes = {"weight": -(-numel // per_element), "absmax": -(-numel // fused.blocksize)}
        if fused.double_quant:
            sizes["nested_absmax"] = -(-sizes["absmax"] // NESTED_BLOCKSIZE)
            m.nested_quant_map = fused.nested_quant_map.clone()
            m.nested_offset = fused.nested_offset.clone()
        for name, size in sizes.items():
            flat = getattr(fused, name).reshape(-1)
            setattr(m, name, flat[at[name]:at[name] + size].clone())
            at[name] += size
        m.weight = m.weight.reshape(-1, 1)
        m.quant_map = fused.quant_map.clone()
        m.bias = fused.bias[a:b].clone() if p.has_bias else None
        out.append(m)
    return out


_JOIN: dict[type, tuple[Callable, Callable]] = {
    IntGroupedLinear: (_concat_int_grouped, _split_int_grouped),
    Int8Linear: (_concat_int8, _split_int8),
    Blockwise4Linear: (_concat_blockwise4, _split_blockwise4),
}


def concat_outputs(mods: Sequence[QuantLinear], names: Sequence[str]) -> QuantLinear:
    """One module computing ``cat([m(x) for m in mods], -1)`` from the same stored numbers.

    Args:
        mods: two or more quantized linears of one class with the same ``in_features``.
        names: their names, for error messages.
    Raises:
        ValueError: naming the modules and why they cannot be joined.
    """
    if len(mods) < 2:
        raise _fail(names, "fusion needs two or more modules")
    kinds = {type(m) for m in mods}
    if len(kinds) > 1:
        raise _fail(names, f"they are stored in different formats ({', '.join(sorted(k.__name__ for k in kinds))})")
    kind = kinds.pop()
    if kind not in _JOIN:
        why = ("each AQLM layer has its own codebooks" if kind.format == "codebook"
               else f"the {kind.__name__} format has no joined layout")
        raise _fail(names, why)
    _same(mods, names, "in_features")
    fused = _JOIN[kind][0](mods, names)
    fused.kernel = mods[0].kernel
    return fused


def split_outputs(fused: QuantLinear, parts: Sequence[Part]) -> list[QuantLinear]:
    """The modules :func:`concat_outputs` joined, buffer for buffer (``parts`` in the same order)."""
    if sum(p.out_features for p in parts) != fused.out_features:
        raise ValueError(f"parts of {sum(p.out_features for p in parts)} outputs do not split "
                         f"{fused.out_features}")
    mods = _JOIN[type(fused)][1](fused, parts)
    for m in mods:
        m.kernel = fused.kernel
    return mods
