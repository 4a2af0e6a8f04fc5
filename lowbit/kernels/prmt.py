"""NF4/FP4 code lookups by byte permutation (PTX ``prmt``), four codes an instruction.

The 16-entry code table, rounded to fp16, is split into two byte planes: the low bytes of the 16
values (four 32-bit registers, ``L0..L3``) and their high bytes (``H0..H3``). ``prmt.b32 d, a, b,
c`` picks for each byte of ``d`` one of the eight bytes of ``{b, a}`` by a 3-bit index in the
matching nibble of ``c``; so one ``prmt`` over ``(L0, L1)`` looks up four codes below 8, one over
``(L2, L3)`` the same four among entries 8-15, and a bit-select on each code's bit 3 keeps the
right one. The same over ``H`` gives the high bytes, and two more ``prmt`` interleave low and high
bytes into fp16 pairs. For a word of four packed bytes (eight codes, high nibble first) that is
about 33 instructions, against about 30 a code for a ``tl.gather`` from the table (warp shuffles;
``bench/ptx.py``).

:data:`PROGRAM` is that sequence once, as data: :func:`ptx` writes it as the inline assembly of
:func:`lowbit.kernels.triton_blockwise4._decode_prmt` (``tl.inline_asm_elementwise``, four bytes
an invocation), and :func:`run` executes it in Python with each instruction's PTX semantics, which
is how the tests check it on a machine without an NVIDIA GPU (the Triton interpreter cannot run
inline assembly). Operands: ``w`` the four bytes; ``L0..L3``, ``H0..H3`` the planes
(:func:`planes`); results ``e0, e1`` (fp16 pairs: the values of the high nibbles of bytes 0-1 and
2-3) and ``o0, o1`` (the low nibbles'). NVIDIA only: AMD's ``v_perm_b32`` orders its selectors
differently, and these kernels read the table with ``tl.gather`` there.
"""

from __future__ import annotations

import struct

NIBBLES = 0x0F0F0F0F

PROGRAM: tuple[tuple, ...] = (
    ("shr.b32", "t0", "w", 4),
    ("and.b32", "hc", "t0", NIBBLES),  # each byte's high-nibble code, a byte each
    ("and.b32", "lc", "w", NIBBLES),  # and its low-nibble code
    *(step for codes, lo, hi in (("hc", "e0", "e1"), ("lc", "o0", "o1")) for step in (
        # the four codes' low 3 bits as prmt selectors: byte i's code in nibble i
        ("and.b32", f"{codes}s", codes, 0x07070707),
        ("shr.b32", f"{codes}t", f"{codes}s", 4),
        ("or.b32", f"{codes}u", f"{codes}s", f"{codes}t"),  # bytes 0 and 2 hold codes 0|1 and 2|3
        ("prmt.b32", f"{codes}x", f"{codes}u", "zero", 0x4420),
        # 0xFF in each byte whose code is 8 or more
        ("shr.b32", f"{codes}m", codes, 3),
        ("and.b32", f"{codes}m", f"{codes}m", 0x01010101),
        ("mul.lo.u32", f"{codes}m", f"{codes}m", 0xFF),
        # low and high bytes of the four values: entries 0-7 and 8-15, then the right one
        ("prmt.b32", f"{codes}l0", "L0", "L1", f"{codes}x"),
        ("prmt.b32", f"{codes}l1", "L2", "L3", f"{codes}x"),
        ("lop3.b32", f"{codes}l", f"{codes}l1", f"{codes}l0", f"{codes}m", 0xE4),  # m ? l1 : l0
        ("prmt.b32", f"{codes}h0", "H0", "H1", f"{codes}x"),
        ("prmt.b32", f"{codes}h1", "H2", "H3", f"{codes}x"),
        ("lop3.b32", f"{codes}h", f"{codes}h1", f"{codes}h0", f"{codes}m", 0xE4),
        # fp16 pairs: (low, high) bytes of values 0 and 1, then of 2 and 3
        ("prmt.b32", lo, f"{codes}l", f"{codes}h", 0x5140),
        ("prmt.b32", hi, f"{codes}l", f"{codes}h", 0x7362),
    )),
)

OUTPUTS = ("e0", "e1", "o0", "o1")
INPUTS = ("w", "L0", "L1", "L2", "L3", "H0", "H1", "H2", "H3")
PACK = 4
"""Bytes an invocation takes; every plane operand then comes as ``PACK`` registers (a broadcast
scalar: the same value), of which the program reads the first."""


def _operand(name, regs: dict[str, str]) -> str:
    return f"{name:#x}" if isinstance(name, int) else regs[name]


def ptx() -> str:
    """:data:`PROGRAM` as inline PTX: outputs ``$0..$3``, the bytes ``$4``, plane ``p`` at
    ``$(5 + PACK * p)``; every other name a scoped ``.b32`` register."""
    regs = {name: f"${i}" for i, name in enumerate(OUTPUTS)}
    regs["w"] = f"${len(OUTPUTS)}"
    for p, name in enumerate(INPUTS[1:]):
        regs[name] = f"${len(OUTPUTS) + 1 + PACK * p}"
    temps = sorted({step[1] for step in PROGRAM if step[1] not in regs} | {"zero"})
    regs.update({name: f"%r_{name}" for name in temps})
    lines = ["{", f".reg .b32 {', '.join(regs[name] for name in temps)};", "mov.b32 %r_zero, 0;"]
    for op, *operands in PROGRAM:
        lines.append(f"{op} {', '.join(_operand(o, regs) for o in operands)};")
    lines.append("}")
    return "\n".join(lines)


def constraints() -> str:
    """The ``tl.inline_asm_elementwise`` constraints of :func:`ptx`: four outputs, the bytes and
    ``PACK`` registers of each plane."""
    return ",".join(["=r"] * len(OUTPUTS) + ["r"] * (1 + PACK * (len(INPUTS) - 1)))


def _prmt(a: int, b: int, c: int) -> int:
    """``prmt.b32`` (default mode): byte ``i`` of the result is byte ``c[4i:4i+3]`` of ``{b, a}``,
    with its sign bit copied over it where ``c``'s bit ``4i+3`` is set."""
    pool = (b << 32 | a).to_bytes(8, "little")
    out = 0
    for i in range(4):
        sel = c >> (4 * i) & 15
        byte = pool[sel & 7]
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """``lop3.b32``: bit ``j`` of the result is bit ``(a_j << 2 | b_j << 1 | c_j)`` of ``lut``."""
    out = 0
    for j in range(32):
        idx = (a >> j & 1) << 2 | (b >> j & 1) << 1 | (c >> j & 1)
        out |= (lut >> idx & 1) << j
    return out


def run(word: int, plane_words: tuple[int, ...]) -> tuple[int, int, int, int]:
    """:data:`PROGRAM` on one 32-bit ``word`` of four bytes with the planes ``L0..L3, H0..H3``;
    returns ``(e0, e1, o0, o1)``, each two fp16 values (the first in the low half)."""
    mask = 0xFFFFFFFF
    regs = dict(zip(INPUTS, (word, *plane_words), strict=True), zero=0)
    value = lambda o: o if isinstance(o, int) else regs[o]  # noqa: E731
    for op, dst, *src in PROGRAM:
        v = [value(o) for o in src]
        if op == "shr.b32":
            r = v[0] >> v[1]
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "or.b32":
            r = v[0] | v[1]
        elif op == "mul.lo.u32":
            r = v[0] * v[1]
        elif op == "prmt.b32":
            r = _prmt(*v)
        elif op == "lop3.b32":
            r = _lop3(*v)
        else:
            raise ValueError(f"no emulation of {op}")
        regs[dst] = r & mask
    return tuple(regs[name] for name in OUTPUTS)


def fp16_bits(value: float) -> int:
    return struct.unpack("<H", struct.pack("<e", value))[0]


def planes(table: list[float]) -> tuple[int, ...]:
    """The eight plane words ``L0..L3, H0..H3`` of a 16-entry table, rounded to fp16 (what
    :func:`lowbit.kernels.triton_blockwise4._prmt_planes` computes in the kernel)."""
    bits = [fp16_bits(v) for v in table]
    lo = [b & 0xFF for b in bits]
    hi = [b >> 8 for b in bits]
    return tuple(sum(plane[4 * r + j] << (8 * j) for j in range(4)) for plane in (lo, hi) for r in range(4))
