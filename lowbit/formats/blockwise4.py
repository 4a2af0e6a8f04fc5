"""``Blockwise4Linear``: NF4 / FP4 weights with blockwise absmax (bitsandbytes' 4-bit format).

The weight ``W [N, K]`` is flattened row-major and cut into blocks of ``blocksize`` values
(default 64; a last, shorter block when ``blocksize`` does not divide ``N*K``). Each block keeps
its absolute maximum; each value becomes the index of the nearest entry of a 16-entry code table
(NF4 or FP4) after dividing by that maximum.

Buffers (the names of bitsandbytes' ``QuantState``; the bitsandbytes layout
(:mod:`lowbit.checkpoint.layouts.bnb`) only renames them and adds the JSON-in-tensor entry):

=================  ===============  ===========================  ===================================
name               dtype            shape                        meaning
=================  ===============  ===========================  ===================================
weight             quant_storage    ``[ceil(N*K/2)/bytes, 1]``   two codes per byte, element ``2i``
                   (uint8)                                       in the **high** nibble
absmax             fp32, or uint8   ``[B]``                      per-block absmax; uint8 codes of
                   (double quant)                                the nested 8-bit map if nested
quant_map          fp32             ``[16]``                     the NF4 / FP4 code table
nested_absmax      fp32             ``[ceil(B/256)]``            double quant only: absmax of the
                                                                 centred absmax, per 256 blocks
nested_quant_map   fp32             ``[256]``                    double quant only: dynamic 8-bit map
nested_offset      fp32             ``[]``                       double quant only: mean of absmax
bias               model dtype      ``[N]``                      optional
=================  ===============  ===========================  ===================================

``B = ceil(N*K / blocksize)``. Dequantized, ``W.flat[i] = quant_map[code_i] * absmax[i // blocksize]``
with, under double quant, ``absmax[b] = nested_quant_map[absmax_code[b]] * nested_absmax[b // 256]
+ nested_offset``, all in fp32 (bitsandbytes' order of operations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lowbit.formats.base import QuantLinear
from lowbit.formats.packing import pack_nibbles
from lowbit.kernels import KernelImpl, always, register_kernel, triton_gpu_available
from lowbit.kernels import cpu_blockwise4, cpu_dequant, ops, reference
from lowbit.kernels.cpu_int4 import DTYPES as CPU_INT4_DTYPES
from lowbit.kernels.cpu_int4 import CpuInt4, matmul_cpu_int4
from lowbit.kernels.cpu_int4 import available as cpu_int4_available

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.float64)

# NF4: quantiles of N(0, 1) scaled to [-1, 1], exactly as bitsandbytes tabulates them.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# FP4 (E2M1, exponent bias 2) in bit-pattern order; 1000 is a second +0. Divided by the max, 12.
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def code_table(quant_type: str) -> torch.Tensor:
    """The 16-entry fp32 code table of ``"nf4"`` or ``"fp4"`` (index = the 4-bit code)."""
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(_FP4, dtype=torch.float32) / 12.0
    raise ValueError(f"unknown 4-bit quant_type {quant_type!r}; use one of {QUANT_TYPES}")


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic-exponent map (Dettmers 2015) that double quant codes absmax with.

    For exponent ``e = 0..6`` it holds the ``2**e`` midpoints of ``linspace(0.1, 1, 2**e + 1)``
    scaled by ``10**(e-6)``, and their negatives; plus 0 and 1. Sorted fp32 ``[256]``, equal to
    bitsandbytes' ``create_dynamic_map()`` bit for bit.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (e - 6) * mids).tolist()
        values += (-(10 ** (e - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def nearest_code(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index into ``table`` of the nearest entry to each value; a tie goes to the lower entry.

    Args:
        scaled: fp32 values in ``[-1, 1]``.
        table: fp32 ``[C]`` code table, any order (FP4's is not sorted; of equal entries the one
            with the lower index wins ties).
    Returns:
        int64 indices into ``table``, shape of ``scaled``.
    """
    order = torch.argsort(table, stable=True)
    s = table[order]
    mids = (s[:-1] + s[1:]) / 2
    return order[torch.searchsorted(mids, scaled.contiguous(), right=False)]


def quantize_blocks(x: torch.Tensor, table: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of a flat tensor to the nearest entries of ``table``.

    Args:
        x: ``[L]`` any float dtype (computed in fp32).
        table: fp32 code table.
    Returns:
        ``(codes int64 [L], absmax fp32 [ceil(L / blocksize)])``. Full blocks are scaled by the
        reciprocal of their absmax, the last partial block is divided by its absmax (both as
        bitsandbytes does, so codes agree bit for bit); scaled values are clamped to ``[-1, 1]``.
    """
    x = x.reshape(-1).float()
    full = x.numel() - x.numel() % blocksize
    blocks = x[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).reshape(-1)
    if full < x.numel():
        am = x[full:].abs().max()
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, x[full:] / am.clamp(min=1e-38)])
    return nearest_code(scaled.clamp(-1, 1), table), absmax


@dataclass(frozen=True)
class Quantized4:
    """What :func:`quantize_4bit` returns; the tensors of a :class:`Blockwise4Linear`."""

    weight: torch.Tensor  # quant_storage [ceil(N*K/2)/itemsize, 1]
    absmax: torch.Tensor  # fp32 [B], or uint8 [B] with double quant
    quant_map: torch.Tensor  # fp32 [16]
    nested_absmax: torch.Tensor | None  # fp32 [ceil(B/256)]
    nested_quant_map: torch.Tensor | None  # fp32 [256]
    nested_offset: torch.Tensor | None  # fp32 []


def quantize_4bit(w: torch.Tensor, quant_type: str, blocksize: int = 64, double_quant: bool = False,
                  quant_storage: torch.dtype = torch.uint8) -> Quantized4:
    """Quantize ``w`` (any shape, fp16/bf16/fp32) to NF4/FP4 codes, as bitsandbytes'
    ``quantize_4bit(w, blocksize, compress_statistics=double_quant, quant_type, quant_storage)``.

    Double quant centres the per-block absmax on its mean (``nested_offset``) and codes it with
    :func:`dynamic_map` in blocks of 256 values.
    """
    check_geometry(w.numel(), quant_type, blocksize, quant_storage)
    table = code_table(quant_type).to(w.device)
    codes, absmax = quantize_blocks(w, table, blocksize)
    packed = pack_codes(codes, table, quant_storage)
    if not double_quant:
        return Quantized4(packed, absmax, table, None, None, None)
    offset = absmax.mean()
    nested_map = dynamic_map().to(w.device)
    absmax_codes, nested_absmax = quantize_blocks(absmax - offset, nested_map, NESTED_BLOCKSIZE)
    return Quantized4(packed, absmax_codes.to(torch.uint8), table, nested_absmax, nested_map, offset)


def pack_codes(codes: torch.Tensor, table: torch.Tensor, quant_storage: torch.dtype = torch.uint8) -> torch.Tensor:
    """4-bit codes ``[L]`` (indices into ``table``) -> the packed ``weight``
    ``[ceil(L/2)/itemsize, 1]`` of ``quant_storage``; an odd length is padded with the code of 0.0."""
    zero_code = int(nearest_code(torch.zeros(1, device=codes.device), table.to(codes.device)))
    return pack_nibbles(codes.reshape(-1), pad=zero_code).view(quant_storage).unsqueeze(1)


def check_geometry(numel: int, quant_type: str, blocksize: int, quant_storage: torch.dtype) -> None:
    """Raise ``ValueError`` unless a ``numel``-value weight fits the 4-bit format so configured."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown 4-bit quant_type {quant_type!r}; use one of {QUANT_TYPES}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"4-bit blocksize={blocksize} is not supported; use one of {BLOCKSIZES}")
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"bnb_4bit_quant_storage={quant_storage} is not supported; use one of {STORAGE_DTYPES}")
    nbytes = (numel + 1) // 2
    if nbytes % quant_storage.itemsize:
        raise ValueError(f"a weight of {numel} values packs into {nbytes} bytes, not a whole number of "
                         f"{quant_storage} elements; use bnb_4bit_quant_storage=uint8")


class Blockwise4Linear(QuantLinear):
    """NF4 / FP4 linear layer; see the module docstring for its buffers.

    ``compute_dtype`` (None: the input's dtype) is the dtype of the matmul; the output has the
    input's dtype. ``weight_dtype`` is the dtype the weight had when quantized (bitsandbytes
    records it in the checkpoint).
    """

    format = "blockwise4"
    packed_buffers = frozenset({"weight"})  # bnb_4bit_quant_storage may be a float dtype

    def __init__(self, in_features: int, out_features: int, *, quant_type: str, blocksize: int = 64,
                 double_quant: bool = False, bias: bool = False, bias_dtype: torch.dtype = torch.float32,
                 quant_storage: torch.dtype = torch.uint8, weight_dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        numel = in_features * out_features
        check_geometry(numel, quant_type, blocksize, quant_storage)
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.weight_dtype = weight_dtype
        self.compute_dtype = compute_dtype
        nblocks = -(-numel // blocksize)
        kw = {"device": device}
        packed_len = (numel + 1) // 2 // quant_storage.itemsize
        self.register_buffer("weight", torch.zeros(packed_len, 1, dtype=quant_storage, **kw))
        self.register_buffer("absmax", torch.zeros(nblocks, dtype=torch.uint8 if double_quant else torch.float32, **kw))
        self.register_buffer("quant_map", torch.zeros(16, dtype=torch.float32, **kw))
        nested = {"nested_absmax": (-(-nblocks // NESTED_BLOCKSIZE),), "nested_quant_map": (256,), "nested_offset": ()}
        for name, shape in nested.items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float32, **kw) if double_quant else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, **kw) if bias else None)

    @classmethod
    def from_linear(cls, w: torch.Tensor, bias: torch.Tensor | None, *, quant_type: str, blocksize: int = 64,
                    double_quant: bool = False, quant_storage: torch.dtype = torch.uint8,
                    compute_dtype: torch.dtype | None = None) -> "Blockwise4Linear":
        """Quantize a weight ``w [N, K]`` (and keep ``bias [N]`` in its dtype)."""
        n, k = w.shape
        mod = cls(k, n, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                  bias=bias is not None, bias_dtype=bias.dtype if bias is not None else torch.float32,
                  quant_storage=quant_storage, weight_dtype=w.dtype, compute_dtype=compute_dtype, device="meta")
        q = quantize_4bit(w.contiguous(), quant_type, blocksize, double_quant, quant_storage)
        for name in ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset"):
            setattr(mod, name, getattr(q, name))
        mod.bias = None if bias is None else bias.detach().clone()
        return mod

    def dequantize(self) -> torch.Tensor:
        return reference.dequantize_blockwise4(
            self.weight, self.absmax, self.quant_map, self.blocksize, (self.out_features, self.in_features),
            self.nested_absmax, self.nested_quant_map, self.nested_offset)

    def cpu_int4(self) -> CpuInt4 | None:
        """This weight as two planes of 4-bit codes in the layout of PyTorch's CPU int4 kernel, or
        None where they cannot hold it (:func:`~lowbit.kernels.cpu_blockwise4.to_cpu_int4`; held as
        :meth:`~lowbit.formats.base.QuantLinear.held_layout` says): a byte a weight, beside the
        canonical buffers, built when lowbit finishes a model on a CPU
        (:func:`~lowbit.formats.base.prepare_model`), else at the first CPU forward that uses it."""
        b = self._buffers  # not nn.Module.__getattr__: this runs in every CPU forward
        bufs = (b["weight"], b["absmax"], b["quant_map"], b["nested_absmax"], b["nested_quant_map"],
                b["nested_offset"])
        return self.held_layout("cpu_int4", bufs, lambda: cpu_blockwise4.to_cpu_int4(
            *bufs[:3], self.blocksize, (self.out_features, self.in_features), *bufs[3:]))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}")


def _reference_forward(x: torch.Tensor, m: Blockwise4Linear) -> torch.Tensor:
    return reference.matmul_blockwise4(
        x, m.weight, m.absmax, m.quant_map, m.blocksize, (m.out_features, m.in_features),
        m.nested_absmax, m.nested_quant_map, m.nested_offset, m.bias, m.compute_dtype)


def _cpu_int4_supports(m: Blockwise4Linear, x: torch.Tensor) -> bool:
    # the kernel computes in bf16 and has no backward: a gradient to record goes through the reference
    return (x.is_cpu and x.dtype in CPU_INT4_DTYPES and (m.compute_dtype or x.dtype) in CPU_INT4_DTYPES
            and not (x.requires_grad and torch.is_grad_enabled()) and m.cpu_int4() is not None)


def _cpu_int4_forward(x: torch.Tensor, m: Blockwise4Linear) -> torch.Tensor:
    return matmul_cpu_int4(x, m.last_held("cpu_int4"), m.bias)  # checked by the supports of this call


def _triton_supports(m: Blockwise4Linear, x: torch.Tensor) -> bool:
    return x.is_cuda and x.is_floating_point() and (m.compute_dtype or x.dtype) in (torch.float16, torch.bfloat16)


def _triton_forward(x: torch.Tensor, m: Blockwise4Linear) -> torch.Tensor:
    return ops.blockwise4_linear(x, m.weight, m.absmax, m.quant_map, m.nested_absmax, m.nested_quant_map,
                                 m.nested_offset, m.bias, m.blocksize, m.out_features, m.in_features,
                                 m.compute_dtype, m.held_calls)


register_kernel(
    Blockwise4Linear.format,
    KernelImpl("reference", 0, available=always, supports=lambda m, x: x.is_floating_point(), fn=_reference_forward),
)
register_kernel(
    Blockwise4Linear.format,
    KernelImpl("triton", 10, available=triton_gpu_available, supports=_triton_supports, fn=_triton_forward),
)
register_kernel(
    Blockwise4Linear.format,
    # narrows every dtype it takes: the code values themselves are fitted (cpu_blockwise4.FIT_TOLERANCE)
    KernelImpl("cpu-int4", 5, available=cpu_int4_available, supports=_cpu_int4_supports, fn=_cpu_int4_forward,
               narrows=frozenset(CPU_INT4_DTYPES)),
)


def _cpu_dequant_supports(m: Blockwise4Linear, x: torch.Tensor) -> bool:
    return (cpu_dequant.applies(x, m.in_features, cpu_dequant.PLANES_MIN_ROWS)
            and (m.compute_dtype or x.dtype) in cpu_dequant.DTYPES
            and cpu_dequant.blockwise4_applies((m.out_features, m.in_features), m.blocksize))


def _cpu_dequant_forward(x: torch.Tensor, m: Blockwise4Linear) -> torch.Tensor:
    return cpu_dequant.matmul_blockwise4(
        x, m.weight, m.absmax, m.quant_map, m.blocksize, (m.out_features, m.in_features),
        m.nested_absmax, m.nested_quant_map, m.nested_offset, m.bias)


register_kernel(
    Blockwise4Linear.format,
    # above cpu-int4: it takes only inputs of many rows (cpu_dequant.PLANES_MIN_ROWS), where it is
    # faster; it computes in bf16 whatever the compute dtype
    KernelImpl("cpu-dequant", 6, available=always, supports=_cpu_dequant_supports, fn=_cpu_dequant_forward,
               narrows=frozenset(cpu_dequant.DTYPES)),
)
