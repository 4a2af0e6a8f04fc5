"""The group-ordered layout the Triton kernels read: exact round trips to the canonical layout."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.group_order import contiguous_group_size, from_group_ordered, in_group_order, to_group_ordered
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.kernels import reference


def random_module(n, k, bits, group_size, act_order, seed=0, dtype=torch.float16):
    """An IntGroupedLinear with random codes, zeros and scales; act-order permutes g_idx like GPTQ."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    z = torch.randint(0, 2**bits, (groups, n), generator=gen)
    s = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-3).to(dtype)
    g_idx = (torch.arange(k) // group_size).to(torch.int32)
    if act_order:
        perm = torch.randperm(k, generator=gen)
        g_idx = g_idx[torch.argsort(perm)]  # column perm[j] is the j-th quantized: group j // gs
    return IntGroupedLinear.from_quantized(q, s, z, g_idx, bits=bits, group_size=group_size)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,gs", [(100, 32), (128, 128), (96, 96), (130, 64)], ids=lambda v: str(v))
def test_act_order_round_trip_is_exact(bits, k, gs):
    m = random_module(24, k, bits, gs, act_order=True)
    w = to_group_ordered(m.qweight, m.scales, m.qzeros, m.g_idx, bits)
    assert w is not None and w.group_size == gs
    assert (w.perm is None) == (gs == k)  # one group: any column order is already group order
    qweight, g_idx = from_group_ordered(w, k)
    assert torch.equal(qweight, m.qweight) and torch.equal(g_idx, m.g_idx)
    # and back again: canonical -> ordered -> canonical -> ordered gives the same ordered codes
    again = to_group_ordered(qweight, m.scales, m.qzeros, g_idx, bits)
    assert torch.equal(again.qweight, w.qweight)
    assert (again.perm is None and w.perm is None) or torch.equal(again.perm, w.perm)


def test_plain_order_shares_the_buffers():
    m = random_module(16, 100, 4, 32, act_order=False)
    w = to_group_ordered(m.qweight, m.scales, m.qzeros, m.g_idx, 4)
    assert w.perm is None and w.qweight is m.qweight and w.group_size == 32
    qweight, g_idx = from_group_ordered(w, 100)
    assert qweight is m.qweight and torch.equal(g_idx, m.g_idx)


@pytest.mark.parametrize("bits", [3, 4])
def test_ordered_product_equals_canonical(bits):
    m = random_module(20, 130, bits, 64, act_order=True)
    w = to_group_ordered(m.qweight, m.scales, m.qzeros, m.g_idx, bits)
    x = torch.randn(3, 130)
    ordered_g = (torch.arange(130) // 64).to(torch.int32)
    got = reference.matmul_int_grouped(x[:, w.perm.long()], w.qweight, w.scales, w.qzeros, ordered_g, bits)
    want = reference.matmul_int_grouped(x, m.qweight, m.scales, m.qzeros, m.g_idx, bits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("g_idx,groups,want", [
    ([0, 0, 1, 1, 2], 3, 2),
    ([2, 0, 1, 0, 1], 3, 2),
    ([0, 0, 1, 1, 1, 2], 3, None),  # unequal runs
    ([0, 0, 0, 1], 2, 3),  # group size 3, shorter last group
    ([0, 1, 1, 1], 2, None),  # the short group is not the last
    ([1, 1, 1, 1], 2, None),  # an empty group
], ids=["plain", "permuted", "unequal", "short-last", "short-first", "empty-group"])
def test_contiguous_group_size(g_idx, groups, want):
    assert contiguous_group_size(torch.tensor(g_idx), groups) == want


def test_in_group_order():
    """``g_idx == arange(K) // size`` in either index dtype, a shorter last group included; a
    permuted one (act-order) or another size is not."""
    for k, size in [(576, 128), (96, 32), (70, 70)]:
        order = torch.arange(k, dtype=torch.int32) // size
        assert in_group_order(order, size) and in_group_order(order.long(), size)
        if size < k:  # (one group: every order is the same)
            assert not in_group_order(order.flip(0), size)
            assert not in_group_order(order, size * 2)
