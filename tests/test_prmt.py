"""NF4/FP4 code lookups by byte permutation (``lowbit.kernels.prmt``): the instruction sequence
checked with each instruction's PTX semantics in Python (the interpreter cannot run inline
assembly), the kernel's table planes under the interpreter, the wrapper's refusals; the kernel
against the reference on an NVIDIA GPU."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import MATMUL_REL, rel_err
from lowbit.formats.blockwise4 import code_table
from lowbit.kernels import prmt as P
from lowbit.kernels import reference
from test_triton_blockwise4 import DEVICE, args, random_module

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
T = pytest.importorskip("lowbit.kernels.triton_blockwise4")

WORDS = [v * 0x01010101 for v in range(256)] + [random.Random(0).getrandbits(32) for _ in range(500)]
"""Every byte value in every position of a word, and random words."""


def _fp16_bits(values: list[float]) -> list[int]:
    return torch.tensor(values).half().view(torch.int16).tolist()


@pytest.mark.parametrize("table", ["nf4", "fp4", "random"])
def test_program_looks_up_both_nibbles_of_every_byte(table):
    values = (code_table(table).tolist() if table != "random"
              else torch.randn(16, generator=torch.Generator().manual_seed(5)).tolist())
    want = [b & 0xFFFF for b in _fp16_bits(values)]  # the table rounded to fp16
    planes = P.planes(values)
    for word in WORDS:
        e0, e1, o0, o1 = P.run(word, planes)
        high = [e0 & 0xFFFF, e0 >> 16, e1 & 0xFFFF, e1 >> 16]  # fp16 values of bytes 0..3's high nibbles
        low = [o0 & 0xFFFF, o0 >> 16, o1 & 0xFFFF, o1 >> 16]
        for i, byte in enumerate(word.to_bytes(4, "little")):
            assert (high[i], low[i]) == (want[byte >> 4], want[byte & 15]), (hex(word), i)


def test_emulated_instructions():
    """The PTX semantics :func:`prmt.run` gives each instruction, on worked values."""
    assert P._prmt(0x33221100, 0x77665544, 0x7531) == 0x77553311  # bytes 1, 3, 5, 7 of {b, a}
    assert P._prmt(0x00008000, 0, 0x0009) == 0x000000FF  # bit 3 of a selector copies the sign
    assert P._lop3(0xF0F0F0F0, 0xCCCCCCCC, 0xAAAAAAAA, 0xE4) == 0xE4E4E4E4  # the truth table itself
    assert P._lop3(0x11111111, 0x22222222, 0x00FF00FF, 0xE4) == 0x22112211  # c ? a : b, bit by bit


def test_ptx_names_every_operand():
    """Outputs ``$0..$3``, the bytes ``$4``, the first register of each plane's ``PACK``; one
    constraint per register."""
    text = P.ptx()
    for step in P.PROGRAM:
        assert step[0] in text
    assert all(f"${i}" in text for i in range(5)) and "$5," in text and "$33," in text
    assert P.constraints().count("=r") == 4 and P.constraints().count(",r") == 1 + 8 * P.PACK


@triton.jit
def _planes_kernel(qmap_ptr, out_ptr):
    p = T._prmt_planes(qmap_ptr)
    for i in tl.static_range(8):
        tl.store(out_ptr + i, p[i])


def test_kernel_planes_equal_the_python_ones():
    """``_prmt_planes`` (Triton: the interpreter on CPU, the GPU where there is one) computes
    :func:`prmt.planes`."""
    for table in (code_table("nf4"), code_table("fp4"), torch.randn(16, generator=torch.Generator().manual_seed(2))):
        out = torch.zeros(8, dtype=torch.int32, device=DEVICE)
        _planes_kernel[(1,)](table.to(DEVICE), out)
        assert [v & 0xFFFFFFFF for v in out.tolist()] == list(P.planes(table.tolist()))


def test_wrapper_refuses_prmt_where_it_cannot_run():
    mod = random_module(32, 128, 64, "nf4", True, seed=1)
    x = torch.randn(3, 128).to(DEVICE, torch.float16)
    with pytest.raises(ValueError, match="one-token kernel only"):
        T.matmul_blockwise4(x, *args(mod), lookup="prmt")  # three rows: the tiled kernel
    if T.INTERPRET:
        with pytest.raises(ValueError, match="NVIDIA GPUs"):
            T.matmul_blockwise4(x[:1], *args(mod), lookup="prmt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n,k,bs", [(40, 64, 64), (33, 512, 64), (17, 96, 32), (9, 768, 256), (4096, 4096, 64)])
def test_prmt_gemv_matches_reference_on_gpu(quant_type, double_quant, dtype, n, k, bs):
    """The one-token kernel through byte permutes against the reference, and against the gathered
    lookup to within the table's rounding to fp16."""
    mod = random_module(n, k, bs, quant_type, double_quant, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(DEVICE, dtype)
    want = reference.matmul_blockwise4(x.float(), *args(mod), bias=mod.bias)
    got = T.matmul_blockwise4(x, *args(mod), bias=mod.bias, lookup="prmt")
    assert got.dtype == dtype and got.shape == (1, n) and torch.isfinite(got).all()
    assert rel_err(got, want) <= MATMUL_REL[dtype]
    gathered = T.matmul_blockwise4(x, *args(mod), bias=mod.bias, lookup="gather")
    assert rel_err(got, gathered) <= 2e-3
