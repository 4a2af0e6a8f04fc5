"""lowbit: compress transformer language models to low-bit weights and run them fast."""

from lowbit.api import (
    from_pretrained,
    hf_config,
    quantize,
    quantized_config,
    register_with_transformers,
    save_quantized,
)
from lowbit.config import (
    AqlmConfig,
    AwqConfig,
    BitsAndBytesConfig,
    GPTQConfig,
    QuantConfig,
    RtnConfig,
    config_from_dict,
)
from lowbit.formats import Blockwise4Linear, Int8Linear, IntGroupedLinear, QuantLinear
from lowbit.fusion import fuse, unfuse

__version__ = "0.1.0"

__all__ = [
    "AqlmConfig",
    "AwqConfig",
    "BitsAndBytesConfig",
    "GPTQConfig",
    "Blockwise4Linear",
    "Int8Linear",
    "IntGroupedLinear",
    "QuantConfig",
    "QuantLinear",
    "RtnConfig",
    "config_from_dict",
    "from_pretrained",
    "fuse",
    "hf_config",
    "quantize",
    "quantized_config",
    "register_with_transformers",
    "save_quantized",
    "unfuse",
]
