"""Block-by-block quantization: one transformer block on the device at a time.

The calibration batch runs through the model up to the first block, where its inputs (and
the keyword arguments the model passes to blocks: attention mask, rotary embeddings, ...)
are captured. Then, for each block in turn: move it to the device, feed the captured
inputs through it with a stats hook on each linear, replace the linears by their quantized
versions, run the inputs through the *quantized* block to get the next block's inputs (as
GPTQ does), and move the block back. Peak device memory is one block plus the activations.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

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


def _with_stats(block: nn.Module, linears: dict[str, nn.Module], quantizer: Quantizer, prefix: str,
                states: list[torch.Tensor], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run the block once with a hook on every linear feeding its inputs to the stats."""
    stats = {name: quantizer.collect(f"{prefix}.{name}", lin) for name, lin in linears.items()}
    handles = [
        lin.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add_batch(args[0].detach()))
        for name, lin in linears.items()
        if stats[name] is not None
    ]
    try:
        _run_block(block, states, kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.inference_mode()
def quantize_blockwise(
    model: nn.Module,
    quantizer: Quantizer,
    input_ids: torch.Tensor,
    device: torch.device | str,
    progress: bool = True,
) -> None:
    """Quantize ``model`` in place, block by block, with calibration tokens ``input_ids``.

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
        stats = _with_stats(block, linears, quantizer, name, states, kwargs) if quantizer.requires_calibration else {}
        for lname, lin in linears.items():
            set_module(block, lname, quantizer.quantize_layer(f"{name}.{lname}", lin, stats.get(lname)).to(device))
        states = _run_block(block, states, kwargs)
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
