"""The bitsandbytes checkpoint layout, as transformers + bitsandbytes save it.

4-bit (``Linear4bit``), per quantized linear ``p`` of K inputs and N outputs:

=============================================  ============  ==========================================
key                                            dtype         contents
=============================================  ============  ==========================================
``p.weight``                                   quant_storage packed codes ``[ceil(N*K/2)/itemsize, 1]``
``p.weight.absmax``                            fp32 / uint8  per-block absmax (uint8 if double quant)
``p.weight.quant_map``                         fp32 ``[16]`` NF4 / FP4 table
``p.weight.nested_absmax``                     fp32          double quant only
``p.weight.nested_quant_map``                  fp32 ``[256]`` double quant only
``p.weight.quant_state.bitsandbytes__nf4``     uint8 ``[L]`` UTF-8 bytes of ``json.dumps`` of
(``__fp4``)                                                  ``{quant_type, blocksize, dtype, shape}``
                                                             and, with double quant, ``nested_blocksize,
                                                             nested_dtype, nested_offset``
``p.bias``                                     model dtype
=============================================  ============  ==========================================

8-bit (``Linear8bitLt``): ``p.weight`` int8 ``[N, K]``, ``p.SCB`` fp32 ``[N]``, ``p.weight_format``
uint8 scalar 0 ("row"; the only value bitsandbytes loads), ``p.bias``; that is
:class:`Int8Linear`'s own state dict, so only ``weight_format`` is checked.

Reading takes the block size, double quant, storage dtype and recorded weight dtype from each
linear's JSON entry (a checkpoint may differ from the config's defaults) and rebuilds the module
to match, after checking the JSON against the tensor shapes.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from lowbit.config import BitsAndBytesConfig
from lowbit.formats.base import modules_of
from lowbit.formats.blockwise4 import NESTED_BLOCKSIZE, QUANT_TYPES, Blockwise4Linear
from lowbit.formats.int8_outlier import ROW_FORMAT, Int8Linear
from lowbit.methods.walk import set_module

_STATE_KEY = "weight.quant_state.bitsandbytes__"
_RENAMED = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # module buffer -> weight.<name>


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (what bitsandbytes writes)."""
    return str(dtype).removeprefix("torch.")


def quant_state_json(m: Blockwise4Linear) -> dict:
    """The non-tensor quant-state items, in bitsandbytes' key order."""
    d = {"quant_type": m.quant_type, "blocksize": m.blocksize, "dtype": dtype_name(m.weight_dtype),
         "shape": [m.out_features, m.in_features]}
    if m.double_quant:
        d |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
              "nested_offset": float(m.nested_offset)}
    return d


def json_tensor(d: dict) -> torch.Tensor:
    """``d`` as the uint8 tensor of the UTF-8 bytes of ``json.dumps(d)``."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


class BnbLayout:
    """Translate :class:`Blockwise4Linear` / :class:`Int8Linear` buffers to and from the
    bitsandbytes layout."""

    def to_checkpoint(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                      config: BitsAndBytesConfig) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for name, m in modules_of(model, Blockwise4Linear).items():
            for buf in _RENAMED:
                if f"{name}.{buf}" in out:
                    out[f"{name}.weight.{buf}"] = out.pop(f"{name}.{buf}")
            out.pop(f"{name}.nested_offset", None)
            out[f"{name}.{_STATE_KEY}{m.quant_type}"] = json_tensor(quant_state_json(m))
        return out

    def from_checkpoint(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                        config: BitsAndBytesConfig) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for name, m in modules_of(model, Blockwise4Linear).items():
            state = _read_state(name, out)
            if state is None:
                continue  # no tensors for this linear: reported as missing by the strict loader
            new = _rebuilt(name, m, state, out)
            set_module(model, name, new)
            for buf in _RENAMED:
                if f"{name}.weight.{buf}" in out:
                    out[f"{name}.{buf}"] = out.pop(f"{name}.weight.{buf}")
            if new.double_quant:
                out[f"{name}.nested_offset"] = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
            _cast_bias(name, new, out)
        for name, m in modules_of(model, Int8Linear).items():
            fmt = out.get(f"{name}.weight_format")
            if fmt is not None and int(fmt) != ROW_FORMAT:
                raise ValueError(f"{name}.weight_format is {int(fmt)}; only the row-major int8 layout (0) can be "
                                 "loaded (bitsandbytes refuses the others too)")
            if f"{name}.weight" in out and fmt is None:
                out[f"{name}.weight_format"] = torch.tensor(ROW_FORMAT, dtype=torch.uint8)  # older writers
            _cast_bias(name, m, out)
        return out

    def extra_files(self, config: BitsAndBytesConfig) -> dict[str, str]:
        return {}


def _read_state(name: str, tensors: dict[str, torch.Tensor]) -> dict | None:
    """The parsed JSON entry of linear ``name`` (popped from ``tensors``), or None if the
    checkpoint has no tensors for it."""
    keys = [k for k in tensors if k.startswith(f"{name}.{_STATE_KEY}")]
    if not keys:
        if f"{name}.weight" in tensors:
            raise ValueError(f"{name}: 4-bit weight without its quant_state entry "
                             f"({name}.{_STATE_KEY}nf4 or __fp4); the checkpoint is incomplete")
        return None
    if len(keys) > 1:
        raise ValueError(f"{name}: more than one quant_state entry: {keys}")
    (key,) = keys
    raw = tensors.pop(key)
    try:
        state = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key} is not UTF-8 JSON: {e}") from None
    suffix = key.rsplit("__", 1)[1]
    if not isinstance(state, dict) or state.get("quant_type") != suffix or suffix not in QUANT_TYPES:
        raise ValueError(f"{key}: quant_type {state.get('quant_type') if isinstance(state, dict) else state!r} "
                         f"does not match the key's {suffix!r} (known: {QUANT_TYPES})")
    for field in ("blocksize", "dtype", "shape"):
        if field not in state:
            raise ValueError(f"{key}: JSON has no {field!r}")
    return state


def _rebuilt(name: str, m: Blockwise4Linear, state: dict, tensors: dict[str, torch.Tensor]) -> Blockwise4Linear:
    """A module laid out as ``state`` says, after checking it against ``m``'s shape and the tensors."""
    if list(state["shape"]) != [m.out_features, m.in_features]:
        raise ValueError(f"{name}: quant_state shape {state['shape']} does not match the layer's "
                         f"[{m.out_features}, {m.in_features}]")
    double = f"{name}.weight.nested_absmax" in tensors
    if double != ("nested_offset" in state):
        raise ValueError(f"{name}: nested_absmax tensor and the quant_state's nested_offset must come together")
    if double and state.get("nested_blocksize") != NESTED_BLOCKSIZE:
        raise ValueError(f"{name}: nested_blocksize {state.get('nested_blocksize')} is not {NESTED_BLOCKSIZE}")
    weight = tensors.get(f"{name}.weight")
    storage = weight.dtype if weight is not None else m.weight.dtype
    try:
        weight_dtype = getattr(torch, str(state["dtype"]))
        if not isinstance(weight_dtype, torch.dtype):
            raise AttributeError
        new = Blockwise4Linear(
            m.in_features, m.out_features, quant_type=state["quant_type"], blocksize=int(state["blocksize"]),
            double_quant=double, bias=m.bias is not None,
            bias_dtype=m.bias.dtype if m.bias is not None else torch.float32, quant_storage=storage,
            weight_dtype=weight_dtype, compute_dtype=m.compute_dtype, device="meta")
    except (AttributeError, TypeError) as e:
        raise ValueError(f"{name}: quant_state dtype {state['dtype']!r} is not a torch dtype ({e})") from None
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    new.kernel = m.kernel
    return new


def _cast_bias(name: str, m: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The bias of a quantized linear follows the load dtype, as the model's other fp tensors do."""
    key = f"{name}.bias"
    if m.bias is not None and key in tensors and tensors[key].is_floating_point():
        tensors[key] = tensors[key].to(m.bias.dtype)
