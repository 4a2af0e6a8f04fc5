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
                          name: str = "qzeros", wrapped_v1: bool = False) -> torch.Tensor:
    """The format's stored packed zeros -> canonical (true) packed zeros.

    For a symmetric checkpoint every true zero is ``2**(bits-1)``; stored zeros that match the
    other format's value instead are read as that format (logged), and anything else raises.

    A v1 zero point of 0 has no stored value (``0 - 1``). ``wrapped_v1`` reads the wrapped value
    GPTQModel writes for it (:func:`gptqmodel_v1_to_true`); otherwise such a checkpoint raises.
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
    if wrapped_v1:
        return gptqmodel_v1_to_true(stored, bits, n)
    if int(z.max()) + offset >= 1 << bits:
        raise ValueError(
            f"{name}: stored zero point {int(z.max())} + {offset} does not fit {bits} bits; the checkpoint holds "
            "an overflowed v1 zero (written for a true zero of 0, a known defect of some writers) and "
            "cannot be read exactly (GPTQModel's wrapped zeros are read when meta.quantizer names it)"
        )
    return pack_int(z + offset, bits, dim=1)


def gptqmodel_v1_to_true(stored: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """GPTQModel's v1 zeros (int32 ``[G, ceil(N*bits/32)]``) -> the true packed zeros, exactly.

    GPTQModel quantizes with true zeros and writes v1 by undoing its own reader: for 2, 4 and 8
    bits it subtracts ``0x55555555``/``0x11111111``/``0x01010101`` from each 32-bit word (a zero
    of 0 borrows from the next field of the word), for 3 bits it takes 1 from each field modulo 8
    (a zero of 0 is stored as 7). Adding back the same way recovers every true zero, 0 included.

    Worked example (4 bits, fields listed low first)::

        true [0, 3, 0, 0, 0, 0, 0, 0] = 0x00000030 -> stored 0x00000030 - 0x11111111 = 0xEEEEEF1F
        stored fields [15, 1, 15, 14, 14, 14, 14, 14]; + 0x11111111 -> 0x00000030 again
    """
    if bits == 3:
        z = (unpack_int(stored, bits, n, dim=1) + 1) & 0b111
        return pack_int(z, bits, dim=1)
    ones = sum(1 << (bits * i) for i in range(32 // bits))  # 1 in every field of a word
    words = (stored.to(torch.int64) + ones) & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def written_by_gptqmodel(config: GPTQConfig) -> bool:
    """Whether ``meta.quantizer`` names GPTQModel (``["gptqmodel:7.7.0"]``), whose v1 zeros wrap."""
    quantizer = (config.meta or {}).get("quantizer") or []
    names = [quantizer] if isinstance(quantizer, str) else quantizer
    return any(str(q).lower().startswith("gptqmodel") for q in names)


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
                                             config.sym, key, wrapped_v1=written_by_gptqmodel(config))
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
