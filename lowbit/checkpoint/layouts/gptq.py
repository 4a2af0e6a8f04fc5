"""The GPTQ checkpoint layout (AutoGPTQ, GPTQModel, transformers, vLLM), v1 and v2.

Tensors per quantized linear, K inputs, N outputs, G = ceil(K / group_size):
``qweight`` int32 ``[K*bits/32, N]`` (packed along K), ``qzeros`` int32 ``[G, N*bits/32]``
(packed along N), ``scales`` fp16 ``[G, N]``, ``g_idx`` int32 ``[K]``, ``bias`` fp16 ``[N]``.
That is lowbit's canonical :class:`IntGroupedLinear` layout, bit for bit, except one thing:

* ``checkpoint_format="gptq"`` (v1, what AutoGPTQ and transformers write) stores each zero
  point minus one: symmetric 4-bit stores 7 for a true zero of 8, and kernels add the one back.
  A true zero of 0 cannot be stored; lowbit's GPTQ keeps asymmetric zeros >= 1 for v1.
* ``checkpoint_format="gptq_v2"`` (GPTQModel) stores the true zero point, as lowbit does.

Reading checks the stored zeros against the declared format where the checkpoint allows it:
a symmetric checkpoint has one known zero point, so zeros that are the other format's value
(e.g. the zeros = 8 that some "gptq" checkpoints carry) are detected and read correctly with a
warning, and anything else is an error. Beside ``config.json`` the layout writes
``quantize_config.json`` with the keys AutoGPTQ and GPTQModel read.
"""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

from lowbit.config import GPTQConfig
from lowbit.formats.base import modules_of
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.formats.packing import pack_int, unpack_int

log = logging.getLogger(__name__)

V1, V2 = "gptq", "gptq_v2"
ZERO_OFFSET = {V1: 1, V2: 0}  # stored = true zero - offset
QUANTIZE_CONFIG_FILE = "quantize_config.json"


def zeros_to_checkpoint(qzeros: torch.Tensor, bits: int, n: int, fmt: str, name: str = "qzeros") -> torch.Tensor:
    """Canonical (true) packed zeros int32 ``[G, ceil(N*bits/32)]`` -> the format's stored zeros."""
    offset = ZERO_OFFSET[fmt]
    if not offset:
        return qzeros
    z = unpack_int(qzeros, bits, n, dim=1)  # [G, N]
    if int(z.min()) < offset:
        raise ValueError(
            f"{name}: a zero point of 0 cannot be stored in the GPTQ v1 layout (it stores zero - 1); "
            "save with GPTQConfig(format='gptq_v2') or quantize with sym=True"
        )
    return pack_int(z - offset, bits, dim=1)


def zeros_from_checkpoint(stored: torch.Tensor, bits: int, n: int, fmt: str, sym: bool,
                          name: str = "qzeros") -> torch.Tensor:
    """The format's stored packed zeros -> canonical (true) packed zeros.

    For a symmetric checkpoint every true zero is ``2**(bits-1)``; stored zeros that match the
    other format's value instead are read as that format (logged), and anything else raises.
    """
    z = unpack_int(stored, bits, n, dim=1)  # [G, N], as stored
    if sym:
        true_zero = 1 << (bits - 1)
        found = {f for f, off in ZERO_OFFSET.items() if bool((z == true_zero - off).all())}
        if not found:
            values = sorted(set(z.flatten().tolist()))[:6]
            raise ValueError(
                f"{name}: a symmetric {bits}-bit GPTQ checkpoint stores zero points {true_zero - 1} (v1) or "
                f"{true_zero} (gptq_v2), but this one stores {values}; the checkpoint is corrupt or not sym"
            )
        if fmt not in found:
            (actual,) = found
            log.warning("%s: checkpoint says format %r but its zero points are %r's; reading them as %r",
                        name, fmt, actual, actual)
            fmt = actual
    offset = ZERO_OFFSET[fmt]
    if not offset:
        return stored
    if int(z.max()) + offset >= 1 << bits:
        raise ValueError(
            f"{name}: stored zero point {int(z.max())} + {offset} does not fit {bits} bits; the checkpoint holds "
            "an overflowed v1 zero (written for a true zero of 0, a known defect of some writers) and "
            "cannot be read exactly"
        )
    return pack_int(z + offset, bits, dim=1)


class GptqLayout:
    """Translate :class:`IntGroupedLinear` buffers to and from the GPTQ v1/v2 layout."""

    def to_checkpoint(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                      config: GPTQConfig) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for name, m in modules_of(model, IntGroupedLinear).items():
            key = f"{name}.qzeros"
            out[key] = zeros_to_checkpoint(tensors[key], m.bits, m.out_features, config.format, key)
        return out

    def from_checkpoint(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                        config: GPTQConfig) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for name, m in modules_of(model, IntGroupedLinear).items():
            key = f"{name}.qzeros"
            if key not in tensors:
                continue  # reported as missing by the strict loader
            check_packed_shapes(name, m, tensors)
            out[key] = zeros_from_checkpoint(tensors[key], m.bits, m.out_features, config.format,
                                             config.sym, key)
        return out

    def extra_files(self, config: GPTQConfig) -> dict[str, str]:
        return {QUANTIZE_CONFIG_FILE: json.dumps(quantize_config_json(config), indent=2) + "\n"}


def check_packed_shapes(name: str, m: IntGroupedLinear, tensors: dict[str, torch.Tensor]) -> None:
    """A ``qweight``/``qzeros`` whose shape disagrees with ``bits`` gets an error naming both."""
    for buf in ("qweight", "qzeros"):
        t = tensors.get(f"{name}.{buf}")
        want = tuple(getattr(m, buf).shape)
        if t is not None and tuple(t.shape) != want:
            raise ValueError(
                f"{name}.{buf} has shape {tuple(t.shape)}, but {m.bits}-bit packing of a "
                f"{m.in_features}->{m.out_features} layer with group size {m.group_size} needs {want}; "
                "the checkpoint's bits or group_size do not match its tensors"
            )


def quantize_config_json(config: GPTQConfig) -> dict:
    """``quantize_config.json`` as AutoGPTQ's ``BaseQuantizeConfig`` and GPTQModel read it."""
    from lowbit import __version__

    return {
        "bits": config.bits,
        "group_size": config.group_size,
        "damp_percent": config.damp_percent,
        "desc_act": config.desc_act,
        "static_groups": config.static_groups,
        "sym": config.sym,
        "true_sequential": config.true_sequential,
        "quant_method": "gptq",
        "checkpoint_format": config.format,
        "format": config.format,
        "pack_dtype": "int32",
        "model_name_or_path": None,
        "model_file_base_name": None,
        "meta": {"quantizer": [f"lowbit:{__version__}"]},
    }
