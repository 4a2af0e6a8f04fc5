"""Block-by-block quantization: one transformer block on the device at a time.

The calibration batch runs through the model up to the first block, where its inputs (and
the keyword arguments the model passes to blocks: attention mask, rotary embeddings, ...)
are captured. Then, for each block in turn: move it to the device, feed the captured
inputs through it with a stats hook on each linear, replace the linears by their quantized
versions, run the inputs through the *quantized* block to get the next block's inputs (as
GPTQ does), and move the block back. A quantizer may transform the block's weights first
(``prepare_block``: AWQ's scaling and clipping) and then pass on the full-precision block's
outputs instead. Peak device memory is one block plus the activations.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.kernels import exact_kernels
from lowbit.methods.base import Quantizer
from lowbit.methods.walk import find_blocks, find_linears, set_module

log = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward once block 0's inputs are known."""


def capture_block_inputs(
    model: nn.Module, block: nn.Module, input_ids: torch.Tensor, device: torch.device
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Hidden states entering ``block`` for each calibration row, and the block kwargs.

    Args:
        input_ids: int64 ``[S, T]``; S samples of T tokens (run one at a time).

    Returns:
        a list of S tensors ``[1, T, H]`` and the keyword arguments of the first call.
    """
    states: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def hook(_mod: nn.Module, args: tuple, kw: dict) -> None:
        states.append(args[0] if args else kw.pop("hidden_states"))
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in input_ids:
            try:
                model(row[None].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return states, kwargs


def _run_block(block: nn.Module, states: list[torch.Tensor], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    outs = []
    for h in states:
        out = block(h, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


class _StopForward(Exception):
    """Raised by a stats hook once every linear of the current group has seen its input."""


def input_groups(block: nn.Module, linears: dict[str, nn.Module], state: torch.Tensor,
                 kwargs: dict[str, Any]) -> list[list[str]]:
    """The block's linears in call order, grouped by shared input (for true-sequential GPTQ).

    Linears fed the very same tensor form one group: in a Llama block ``[q, k, v]``, ``[o]``,
    ``[gate, up]``, ``[down]``; in GPT-2 ``[c_attn]``, ``[attn.c_proj]``, ``[c_fc]``,
    ``[mlp.c_proj]``. Found by running ``state`` through the block once, for any architecture.
    Linears the forward never calls are left out.
    """
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [lin.register_forward_hook(lambda _m, args, _o, n=name: calls.append((n, args[0])))
               for name, lin in linears.items()]
    try:
        _run_block(block, [state], kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last_input = None
    for name, x in calls:  # calls keeps every input alive, so `is` compares real identities
        if name in seen:
            continue
        seen.add(name)
        if groups and x is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = x
    return groups


def _with_stats(block: nn.Module, groups: list[list[str]], linears: dict[str, nn.Module], quantizer: Quantizer,
                prefix: str, states: list[torch.Tensor], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run the block feeding each input group's stats (one object shared by the group's members,
    which see the same input); returns the stats of every member.

    Each forward stops as soon as every group has seen its input.
    """
    shared = {g[0]: quantizer.collect(f"{prefix}.{g[0]}", linears[g[0]]) for g in groups}
    if all(st is None for st in shared.values()):
        return {name: None for g in groups for name in g}  # nothing to gather: no forward needed
    pending: set[str] = set()

    def hook(name: str, x: torch.Tensor) -> None:
        if shared[name] is not None:
            shared[name].add_batch(x.detach())
        pending.discard(name)
        if not pending:
            raise _StopForward

    handles = [linears[first].register_forward_hook(lambda _m, args, _o, n=first: hook(n, args[0]))
               for first in shared]
    try:
        for h in states:
            pending.update(shared)
            try:
                block(h, **kwargs)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return {name: shared[g[0]] for g in groups for name in g}


def _plan(quantizer: Quantizer, block: nn.Module, linears: dict[str, nn.Module],
          states: list[torch.Tensor], kwargs: dict[str, Any]) -> list[list[list[str]]]:
    """Steps of input groups: each step's groups are gathered in one pass, then quantized.

    ``true_sequential``: one step per input group, in call order; otherwise one step for all.
    """
    groups = input_groups(block, linears, states[0], kwargs)
    called = {n for g in groups for n in g}
    uncalled = [n for n in linears if n not in called]
    if uncalled:
        raise ValueError(f"linears {', '.join(uncalled)} are never called by the block's forward; "
                         "skip them with modules_to_not_convert")
    return [[g] for g in groups] if getattr(quantizer, "true_sequential", False) else [groups]


@torch.inference_mode()
@exact_kernels()
def quantize_blockwise(
    model: nn.Module,
    quantizer: Quantizer,
    input_ids: torch.Tensor,
    device: torch.device | str,
    progress: bool = True,
) -> None:
    """Quantize ``model`` in place, block by block, with calibration tokens ``input_ids``.

    Within a block, linears that share an input (:func:`input_groups`) share one statistics
    object. A quantizer with ``true_sequential`` quantizes one input group at a time, each
    group's statistics gathered with the earlier groups already quantized; otherwise all
    groups are gathered in one pass. The forwards run under :func:`~lowbit.kernels.exact_kernels`:
    the quantized layers compute at the model's precision.

    Args:
        input_ids: int64 ``[S, T]`` calibration batch.
        device: where each block runs; the model stays where it is otherwise (embeddings
            are moved to ``device`` for the capture and back).
    """
    device = torch.device(device)
    prefix, blocks = find_blocks(model)
    skip = quantizer.skip_modules(model)
    home = next(model.parameters()).device
    _move_outside_blocks(model, blocks, device)
    states, kwargs = capture_block_inputs(model, blocks[0], input_ids, device)
    _move_outside_blocks(model, blocks, home)
    for i in tqdm(range(len(blocks)), desc="quantizing blocks", disable=not progress):
        block = blocks[i].to(device)
        name = f"{prefix}.{i}"
        linears = find_linears(block, skip, prefix=name)
        fp_outputs = None
        if not quantizer.requires_calibration:
            for lname, lin in linears.items():
                set_module(block, lname, quantizer.quantize_layer(f"{name}.{lname}", lin, None).to(device))
        elif linears:
            targets = _run_block(block, states, kwargs) if quantizer.tunes_blocks() else None
            fp_outputs = quantizer.prepare_block(block, name, linears, states, kwargs)
            for step in _plan(quantizer, block, linears, states, kwargs):
                stats = _with_stats(block, step, linears, quantizer, name, states, kwargs)
                for lname, st in stats.items():
                    set_module(block, lname, quantizer.quantize_layer(f"{name}.{lname}", linears[lname], st).to(device))
            if targets is not None:
                quantizer.finish_block(block, name, states, kwargs, targets)
        states = fp_outputs if fp_outputs is not None else _run_block(block, states, kwargs)
        blocks[i] = block.to(home)
    log.info("quantized %d blocks of %s", len(blocks), prefix)


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside ``blocks`` to ``device``."""
    inside = {id(m) for m in blocks.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for name, p in m.named_parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in m.named_buffers(recurse=False):
            setattr(m, name, b.to(device))
