"""lowbit inside transformers' own ``from_pretrained`` / ``save_pretrained``.

transformers picks a quantizer by the ``quant_method`` of the config it is given, and the
ecosystem names (``"gptq"``, ``"awq"``, ``"bitsandbytes"``) belong to its built-in quantizers.
So lowbit registers, through transformers' public hooks (``register_quantization_config``,
``register_quantizer``), its own names ``"lowbit_<method>"`` for every lowbit method, and a
config wrapper that carries a lowbit config under such a name::

    from transformers import AutoModelForCausalLM
    import lowbit

    cfg = lowbit.hf_config(lowbit.GPTQConfig(bits=4, group_size=128), calib="my_text.txt")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)  # quantized by lowbit
    model.save_pretrained("out")  # the GPTQ checkpoint lowbit.save_quantized writes

``save_pretrained`` writes the ecosystem layout and ``quantization_config`` (``"gptq"``, ...),
so the folder loads in the peers, in transformers' built-in quantizers where they run, and in
:func:`lowbit.from_pretrained`. lowbit's own ``"rtn"`` checkpoints, which no peer knows, load
through ``AutoModelForCausalLM.from_pretrained(path)`` with lowbit's modules once ``lowbit`` is
imported. Tested with transformers 5.24.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit.config import CONFIGS, QuantConfig, config_from_dict

log = logging.getLogger(__name__)

PREFIX = "lowbit_"
LOWBIT_ONLY = ("rtn",)
"""lowbit methods whose checkpoints name them in ``config.json`` and that transformers lacks:
registered under the plain name too, so those checkpoints load through transformers."""


def hf_method(quant_method: str) -> str:
    """The name lowbit's ``quant_method`` is registered under in transformers."""
    return PREFIX + quant_method


class LowbitHfConfig(QuantizationConfigMixin):
    """A lowbit :class:`QuantConfig` as a transformers quantization config.

    Args:
        config: the lowbit config (or its ``quantization_config`` dict).
        calib: calibration data for GPTQ/AWQ (see :func:`lowbit.quantize`); None takes the
            embedded WikiText-2 text with the tokenizer of the folder being loaded.
    """

    def __init__(self, config: QuantConfig | dict, calib=None) -> None:
        self.config = config_from_dict(config) if isinstance(config, dict) else config
        if not isinstance(self.config, QuantConfig):
            raise TypeError(f"LowbitHfConfig wraps a lowbit QuantConfig, got {type(config).__name__}")
        self.quant_method = hf_method(self.config.quant_method)
        self.calib = calib

    def to_dict(self) -> dict:
        """The lowbit config's dict: what ``config.json`` holds (the ecosystem's ``quant_method``)."""
        return self.config.to_dict()

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        d = dict(config_dict)
        if d.get("quant_method", "").startswith(PREFIX):
            d["quant_method"] = d["quant_method"][len(PREFIX):]
        cfg = cls(d)
        return (cfg, kwargs) if return_unused_kwargs else cfg

    def __repr__(self) -> str:
        return f"LowbitHfConfig({self.config!r})"


def hf_config(config: QuantConfig, calib=None) -> LowbitHfConfig:
    """``config`` for ``AutoModel*.from_pretrained(..., quantization_config=...)`` (registers lowbit)."""
    register()
    return LowbitHfConfig(config, calib)


class LowbitHfQuantizer(HfQuantizer):
    """transformers' side of a lowbit method: modules before loading, quantization after."""

    requires_calibration = False

    def __init__(self, quantization_config: LowbitHfConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        from lowbit.methods import QUANTIZERS

        self.lowbit_config = quantization_config.config
        self.quantizer = QUANTIZERS.get(self.lowbit_config.quant_method)(self.lowbit_config)

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        from lowbit.checkpoint.layouts import LAYOUTS, CanonicalLayout

        if self.pre_quantized and not isinstance(LAYOUTS.get(self.lowbit_config.quant_method), CanonicalLayout):
            raise ValueError(f"a {self.lowbit_config.quant_method!r} checkpoint loads through transformers' own "
                             "quantizer for that method, or through lowbit.from_pretrained(path)")
        devices = set(device_map.values()) if isinstance(device_map, dict) else set()
        if len(devices) > 1:
            raise ValueError(f"lowbit keeps a model on one device; got device_map over {sorted(map(str, devices))}")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.quantizer.update_dtype(dtype) if dtype is not None else dtype

    def _process_model_before_weight_loading(self, model: nn.Module, dtype=None, **kwargs) -> nn.Module:
        if self.pre_quantized:  # empty quantized modules on the meta device; transformers fills them
            from lowbit.checkpoint.loading import swap_in_empty_modules

            swap_in_empty_modules(model, self.quantizer, dtype or torch.float32)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        from lowbit.api import CONFIG_ATTR, fuse_requested, quantize
        from lowbit.formats.base import prepare_model

        if self.pre_quantized:
            setattr(model, CONFIG_ATTR, self.lowbit_config)
            fuse_requested(model, self.lowbit_config, False)
            return prepare_model(model)
        tokenizer = None
        if self.quantizer.requires_calibration and self.quantization_config.calib is None:
            from lowbit.checkpoint.loading import load_tokenizer

            source = Path(str(getattr(model.config, "name_or_path", "") or ""))
            tokenizer = load_tokenizer(source) if source.is_dir() else None
            if tokenizer is None:
                raise ValueError(f"{self.lowbit_config.quant_method} needs calibration text: pass calib= to "
                                 "lowbit.hf_config, or load from a local folder that has a tokenizer")
        quantize(model, self.lowbit_config, self.quantization_config.calib, tokenizer=tokenizer)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module):
        """The state dict in the method's ecosystem layout, as :func:`lowbit.save_quantized` writes it."""
        from lowbit.api import quantized_config
        from lowbit.checkpoint.layouts import LAYOUTS
        from lowbit.checkpoint.safetensors_io import untied_state_dict
        from lowbit.fusion import unfused

        cfg = quantized_config(model)
        with unfused(model):
            return LAYOUTS.get(cfg.quant_method).to_checkpoint(model, untied_state_dict(model), cfg), {}

    def is_serializable(self, safe_serialization=None) -> bool:
        return self.quantizer.is_serializable

    @property
    def is_trainable(self) -> bool:
        return self.quantizer.is_trainable


def register() -> None:
    """Register every lowbit method with transformers (idempotent)."""
    for method in CONFIGS:
        for name in (hf_method(method), *((method,) if method in LOWBIT_ONLY else ())):
            if name not in AUTO_QUANTIZATION_CONFIG_MAPPING:
                register_quantization_config(name)(LowbitHfConfig)
        if hf_method(method) not in AUTO_QUANTIZER_MAPPING:
            register_quantizer(hf_method(method))(LowbitHfQuantizer)
