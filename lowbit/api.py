"""The public entry points: quantize a model, save it, load it back."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lowbit.checkpoint.safetensors_io import atomic_folder, save_state_dict, untied_state_dict
from lowbit.config import QuantConfig, config_from_dict
from lowbit.formats.base import QuantLinear, prepare_model
from lowbit.fusion import unfused
from lowbit.methods import QUANTIZERS, Quantizer
from lowbit.methods.calibration import quantize_blockwise
from lowbit.methods.walk import find_linears, set_module

log = logging.getLogger(__name__)

CONFIG_ATTR = "lowbit_quant_config"
"""Attribute of a quantized model holding its :class:`QuantConfig`."""

Calibration = torch.Tensor | str | os.PathLike | Sequence[str] | None
DEFAULT_CALIB_SEQLEN = 512
"""Calibration window when the config's ``model_seqlen`` is None (128 windows of 512 tokens)."""


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib: Calibration = None,
    *,
    tokenizer=None,
    device: torch.device | str | None = None,
    progress: bool = True,
    fuse: bool = False,
    prepare: bool = True,
) -> nn.Module:
    """Quantize ``model`` in place with ``config`` and return it.

    Args:
        model: a transformers model (any architecture with a list of blocks).
        config: e.g. ``RtnConfig(bits=4, group_size=128)``.
        calib: calibration data for methods that need it: an int64 token tensor
            ``[nsamples, seqlen]``, a text file path, a list of strings, or None for the
            embedded WikiText-2 validation text (needs ``tokenizer``).
        device: where blocks are quantized (default: where the model is).
        fuse: join q/k/v and gate/up into one quantized linear each (:mod:`lowbit.fusion`);
            ``AwqConfig(do_fuse=True)`` does too, for its ``modules_to_fuse`` groups.
        prepare: build now what the kernels hold to run the model (:func:`prepare_model`: on a
            CPU a copy of the codes in the CPU kernel's layout, a byte a weight for NF4); False
            for a model that is only saved, whose layouts are then built at its first forward.
    """
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("model is already quantized")
    quantizer = QUANTIZERS.get(config.quant_method)(config)
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    quantizer.validate_environment(device)
    quantizer.check_model(model)
    if quantizer.requires_calibration:
        ids = _calibration_ids(calib, tokenizer, config)
        quantize_blockwise(model, quantizer, ids, device, progress=progress)
        config = _record_left_out(model, quantizer, config)
    else:
        _quantize_weights_only(model, quantizer, progress)
    setattr(model, CONFIG_ATTR, quantizer.finish_config(model, config))
    fuse_requested(model, config, fuse)
    return prepare_model(model) if prepare else model


def fuse_requested(model: nn.Module, config: QuantConfig, fuse: bool) -> list[str]:
    """Fuse ``model``'s projections if ``fuse`` or the config (``AwqConfig.do_fuse``) asks for it;
    return the fused modules' names. ``AwqConfig.fuse_max_seq_len`` sizes AutoAWQ's own attention
    cache; lowbit keeps the model's attention and cache, so only the projections are fused."""
    from lowbit.config import AwqConfig
    from lowbit.fusion import awq_groups
    from lowbit.fusion import fuse as fuse_groups

    if isinstance(config, AwqConfig) and config.do_fuse:
        named = config.modules_to_fuse
        return fuse_groups(model, awq_groups(named) if named else None, strict=bool(named))
    return fuse_groups(model) if fuse else []


def _record_left_out(model: nn.Module, quantizer: Quantizer, config: QuantConfig) -> QuantConfig:
    """Add linears the block runner did not reach (outside the blocks, e.g. a BERT pooler) to
    ``modules_to_not_convert``, so the saved config loads them back as plain linears."""
    left = sorted(find_linears(model, quantizer.skip_modules(model)))
    if not left:
        return config
    log.warning("left unquantized (outside the transformer blocks, no calibration inputs): %s", ", ".join(left))
    return config.replace(modules_to_not_convert=(*(config.modules_to_not_convert or ()), *left))


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device`` that exists here (``ValueError`` naming it otherwise)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r} is not available: this machine has {torch.cuda.device_count()} "
                         "CUDA/ROCm GPU(s); use --device cpu")
    if dev.type not in ("cpu", "cuda", "meta") and not hasattr(torch, dev.type):
        raise ValueError(f"device {device!r} is not supported; use cpu or cuda")
    return dev


def _calibration_ids(calib: Calibration, tokenizer, config: QuantConfig) -> torch.Tensor:
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration tokens must be an int tensor [nsamples, seqlen], got {calib.dtype} {tuple(calib.shape)}")
        if calib.shape[0] < 1 or calib.shape[1] < 2:
            raise ValueError(f"too little calibration data: token tensor of shape {tuple(calib.shape)}; "
                             "give at least one window of 2 or more tokens")
        return calib.long()
    if tokenizer is None:
        raise ValueError(f"{config.quant_method} needs calibration data: pass token ids, or a tokenizer with text")
    from lowbit.eval.data import calibration_batch, calibration_texts

    nsamples = getattr(config, "nsamples", 128)
    seqlen = getattr(config, "model_seqlen", None) or DEFAULT_CALIB_SEQLEN
    return calibration_batch(tokenizer, calibration_texts(calib), nsamples, seqlen)


def _quantize_weights_only(model: nn.Module, quantizer: Quantizer, progress: bool) -> None:
    from tqdm.auto import tqdm

    linears = find_linears(model, quantizer.skip_modules(model))
    for name, lin in tqdm(linears.items(), desc="quantizing layers", disable=not progress):
        with torch.no_grad():
            set_module(model, name, quantizer.quantize_layer(name, lin, None))


def quantized_config(model: nn.Module) -> QuantConfig:
    """The :class:`QuantConfig` a model was quantized with (``ValueError`` if it wasn't)."""
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise ValueError("model is not quantized by lowbit (no quantization config attached)")
    return cfg


def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer=None, max_shard_size: int | str = "2GB") -> Path:
    """Write a quantized model as safetensors shards + ``config.json`` + tokenizer to ``path``.

    ``tokenizer=None`` copies the tokenizer of the folder the model was loaded from, when that
    folder has one. The folder is built beside ``path`` and moved into place when complete.
    Tied weights are stored once and re-tied on load.
    """
    from lowbit.checkpoint.layouts import LAYOUTS

    qcfg = quantized_config(model)
    if tokenizer is None:
        tokenizer = _source_tokenizer(model)
    layout = LAYOUTS.get(qcfg.quant_method)
    with unfused(model):  # the checkpoint layout never changes
        tensors = layout.to_checkpoint(model, untied_state_dict(model), qcfg)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]  # how loading picks the model class
    config["quantization_config"] = qcfg.to_dict()
    with atomic_folder(path) as tmp:
        save_state_dict(tensors, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for fname, text in layout.extra_files(qcfg).items():
            (tmp / fname).write_text(text)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def _source_tokenizer(model: nn.Module):
    """The tokenizer in the local folder ``model`` was loaded from, or None."""
    from lowbit.checkpoint.loading import load_tokenizer

    source = str(getattr(model, "name_or_path", "") or "")
    return load_tokenizer(Path(source)) if source and Path(source).is_dir() else None


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    quantization_config: QuantConfig | None = None,
    calib: Calibration = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    kernel: str = "auto",
    progress: bool = True,
    fuse: bool = False,
    prepare: bool = True,
) -> nn.Module:
    """Load a lowbit checkpoint, or load a plain model and quantize it.

    Args:
        name_or_path: a local model folder, or ``"default"`` for the embedded SmolLM2-135M.
        quantization_config: quantize a plain model with this config (must be None for a
            folder that is already quantized).
        dtype: dtype of the unquantized parts (default fp32, which every CPU runs).
        kernel: ``"auto"`` or a kernel name forced on every quantized linear.
        fuse: join q/k/v and gate/up (see :func:`quantize`); a checkpoint whose AWQ config has
            ``do_fuse`` is fused too.
        prepare: False for a model that is only saved (see :func:`quantize`).
    """
    from lowbit.checkpoint.loading import load_plain, load_quantized, read_config_json
    from lowbit.models import resolve_model

    device = resolve_device(device)
    folder = resolve_model(str(name_or_path))
    qdict = read_config_json(folder).get("quantization_config")
    if qdict is not None and not isinstance(qdict, dict):
        raise ValueError(f"{folder / 'config.json'}: quantization_config must be a JSON object, not {type(qdict).__name__}")
    if qdict is not None and qdict.get("quant_method") != "gguf":
        if quantization_config is not None:
            raise ValueError(f"{folder} is already quantized ({qdict.get('quant_method')}); drop quantization_config")
        qcfg = config_from_dict(qdict)
        model = load_quantized(folder, qcfg, dtype=dtype or torch.float32, device=device)
        setattr(model, CONFIG_ATTR, qcfg)
        fuse_requested(model, qcfg, fuse)
        if prepare:
            prepare_model(model)
    else:
        model, tokenizer = load_plain(folder, dtype=dtype or torch.float32, device=device)
        if quantization_config is not None:  # quantize() fuses and prepares
            quantize(model, quantization_config, calib, tokenizer=tokenizer, device=device, progress=progress,
                     fuse=fuse, prepare=prepare)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = kernel
    return model


def hf_config(config: QuantConfig, calib: Calibration = None):
    """``config`` for transformers' ``from_pretrained(..., quantization_config=...)``: the model is
    quantized by lowbit and ``save_pretrained`` writes lowbit's checkpoint. See
    :mod:`lowbit.integrations.transformers` (imported here, not at ``import lowbit``: it is slow)."""
    from lowbit.integrations.transformers import hf_config as _hf_config

    return _hf_config(config, calib)


def register_with_transformers() -> None:
    """Register lowbit's methods with transformers, so that ``AutoModel*.from_pretrained(path)`` of
    a lowbit ``rtn`` checkpoint loads with lowbit's modules (:func:`hf_config` also does this)."""
    from lowbit.integrations.transformers import register

    register()
