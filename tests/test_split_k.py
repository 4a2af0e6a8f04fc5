"""Split-K scratch (``lowbit.kernels.split_k``): the arrival counters and partials held for eager
launches on a device's default stream, and the fresh ones a side stream or a CUDA graph capture
gets. The stream, the capture state and the allocations are stood in for, so this runs anywhere;
the real launches in streams and graphs are ``tests/test_triton_int_grouped.py``'s GPU test."""

from __future__ import annotations

import torch

from lowbit.kernels import split_k as S

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_split_k_counters_grow_and_are_kept():
    """The held counters are allocated once per device, zeroed, and grown when a launch has more
    output tiles than they hold."""
    device = torch.device(DEVICE)
    first = S.split_k_counters(device, 10)
    assert first.dtype == torch.int32 and first.numel() >= 10 and not first.any()
    assert S.split_k_counters(device, 10) is first
    bigger = S.split_k_counters(device, first.numel() + 1)
    assert bigger.numel() > first.numel() and not bigger.any()
    assert S.split_k_counters(device, 10) is bigger


def test_split_k_counters_by_stream_and_capture(monkeypatch):
    """Which counters a launch on a CUDA device gets (the stream, the capture state and the
    allocation faked, so this runs anywhere): the default stream's are made once and held; a side
    stream gets fresh zeroed ones each call, and so does a capture before any are held; a capture
    after that uses the held ones; a capture never holds what it allocated."""
    zeros = torch.zeros
    made = []

    def fake_zeros(n, dtype, device):
        made.append(n)
        return zeros(n, dtype=dtype)

    state = {"stream": 0, "capturing": False}
    monkeypatch.setattr(S, "_COUNTERS", {})
    monkeypatch.setattr(torch, "zeros", fake_zeros)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: state["stream"], raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    cuda = torch.device("cuda", 0)

    def counters(stream, capturing, tiles=8):
        state.update(stream=stream, capturing=capturing)
        return S.split_k_counters(cuda, tiles)

    early_capture = counters(77, True)
    assert made == [8] and S._COUNTERS == {}  # fresh for the call, not held
    side = [counters(55, False) for _ in range(2)]
    assert side[0] is not side[1] and made == [8, 8, 8]
    held = counters(0, False)
    assert made[-1] == 4096 and counters(0, False) is held and len(made) == 4
    assert counters(77, True) is held and len(made) == 4
    assert counters(55, False) is not held and counters(0, False, tiles=5000) is not held
    assert early_capture.numel() == 8 and S._COUNTERS[0].numel() == 5000


def test_split_k_partials_by_stream_and_size(monkeypatch):
    """Which partials buffer a split-K launch on a CUDA device gets (the stream and the allocation
    faked, so this runs anywhere): eager launches on the default stream share one held buffer,
    grown when a launch needs more; a side stream or a capture (always on a side stream) gets a
    buffer of its own each call, never held; and so does a launch above ``HELD_PARTIALS_MAX``."""
    empty = torch.empty
    made = []

    def fake_empty(n, dtype, device):
        made.append(n)
        return empty(n, dtype=dtype)

    stream = {"now": 0}
    monkeypatch.setattr(S, "_PARTIALS", {})
    monkeypatch.setattr(S, "HELD_PARTIALS_MAX", 1 << 20)
    monkeypatch.setattr(torch, "empty", fake_empty)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: stream["now"], raising=False)
    cuda = torch.device("cuda", 0)

    def partials(on, size):
        stream["now"] = on
        return S.split_k_partials(cuda, size)

    held = partials(0, 100)
    assert held.dtype == torch.float32 and made == [1 << 16]
    assert partials(0, 5000) is held and len(made) == 1
    side = [partials(77, 100) for _ in range(2)]
    assert side[0] is not side[1] and made[1:] == [100, 100] and all(t is not held for t in side)
    bigger = partials(0, (1 << 16) + 1)  # grown twofold
    assert bigger is not held and made[-1] == 1 << 17 and partials(0, 10) is bigger
    largest = partials(0, 3 << 17)  # or to the size asked for
    assert made[-1] == 3 << 17 and partials(0, (1 << 17) + 1) is largest
    assert partials(0, (3 << 17) + 1).numel() == 3 << 18  # doubled again
    assert partials(0, (3 << 18) + 1).numel() == 1 << 20  # doubling stops at the cap
    assert partials(0, (1 << 20) + 1) is not S._PARTIALS[0] and made[-1] == (1 << 20) + 1
    assert S._PARTIALS[0].numel() == 1 << 20
