"""Held eager kernel calls: a wrapper's call, repeated on new inputs with nothing but its output
(and whatever else each call makes) allocated.

A quantized module's eager one-token forward costs more CPU time in Python than its kernel
runs on the GPU. A Triton wrapper given a weight's :class:`HeldCalls` keeps there, per layout of
its input (:func:`lowbit.kernels.triton_common.held_call_key`), the launch its first call made,
and a later call with the same key repeats it. The classes here hold no Triton object of their
own (a held launch is the callable :func:`lowbit.kernels.triton_common.launch` returned), so the
formats import them on machines without Triton.
"""

from __future__ import annotations

import torch


class Derived(dict):
    """What a module derives from its buffers and can derive again, by name: a copy of its owner
    (``copy.deepcopy``, pickling) starts with none, so copies and saved pickles do not carry it."""

    def __deepcopy__(self, memo) -> Derived:
        return type(self)()

    def __reduce__(self):
        return type(self), ()


class HeldCalls(Derived):
    """A weight's held eager kernel calls (:class:`HeldCall` and the like), by their key.

    A cache of launches on this process's device: a copy of its owner starts with none."""

    MAX = 64
    """Calls held before they are all dropped (each input layout is a key)."""

    def hold(self, key, call) -> None:
        if len(self) >= self.MAX:
            self.clear()
        self[key] = call

    def find(self, key, sources: tuple, viewed: tuple = ()):
        """The call held under ``key`` if it was made from ``sources`` (:meth:`HeldSources.made_for`),
        else None. A call made from other tensors means the weight's buffers were replaced since:
        every held call goes, and the memory they kept with it."""
        call = self.get(key)
        if call is None or call.made_for(sources, viewed):
            return call
        self.clear()
        return None


class HeldSources:
    """What a held eager call was made from: the caller's tensors (or None), held so that no other
    object takes their ids, and the addresses of those passed to a kernel as views."""

    __slots__ = ("sources", "ids", "pointers")

    def __init__(self, sources: tuple, viewed: tuple = ()) -> None:
        self.sources = sources
        self.ids, self.pointers = tuple(map(id, sources)), _pointers(viewed)

    def made_for(self, sources: tuple, viewed: tuple = ()) -> bool:
        """Whether the call was made from these very tensors, and those passed as views still at the
        same addresses (a tensor passed itself follows a new ``.data``; a view of it would not)."""
        return tuple(map(id, sources)) == self.ids and (not viewed or self.pointers == _pointers(viewed))


class HeldCall(HeldSources):
    """A wrapper's eager one-launch call, held to be repeated on new input rows.

    :func:`~lowbit.kernels.triton_common.launch` keys a held launch on every argument, about 3 µs
    of CPU a call for the nine tensors of a matmul (``bench/dispatch.py``), and the wrapper before
    it chooses the launch and finds its buffers. A wrapper given a weight's :class:`HeldCalls`
    keeps a ``HeldCall`` there per :func:`~lowbit.kernels.triton_common.held_call_key` of its input
    instead, and a later call with the same key allocates the output and launches, nothing else.

    The launch takes what each call computes from its input (the rows, or a table made from them)
    at ``x_at`` and the output at ``y_at`` (after it); every other argument is held, the split-K
    partials and counters included. Those come from the default stream's held buffers
    (:func:`~lowbit.kernels.split_k.split_k_partials`), which is why the key is None on any
    other stream or in a capture: there a wrapper allocates them per call. A held buffer a later
    launch outgrew stays alive with the call that holds it and is still correct to use (launches on
    the default stream run in order, and each leaves its counters zero). With one split, the
    partials and counters the kernel never reads are the first call's output
    (:func:`~lowbit.kernels.split_k.output_buffers`), which the held call then keeps
    (``M x N`` values).
    """

    __slots__ = ("runner", "head", "middle", "tail", "out_shape", "dtype", "device")

    def __init__(self, launched: tuple, args: tuple, y_at: int, out_shape: tuple[int, ...],
                 sources: tuple, viewed: tuple = (), x_at: int = 0) -> None:
        """``launched``: what :func:`~lowbit.kernels.triton_common.launch` returned for ``args``
        (the per-call input at ``x_at``, the output at ``y_at``); ``sources``, ``viewed``: see
        :class:`HeldSources`."""
        super().__init__(sources, viewed)
        runner, tail = launched
        y = args[y_at]
        self.runner = runner
        self.head = args[:x_at]
        self.middle = args[x_at + 1:y_at]
        self.tail = (*args[y_at + 1:], *tail)
        self.out_shape, self.dtype, self.device = out_shape, y.dtype, y.device

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        """The launch on ``x2`` (rows in the key's layout, or what the call computes from them);
        returns the output in ``out_shape`` (its rows are the kernel's ``[M, N]`` output, contiguous)."""
        y = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        self.runner(*self.head, x2, *self.middle, y, *self.tail)
        return y


class HeldLaunch:
    """One held launch whose arguments at ``slots`` change with each call (for a call of several
    launches with tensors made between them): ``launch(*values)`` puts ``values`` there, in order."""

    __slots__ = ("runner", "every", "slots")

    def __init__(self, launched: tuple, args: tuple, slots: tuple[int, ...]) -> None:
        runner, tail = launched
        self.runner, self.every, self.slots = runner, (*args, *tail), slots

    def __call__(self, *values: torch.Tensor) -> None:
        every = list(self.every)
        for at, value in zip(self.slots, values, strict=True):
            every[at] = value
        self.runner(*every)


def _pointers(tensors: tuple) -> tuple[int, ...]:
    return tuple([t.data_ptr() if t is not None else 0 for t in tensors])
