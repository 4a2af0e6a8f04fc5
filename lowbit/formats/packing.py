"""Pure pack/unpack of small unsigned integers into int32 words.

Every bit width uses one rule: the values along the packed dimension form a little-endian
bit stream, value ``i`` occupying bits ``[bits*i, bits*(i+1))`` of the stream, and the stream
is cut into 32-bit words. For 2, 4 and 8 bits a word holds ``32 // bits`` whole values; for
3 bits a value may straddle two words (32 values fill exactly 3 words). This is the layout
AutoGPTQ/GPTQModel use for ``qweight`` (packed along K) and ``qzeros`` (packed along N),
3-bit included.

Worked example (4 bits, packed along dim 0, one column)::

    q = [1, 2, 3, 4, 5, 6, 7, 8]          # uint4 values, shape [8, 1]
    pack_int(q, 4, dim=0) == [[0x87654321]]  # as int32: -2023406815

Words are stored as ``torch.int32`` (two's complement), so a word with its top bit set is
negative; unpacking masks accordingly. A packed dimension whose length is not a multiple of
the values-per-word count is padded with zeros; unpack takes the original length back.

bitsandbytes' 4-bit weights use another rule, bytes with the first value in the high nibble:
:func:`pack_nibbles` / :func:`unpack_nibbles`.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} cannot be packed; use one of {SUPPORTED_BITS}")


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` values of ``bits`` bits (zero-padded)."""
    _check_bits(bits)
    return (n * bits + 31) // 32


def pack_int(q: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers along ``dim`` into int32 words.

    Args:
        q: integer tensor (any int dtype), values in ``[0, 2**bits)``, e.g. ``[K, N]``.
        bits: 2, 3, 4 or 8.
        dim: the dimension to pack (0 for GPTQ ``qweight``, 1 for ``qzeros``).

    Returns:
        int32 tensor with ``q.shape[dim]`` replaced by ``packed_length(q.shape[dim], bits)``.
    """
    _check_bits(bits)
    if q.is_floating_point() or q.is_complex():
        raise TypeError(f"pack_int expects an integer tensor, got {q.dtype}")
    q = q.movedim(dim, 0)
    n = q.shape[0]
    if n and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(q.min())}, {int(q.max())}]")
    words = packed_length(n, bits)
    if bits == 3:
        out = _pack_stream(q.to(torch.int64), bits, words)
    else:
        per = 32 // bits
        padded = torch.zeros((words * per, *q.shape[1:]), dtype=torch.int64, device=q.device)
        padded[:n] = q
        padded = padded.view(words, per, *q.shape[1:])  # [words, per, ...]
        shifts = (torch.arange(per, device=q.device) * bits).view(1, per, *([1] * (q.dim() - 1)))
        out = (padded << shifts).sum(dim=1)  # disjoint bit fields: sum == bitwise or
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)
    return out.movedim(0, dim).contiguous()


def _pack_stream(q: torch.Tensor, bits: int, words: int) -> torch.Tensor:
    """General bit-stream packing (used for 3 bits): q int64 [n, ...] -> int64 [words, ...].

    The stream repeats every 32 values (``bits`` whole words): each of the 32 positions of a
    period lands at the same word and bit offset in every period, so one loop over the 32
    positions fills all periods at once.
    """
    n, rest = q.shape[0], q.shape[1:]
    periods = -(-n // 32)
    padded = torch.zeros((periods * 32, *rest), dtype=torch.int64, device=q.device)
    padded[:n] = q
    padded = padded.view(periods, 32, *rest)  # [periods, 32, ...]
    out = torch.zeros((periods, bits, *rest), dtype=torch.int64, device=q.device)  # [periods, bits words, ...]
    for i in range(32):
        w, off = divmod(bits * i, 32)
        out[:, w] |= (padded[:, i] << off) & 0xFFFFFFFF
        if off + bits > 32:  # spills into the next word
            out[:, w + 1] |= padded[:, i] >> (32 - off)
    return out.view(periods * bits, *rest)[:words]


def unpack_int(packed: torch.Tensor, bits: int, n: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_int`.

    Args:
        packed: int32 tensor of words, packed along ``dim``.
        bits: 2, 3, 4 or 8.
        n: the number of values along ``dim`` before packing.
        dim: the packed dimension.

    Returns:
        int32 tensor of values in ``[0, 2**bits)`` with ``n`` entries along ``dim``.
    """
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {packed.dtype}")
    p = packed.movedim(dim, 0)  # [words, ...]
    if p.shape[0] != packed_length(n, bits):
        raise ValueError(
            f"{p.shape[0]} packed words cannot hold exactly {n} values of {bits} bits "
            f"(expected {packed_length(n, bits)})"
        )
    mask = (1 << bits) - 1
    if bits == 3:  # values straddle words: shift as unsigned 64-bit so no sign bits leak in
        p = p.to(torch.int64) & 0xFFFFFFFF
        idx = torch.arange(n, device=p.device) * bits
        w, off = idx // 32, idx % 32
        shape = (n, *([1] * (p.dim() - 1)))
        lo = p[w] >> off.view(shape)
        nxt = p[torch.clamp(w + 1, max=p.shape[0] - 1)]
        hi = torch.where((off + bits > 32).view(shape), nxt << (32 - off).view(shape), 0)
        vals = (lo | hi) & mask
    else:
        per = 32 // bits  # whole values per word: the mask drops the sign bits an int32 shift brings
        # int32 shifts: int64 ones would promote the words, and every temporary would be twice the size
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=p.device).view(1, per, *([1] * (p.dim() - 1)))
        vals = (p.unsqueeze(1) >> shifts).bitwise_and_(mask).flatten(0, 1)[:n]
    return vals.to(torch.int32).movedim(0, dim).contiguous()


def pack_nibbles(codes: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """4-bit codes ``[L]`` -> uint8 ``[ceil(L/2)]``, element ``2i`` in the high nibble.

    Example: codes ``[1, 2, 3]`` -> bytes ``[0x12, 0x30]``; an odd length is padded with code
    ``pad`` (bitsandbytes pads with the code of 0.0: 7 for NF4, 0 for FP4).
    """
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_full((1,), pad)])
    return (c[0::2] << 4) | c[1::2]


def unpack_nibbles(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 ``[ceil(L/2)]`` -> int64 codes ``[length]``."""
    b = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:length]
