"""Convert a quantized checkpoint between layouts: exactly where the math allows, else requantize.

The grouped-int layouts (lowbit's ``rtn``, GPTQ v1 and v2, AutoAWQ GEMM) all hold the same
numbers: codes, a scale and a zero point per group. Converting among them loads the checkpoint
into lowbit's canonical modules and writes it in the target layout; the weights are the same
bit for bit. The target config is read off the weights: ``sym`` only when every zero point is
the midpoint (a symmetric GPTQ reader may ignore ``qzeros``), ``desc_act`` when any ``g_idx``
is permuted.

Some conversions change the numbers and are refused unless ``requantize=True``: act-order
weights into AWQ (which has no ``g_idx``), NF4/FP4 or int8 into a grouped-int layout, grouped
ints into bitsandbytes. Requantizing dequantizes every layer and quantizes it again with the
target config (lossy; GPTQ/AWQ calibrate on the source folder's tokenizer and the embedded text).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lowbit.config import AwqConfig, BitsAndBytesConfig, GPTQConfig, QuantConfig, RtnConfig
from lowbit.formats import IntGroupedLinear, QuantLinear
from lowbit.formats.base import modules_of
from lowbit.formats.packing import unpack_int

TARGETS = ("rtn", "gptq", "gptq_v2", "awq", "bitsandbytes")
GROUPED = ("rtn", "gptq", "gptq_v2", "awq")


def normalize_target(to: str) -> str:
    """``gptq-v2`` -> ``gptq_v2``, ``bnb`` -> ``bitsandbytes``; unknown names are a ``ValueError``."""
    name = {"bnb": "bitsandbytes", "gptq-v2": "gptq_v2"}.get(to.lower(), to.lower())
    if name not in TARGETS:
        raise ValueError(f"unknown conversion target {to!r}; use one of {', '.join(TARGETS)}")
    return name


def zeros_are_midpoint(m: IntGroupedLinear) -> bool:
    z = unpack_int(m.qzeros, m.bits, m.out_features, dim=1)
    return bool((z == 1 << (m.bits - 1)).all())


def exact_config(model: nn.Module, source: QuantConfig, target: str) -> QuantConfig:
    """The ``target`` config that holds ``model``'s grouped-int weights exactly.

    Raises ``ValueError`` naming the obstacle when it cannot (mixed widths or groups,
    act-order into AWQ, a non-grouped source).
    """
    mods = modules_of(model, IntGroupedLinear)
    others = sorted(n for n in modules_of(model, QuantLinear) if n not in mods)
    if others or not mods:
        raise ValueError(f"{source.quant_method} weights ({type(model.get_submodule(others[0])).__name__ if others else 'none'}) "
                         f"are not grouped integers; converting them to {target} changes them: requantize to allow it (--requantize)")
    b, g = source.bits, source.group_size
    odd = sorted(n for n, m in mods.items() if m.bits != b or m.group_size != (m.in_features if g == -1 else g))
    if odd:
        raise ValueError(f"{odd[0]} does not have the checkpoint's bits={b}, group_size={g}")
    sym = all(zeros_are_midpoint(m) for m in mods.values())
    act = sorted(n for n, m in mods.items() if m.is_act_order())
    skip = source.modules_to_not_convert
    if target == "rtn":
        return RtnConfig(bits=b, group_size=g, sym=sym, modules_to_not_convert=skip)
    if target in ("gptq", "gptq_v2"):
        return GPTQConfig(bits=b, group_size=g, sym=sym, desc_act=bool(act), format=target,
                          modules_to_not_convert=skip)
    if act:
        raise ValueError(f"act-order weights ({act[0]}, ...) cannot be stored in the AWQ layout, which has no g_idx: "
                         "requantize to allow it (--requantize)")
    return AwqConfig(bits=b, group_size=g, zero_point=not sym, modules_to_not_convert=skip)


def dequantized(model: nn.Module) -> nn.Module:
    """Replace every quantized linear with an ``nn.Linear`` holding its dequantized weight (in place)."""
    from lowbit.api import CONFIG_ATTR
    from lowbit.methods.walk import set_module

    for name, m in modules_of(model, QuantLinear).items():
        w = m.dequantize()  # fp32 [N, K]
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.float32)
        with torch.no_grad():
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias.float())
        set_module(model, name, lin)
    delattr(model, CONFIG_ATTR)
    return model


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, requantize: bool = False,
            requantize_config: QuantConfig | None = None, calib=None, progress: bool = True) -> QuantConfig:
    """Write the quantized checkpoint ``src`` to ``dst`` in layout ``to``; returns the config written.

    ``requantize_config`` is the target config when requantizing (default: 4-bit, group size
    128 or, for bitsandbytes, NF4); its method must be the target's; ``calib`` feeds GPTQ/AWQ
    (see :func:`lowbit.quantize`). ``dst`` is written atomically; ``src`` is never modified.
    """
    from lowbit.api import CONFIG_ATTR, from_pretrained, quantize, quantized_config, save_quantized
    from lowbit.checkpoint.loading import load_tokenizer

    target = normalize_target(to)
    if requantize_config is not None and requantize_config.quant_method != target.removesuffix("_v2"):
        raise ValueError(f"a {requantize_config.quant_method} config cannot write the {target} layout")
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError("convert writes a new folder: SRC and DST must differ")
    model = from_pretrained(src, prepare=False)  # only saved
    try:
        source = quantized_config(model)
    except ValueError:
        raise ValueError(f"{src} is not a quantized checkpoint; use `lowbit quantize`") from None
    if not requantize:
        if target == "bitsandbytes":
            raise ValueError(f"{source.quant_method} -> bitsandbytes changes the weights: requantize to allow it (--requantize)")
        cfg = exact_config(model, source, target)
        setattr(model, CONFIG_ATTR, cfg)
    else:
        cfg = requantize_config or _default_requantize_config(target)
        dequantized(model)
        quantize(model, cfg, calib, tokenizer=load_tokenizer(Path(src)), progress=progress, prepare=False)
        cfg = quantized_config(model)
    save_quantized(model, dst)
    return cfg


def _default_requantize_config(target: str) -> QuantConfig:
    return {
        "rtn": RtnConfig(bits=4, group_size=128),
        "gptq": GPTQConfig(bits=4, group_size=128),
        "gptq_v2": GPTQConfig(bits=4, group_size=128, format="gptq_v2"),
        "awq": AwqConfig(bits=4, group_size=128),
        "bitsandbytes": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    }[target]
