"""``AqlmLinear``: additive multi-codebook weights (AQLM).

The weight ``W [N, K]`` is cut into groups of ``out_group_size`` (og) rows x ``in_group_size``
(ig) columns. Each group is the sum of ``num_codebooks`` (C) codewords, one from each codebook of
``2**nbits_per_codebook`` entries, times a scale per output group. The buffers are AQLM's own
layout (``aqlm.QuantizedLinear``), which transformers saves as is:

=========  ===========  ==============================  =====================================
name       dtype        shape                           meaning
=========  ===========  ==============================  =====================================
codes      int8/int16   ``[N/og, K/ig, C]``             codeword index per group and codebook,
                                                        ``nbits``-bit, stored signed (below)
codebooks  fp16 (any    ``[C, 2**nbits, og, ig]``       the codewords
           float)
scales     as codebooks ``[N/og, 1, 1, 1]``             one scale per output group
bias       as codebooks ``[N]``                         optional
=========  ===========  ==============================  =====================================

Codes are stored in the smallest signed integer dtype that holds ``nbits`` bits (int8 up to 8,
int16 up to 16); an index ``j >= 2**(nbits-1)`` is stored as ``j - 2**nbits`` and read modulo
``2**nbits`` (:func:`lowbit.kernels.reference.unpack_codes`). Bits per weight are
``C * nbits / (og * ig)`` for the codes plus the codebooks' share, which is large on small
layers (a 1x16 codebook is ``65536 * og * ig`` values).

Kernels: the reference everywhere; on a GPU, Triton (:mod:`lowbit.kernels.triton_codebook`); on
a CPU, ``cpu-codebook`` (:mod:`lowbit.kernels.cpu_codebook`: table lookups up to 8 rows, a faster
dequantize above; fp32, one output per group) and, from 9 rows of fp32 or bf16 inputs,
``cpu-dequant`` (:mod:`lowbit.kernels.cpu_dequant`: the weight dequantized to bf16, then a bf16
product).
"""

from __future__ import annotations

import torch

from lowbit.formats.base import QuantLinear
from lowbit.kernels import KernelImpl, always, register_kernel, triton_gpu_available
from lowbit.kernels import cpu_codebook, cpu_dequant, ops, reference

MAX_NBITS = 16


def code_dtype(nbits: int) -> torch.dtype:
    """The dtype AQLM stores ``nbits``-bit codes in: int8 up to 8 bits, int16 up to 16."""
    if not 1 <= nbits <= MAX_NBITS:
        raise ValueError(f"nbits_per_codebook={nbits} is not supported; use 1 to {MAX_NBITS}")
    return torch.int8 if nbits <= 8 else torch.int16


def pack_codes(idx: torch.Tensor, nbits: int) -> torch.Tensor:
    """Indices in ``[0, 2**nbits)`` (any int dtype) -> AQLM's signed storage (see the module docstring)."""
    idx = idx.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 1 << nbits):
        raise ValueError(f"codebook indices must lie in [0, {1 << nbits}), got [{int(idx.min())}, {int(idx.max())}]")
    return torch.where(idx >= 1 << (nbits - 1), idx - (1 << nbits), idx).to(code_dtype(nbits))


def check_codes(codes: torch.Tensor, nbits: int) -> None:
    """Raise ``ValueError`` when stored codes cannot be ``nbits``-bit indices: the signed form
    lies in ``[-2**(nbits-1), 2**(nbits-1))``; unsigned ``[0, 2**nbits)`` is accepted too (both
    read the same modulo ``2**nbits``)."""
    if not codes.numel():
        return
    lo, hi = int(codes.min()), int(codes.max())
    if lo < -(1 << (nbits - 1)) or hi >= 1 << nbits:
        raise ValueError(f"codes range over [{lo}, {hi}], outside the {1 << nbits} entries of "
                         f"{nbits}-bit codebooks")


def check_geometry(in_features: int, out_features: int, *, in_group_size: int, out_group_size: int,
                   num_codebooks: int, nbits_per_codebook: int) -> None:
    """Raise ``ValueError`` unless a ``[out_features, in_features]`` weight fits the format so configured."""
    code_dtype(nbits_per_codebook)
    if num_codebooks < 1:
        raise ValueError(f"num_codebooks={num_codebooks} must be at least 1")
    if in_group_size < 1 or in_features % in_group_size:
        raise ValueError(f"in_group_size={in_group_size} does not divide in_features={in_features}")
    if out_group_size < 1 or out_features % out_group_size:
        raise ValueError(f"out_group_size={out_group_size} does not divide out_features={out_features}")


class AqlmLinear(QuantLinear):
    """Additive-codebook linear layer; see the module docstring for its buffers.

    ``dtype`` is that of the codebooks, scales and bias (fp16 in AQLM checkpoints); the forward
    computes in the input's dtype.
    """

    format = "codebook"

    def __init__(self, in_features: int, out_features: int, *, in_group_size: int = 8, out_group_size: int = 1,
                 num_codebooks: int = 1, nbits_per_codebook: int = 16, bias: bool = False,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        check_geometry(in_features, out_features, in_group_size=in_group_size, out_group_size=out_group_size,
                       num_codebooks=num_codebooks, nbits_per_codebook=nbits_per_codebook)
        self.in_group_size = in_group_size
        self.out_group_size = out_group_size
        self.num_codebooks = num_codebooks
        self.nbits_per_codebook = nbits_per_codebook
        go, gi = out_features // out_group_size, in_features // in_group_size
        kw = {"device": device}
        self.register_buffer("codes", torch.zeros(go, gi, num_codebooks, dtype=code_dtype(nbits_per_codebook), **kw))
        self.register_buffer("codebooks", torch.zeros(num_codebooks, 1 << nbits_per_codebook, out_group_size,
                                                      in_group_size, dtype=dtype, **kw))
        self.register_buffer("scales", torch.zeros(go, 1, 1, 1, dtype=dtype, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)

    @classmethod
    def from_quantized(cls, idx: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None, dtype: torch.dtype = torch.float16) -> "AqlmLinear":
        """The module for indices ``idx`` ``[N/og, K/ig, C]`` in ``[0, 2**nbits)``, ``codebooks``
        ``[C, 2**nbits, og, ig]`` and ``scales`` ``[N/og]`` (any float dtype; stored as ``dtype``)."""
        n_codebooks, size, og, ig = codebooks.shape
        nbits = size.bit_length() - 1
        if size != 1 << nbits:
            raise ValueError(f"codebooks have {size} entries, not a power of two")
        go, gi, _ = idx.shape
        mod = cls(gi * ig, go * og, in_group_size=ig, out_group_size=og, num_codebooks=n_codebooks,
                  nbits_per_codebook=nbits, bias=bias is not None, dtype=dtype, device="meta")
        mod.codes = pack_codes(idx, nbits)
        mod.codebooks = codebooks.detach().to(dtype).contiguous()
        mod.scales = scales.detach().to(dtype).reshape(go, 1, 1, 1).contiguous()
        mod.bias = None if bias is None else bias.detach().to(dtype).clone()
        return mod

    @property
    def dtype(self) -> torch.dtype:
        return self.codebooks.dtype

    def bits_per_weight(self) -> float:
        """Stored bits per weight: codes, codebooks and scales (the bias left out)."""
        bits = sum(t.numel() * t.element_size() * 8 for t in (self.codes, self.codebooks, self.scales))
        return bits / (self.in_features * self.out_features)

    def dequantize(self) -> torch.Tensor:
        return reference.dequantize_codebook(self.codes, self.codebooks, self.scales)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, scheme={self.num_codebooks}x{self.nbits_per_codebook}, "
                f"groups={self.out_group_size}x{self.in_group_size}")


def _reference_forward(x: torch.Tensor, m: AqlmLinear) -> torch.Tensor:
    return reference.matmul_codebook(x, m.codes, m.codebooks, m.scales, m.bias)


def _cpu_supports(m: AqlmLinear, x: torch.Tensor) -> bool:
    return x.is_cpu and x.is_floating_point() and cpu_codebook.supports(m.codebooks)


def _cpu_forward(x: torch.Tensor, m: AqlmLinear) -> torch.Tensor:
    return cpu_codebook.matmul_codebook(x, m.codes, m.codebooks, m.scales, m.bias)


def _cpu_dequant_supports(m: AqlmLinear, x: torch.Tensor) -> bool:
    return cpu_dequant.applies(x, m.in_features, cpu_dequant.CODEBOOK_MIN_ROWS) and cpu_codebook.supports(m.codebooks)


def _cpu_dequant_forward(x: torch.Tensor, m: AqlmLinear) -> torch.Tensor:
    return cpu_dequant.matmul_codebook(x, m.codes, m.codebooks, m.scales, m.bias)


def _triton_supports(m: AqlmLinear, x: torch.Tensor) -> bool:
    from lowbit.kernels.triton_codebook import supports

    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and supports(m.codebooks)


def _triton_forward(x: torch.Tensor, m: AqlmLinear) -> torch.Tensor:
    return ops.codebook_linear(x, m.codes, m.codebooks, m.scales, m.bias, m.held_calls)


register_kernel(
    AqlmLinear.format,
    KernelImpl("reference", 0, available=always, supports=lambda m, x: x.is_floating_point(), fn=_reference_forward),
)
register_kernel(
    AqlmLinear.format,
    KernelImpl("triton", 10, available=triton_gpu_available, supports=_triton_supports, fn=_triton_forward),
)
register_kernel(
    AqlmLinear.format,
    KernelImpl("cpu-codebook", 5, available=always, supports=_cpu_supports, fn=_cpu_forward),
)
register_kernel(
    AqlmLinear.format,
    # above cpu-codebook from 9 rows (its table lookups take up to 8): the same dequantize in bf16,
    # then a bf16 product; fp32 inputs are rounded to bf16, so exact_kernels() passes over it
    KernelImpl("cpu-dequant", 6, available=always, supports=_cpu_dequant_supports, fn=_cpu_dequant_forward,
               narrows=frozenset({torch.float32})),
)
