"""Build transformers models from local folders: plain ones, and lowbit-quantized ones.

A quantized folder is loaded without materialising the fp weights: the model skeleton is
built with parameters on the meta device, its linears are swapped for empty quantized
modules, and the checkpoint tensors are assigned after strict name/shape/dtype checks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from lowbit.checkpoint.layouts import LAYOUTS
from lowbit.checkpoint.safetensors_io import checkpoint_files, load_state_dict
from lowbit.config import QuantConfig
from lowbit.methods import QUANTIZERS
from lowbit.methods.walk import find_linears, set_module

log = logging.getLogger(__name__)


def read_config_json(folder: Path) -> dict:
    """A model folder's ``config.json`` as a dict; unreadable JSON is a ``ValueError`` naming the file."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


def auto_class(config: PretrainedConfig) -> type:
    """``AutoModelForCausalLM`` when the saved architecture is a causal LM (``LlamaForCausalLM``,
    ``GPT2LMHeadModel``, ...), ``AutoModel`` (the bare model, e.g. an encoder) otherwise."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = getattr(config, "architectures", None) or []
    return AutoModelForCausalLM if any(a in causal for a in archs) else AutoModel


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has none (some transformers versions would build
    an empty one from the model type, so the folder must hold tokenizer files)."""
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        log.warning("no tokenizer files in %s", folder)
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        log.warning("no tokenizer loaded from %s: %s", folder, e)
        return None


def load_plain(folder: Path, dtype: torch.dtype, device: torch.device | str) -> tuple[nn.Module, object]:
    """A non-quantized model folder -> (model in eval mode, tokenizer or None).

    Only safetensors weights are read (a folder with only pickled ``.bin`` weights is refused)."""
    checkpoint_files(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = auto_class(config).from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True)
    return model.to(device).eval(), load_tokenizer(folder)


def save_plain(model: nn.Module, path, tokenizer=None) -> Path:
    """Save a non-quantized model (``save_pretrained``: safetensors and ``config.json``) and its
    tokenizer into ``path`` atomically; the inverse of :func:`load_plain`."""
    from lowbit.checkpoint.safetensors_io import atomic_folder

    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def load_quantized(folder: Path, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """A lowbit checkpoint folder -> model whose quantized linears are ``QuantLinear``s."""
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours: transformers must not act on it
    with init_empty_weights(include_buffers=False):
        model = auto_class(config).from_config(config, dtype=dtype)
    swap_in_empty_modules(model, QUANTIZERS.get(qconfig.quant_method)(qconfig), dtype)
    tensors = LAYOUTS.get(qconfig.quant_method).from_checkpoint(model, load_state_dict(folder), qconfig)
    assign_checked(model, tensors, dtype, folder)
    return model.to(device).eval()


def swap_in_empty_modules(model: nn.Module, quantizer, dtype: torch.dtype) -> None:
    """Replace every linear ``quantizer`` quantizes with its empty module (meta device), to load into."""
    for name, lin in find_linears(model, quantizer.skip_modules(model)).items():
        set_module(model, name, quantizer.empty_module(name, lin, dtype))


def assign_checked(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, folder: Path) -> None:
    """Assign checkpoint ``tensors`` to ``model``'s meta-device skeleton, strictly.

    Every checkpoint tensor must name a parameter or buffer of matching shape; integer
    tensors and quantized-module buffers (bias included: each format fixes its dtype) must
    match dtype exactly; plain fp weights are cast to ``dtype``. After re-tying weights,
    nothing may be left on the meta device.
    """
    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"checkpoint {folder} has tensors the model does not: {_few(unexpected)}")
    quant_keys, packed_keys = _quantized_buffer_names(model)
    for name, t in tensors.items():
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, the model expects {tuple(want.shape)}")
        if name in quant_keys or not want.is_floating_point():
            if t.dtype != want.dtype:
                raise ValueError(f"checkpoint tensor {name} has dtype {t.dtype}, the format expects {want.dtype}")
        elif not t.is_floating_point():
            raise ValueError(f"checkpoint tensor {name} has dtype {t.dtype}, expected a floating-point weight")
        else:
            tensors[name] = t.to(dtype)
        if t.is_floating_point() and name not in packed_keys and not torch.isfinite(t).all():
            raise ValueError(f"checkpoint tensor {name} contains NaN or Inf")
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"checkpoint {folder} is missing tensors: {_few(missing)}")


def _quantized_buffer_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """Names of all quantized-module buffers, and of those holding packed bits."""
    from lowbit.formats.base import QuantLinear

    quant, packed = set(), set()
    for mname, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for bname, _ in m.named_buffers(recurse=False):
                quant.add(f"{mname}.{bname}")
                if bname in m.packed_buffers:
                    packed.add(f"{mname}.{bname}")
    return quant, packed


def _few(names: list[str], k: int = 5) -> str:
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more
