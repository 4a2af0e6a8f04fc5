"""Pack/unpack: exact round trips over odd shapes, and the documented bit layout."""

import pytest
import torch

from lowbit.formats.packing import pack_int, packed_length, unpack_int

BITS = [2, 3, 4, 8]
SHAPES = [(1, 1), (7, 5), (31, 3), (32, 2), (33, 9), (96, 4), (127, 13), (256, 1)]


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dim", [0, 1], ids=["dim0", "dim1"])
def test_round_trip_exact(bits, shape, dim):
    g = torch.Generator().manual_seed(hash((bits, shape, dim)) % 2**31)
    q = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)
    packed = pack_int(q, bits, dim=dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == packed_length(shape[dim], bits)
    back = unpack_int(packed, bits, shape[dim], dim=dim)
    assert torch.equal(back, q)
    assert torch.equal(pack_int(back, bits, dim=dim), packed)  # pack -> unpack -> pack


def test_worked_example_4bit():
    q = torch.arange(1, 9, dtype=torch.int32).view(8, 1)
    assert pack_int(q, 4, dim=0).item() == 0x87654321 - 2**32


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_lsb_first_bit_stream(bits):
    """Value i sits at bits [bits*i, bits*(i+1)) of the little-endian stream of words."""
    q = torch.randint(0, 2**bits, (64, 1), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    words = pack_int(q, bits).flatten().tolist()
    stream = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words))
    expect = sum(int(v) << (bits * i) for i, v in enumerate(q.flatten().tolist()))
    assert stream == expect


def test_3bit_matches_gptq_cross_word_layout():
    """GPTQ 3-bit: 10 values in word 0 plus the low 2 bits of value 10, and so on."""
    q = torch.full((32, 1), 0, dtype=torch.int32)
    q[10] = 0b101
    w = pack_int(q, 3).flatten().tolist()
    assert (w[0] & 0xFFFFFFFF) >> 30 == 0b01
    assert w[1] & 1 == 0b1
    assert w[2] == 0


@pytest.mark.parametrize("bad", [-1, 16], ids=["negative", "too_large"])
def test_out_of_range_values_raise(bad):
    q = torch.zeros(8, 2, dtype=torch.int32)
    q[3, 1] = bad
    with pytest.raises(ValueError, match="out of range for 4-bit"):
        pack_int(q, 4)


def test_unsupported_bits_raise():
    with pytest.raises(ValueError, match="bits=5 cannot be packed"):
        pack_int(torch.zeros(8, 1, dtype=torch.int32), 5)


def test_float_input_raises():
    with pytest.raises(TypeError, match="integer tensor"):
        pack_int(torch.zeros(8, 1), 4)


def test_unpack_wrong_length_raises():
    packed = pack_int(torch.zeros(16, 1, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="cannot hold exactly 17 values"):
        unpack_int(packed, 4, 17)


def test_unpack_wrong_dtype_raises():
    with pytest.raises(TypeError, match="must be int32"):
        unpack_int(torch.zeros(2, 1, dtype=torch.int64), 4, 16)
