"""Quantization configs: frozen, keyword-only dataclasses with transformers' field names.

Each config is plain data. It is validated in ``__post_init__``, serializes with :meth:`to_dict`
to the ``quantization_config`` entry of ``config.json``, and is read back with
:func:`config_from_dict`, which dispatches on ``quant_method`` through :data:`CONFIGS`::

    cfg = GPTQConfig(bits=4, group_size=128)
    assert config_from_dict(json.loads(cfg.to_json_string())) == cfg

Field names and defaults are those of transformers 5.23 (``transformers.utils.quantization_config``),
plus the 4.x fields that 5.x dropped, so a ``config.json`` written by transformers 4.x/5.x,
AutoGPTQ or AutoAWQ loads. Keys on input are checked, never silently dropped: each class lists
its accepted legacy synonyms (``_ALIASES``) and the keys it deliberately ignores
(``_IGNORED_INPUT_KEYS``); anything else is a ``ValueError``. Legacy keys that transformers
still writes (GPTQ ``checkpoint_format``, AWQ ``version``, bnb ``_load_in_4bit``/``_load_in_8bit``)
are written too, so transformers can read what lowbit writes.

The base class, :data:`CONFIGS` and :func:`config_from_dict` are defined in
:mod:`lowbit._config_base`; import them from here.

Fields holding dicts (``meta``, ``exllama_config``, ``modules_to_fuse``) are stored as private
JSON-plain copies; such configs compare fine but are not hashable.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import InitVar, dataclass
from typing import Any, ClassVar

from lowbit._config_base import CONFIGS, QuantConfig, config_from_dict, registered
from lowbit._config_fields import (
    check_bool,
    check_choice,
    check_dtype_name,
    check_exllama_config,
    check_float,
    check_group_size,
    check_int,
    check_json_dict,
    check_legacy_format,
    check_nested_str_tuple,
    check_str,
    check_str_tuple,
    set_field,
)

log = logging.getLogger(__name__)

__all__ = ["CONFIGS", "AqlmConfig", "AwqConfig", "BitsAndBytesConfig", "GPTQConfig", "QuantConfig", "RtnConfig",
           "config_from_dict"]  # the base's names with the configs

INT_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_FORMATS = ("gemm", "gemv", "gemv_fast", "llm-awq", "exllama", "ipex")  # 5.x AwqFormat + 4.x versions
# transformers 5.23 ``AwqBackend`` values; 4.x's "autoawq" and "llm-awq" are mapped in __post_init__.
AWQ_BACKENDS = (
    "auto", "auto_trainable", "machete", "marlin", "exllama_v2", "exllama_v1", "gemm", "gemm_triton",
    "gemv", "gemv_fast", "torch_awq", "torch_fused_awq",
)
BNB_QUANT_TYPES = ("fp4", "nf4")
BNB_COMPUTE_DTYPES = ("float16", "bfloat16", "float32")
BNB_ROUNDINGS = ("nearest", "gptq")
BNB_STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32", "float64")  # as transformers
# GPTQConfig fields transformers 5's AwqConfig inherits and writes; AWQ never reads them.
_GPTQ_KEYS_IN_AWQ = frozenset({
    "tokenizer", "dataset", "damp_percent", "desc_act", "act_group_aware", "sym", "true_sequential", "meta",
    "block_name_to_quantize", "module_name_preceding_first_block", "batch_size",
    "pad_token_id", "max_input_length", "cache_block_outputs", "modules_in_block_to_quantize",
})
_AUTOGPTQ_ALIASES = {"w_bit": "bits", "q_group_size": "group_size"}


@registered
@dataclass(frozen=True, kw_only=True)
class GPTQConfig(QuantConfig):
    """GPTQ (AutoGPTQ/GPTQModel/transformers layout). ``bits`` is required.

    ``backend=None`` means ``"auto"``; ``act_group_aware`` is switched off when ``desc_act`` is on
    (both as in transformers). ``checkpoint_format`` is the legacy name of ``format``.
    ``pack_dtype`` is GPTQModel's (only int32 words are read). ``nsamples`` (calibration
    windows of ``model_seqlen`` tokens) and ``block_size`` (lazy-batch width of the solver) are
    lowbit's own.
    """

    quant_method: ClassVar[str] = "gptq"
    _ALIASES: ClassVar[Mapping[str, str]] = _AUTOGPTQ_ALIASES
    # AutoGPTQ file metadata and transformers 4.33's kernel switch: they do not describe the weights.
    _IGNORED_INPUT_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"model_name_or_path", "model_file_base_name", "disable_exllama"}
    )
    _LEGACY_OUTPUT: ClassVar[Mapping[str, str]] = {"checkpoint_format": "format"}
    _CHECKED_INPUT_KEYS: ClassVar[frozenset[str]] = frozenset({"method", "lm_head"})  # GPTQModel's

    bits: int
    tokenizer: Any = None
    dataset: str | tuple[str, ...] | None = None
    group_size: int = 128
    damp_percent: float = 0.1
    desc_act: bool = False
    act_group_aware: bool = True
    sym: bool = True
    true_sequential: bool = True
    format: str = "gptq"
    meta: dict[str, Any] | None = None
    backend: str | None = None
    model_seqlen: int | None = None
    block_name_to_quantize: str | None = None
    module_name_preceding_first_block: tuple[str, ...] | None = None
    batch_size: int = 1
    pad_token_id: int | None = None
    max_input_length: int | None = None
    cache_block_outputs: bool = True
    modules_in_block_to_quantize: tuple[tuple[str, ...], ...] | None = None
    static_groups: bool = False
    use_cuda_fp16: bool = False  # transformers 4.x
    use_exllama: bool | None = None  # transformers 4.x
    exllama_config: dict[str, Any] | None = None  # transformers 4.x
    pack_dtype: str = "int32"  # GPTQModel >= 1.8.1
    nsamples: int = 128
    block_size: int = 128
    checkpoint_format: InitVar[str | None] = None

    def __post_init__(self, checkpoint_format: str | None) -> None:
        check_legacy_format(self, "checkpoint_format", checkpoint_format, "gptq")
        super().__post_init__()

    @classmethod
    def _take_checked_keys(cls, kw: dict[str, Any]) -> None:
        # GPTQModel (7.x) writes its method name again as "method", and "lm_head" (a quantized head)
        method = kw.pop("method", "gptq")
        if str(method).lower() != "gptq":
            raise ValueError(f"GPTQConfig: method={method!r} (GPTQModel's method name) is not 'gptq'")
        if kw.pop("lm_head", False) is not False:
            raise ValueError("GPTQConfig: lm_head=True (a quantized output head) is not supported; "
                             "lowbit loads GPTQ checkpoints whose head is unquantized")

    def _validate(self) -> None:
        check_int(self, "bits", choices=INT_BITS)
        check_group_size(self)
        check_float(self, "damp_percent", lambda x: 0 < x < 1, "0 < damp_percent < 1")
        check_choice(self, "format", GPTQ_FORMATS, lower=True)
        check_choice(self, "pack_dtype", ("int32",))
        if not isinstance(self.dataset, str):
            check_str_tuple(self, "dataset")
        for name in ("desc_act", "act_group_aware", "sym", "true_sequential", "cache_block_outputs",
                     "static_groups", "use_cuda_fp16"):
            check_bool(self, name)
        check_bool(self, "use_exllama", optional=True)
        for name in ("meta", "exllama_config"):
            check_json_dict(self, name)
        check_exllama_config(self)
        check_str(self, "backend", optional=True, lower=True)
        if self.backend is None:
            set_field(self, "backend", "auto")
        for name in ("model_seqlen", "max_input_length"):
            check_int(self, name, optional=True, minimum=1)
        check_int(self, "pad_token_id", optional=True)
        for name in ("batch_size", "nsamples", "block_size"):
            check_int(self, name, minimum=1)
        check_str(self, "block_name_to_quantize", optional=True)
        check_str_tuple(self, "module_name_preceding_first_block")
        check_nested_str_tuple(self, "modules_in_block_to_quantize")
        if self.desc_act and self.act_group_aware:
            log.debug("GPTQConfig: act_group_aware switched off because desc_act=True (as in transformers)")
            set_field(self, "act_group_aware", False)


@registered
@dataclass(frozen=True, kw_only=True)
class AwqConfig(QuantConfig):
    """AWQ (AutoAWQ layouts). ``version`` is the legacy (case-insensitive) name of ``format``.

    As in transformers, ``backend="autoawq"`` means ``"auto"`` and ``backend="llm-awq"`` means
    ``format="llm-awq"``. The GEMM layout itself holds 4 bits only; the layout checks that.
    ``duo_scaling`` and ``nsamples`` are lowbit's own search settings; ``model_seqlen`` (None: 512)
    is the calibration window, as in transformers' GPTQConfig, which its AwqConfig inherits.
    """

    quant_method: ClassVar[str] = "awq"
    _ALIASES: ClassVar[Mapping[str, str]] = _AUTOGPTQ_ALIASES
    _IGNORED_INPUT_KEYS: ClassVar[frozenset[str]] = _GPTQ_KEYS_IN_AWQ
    _LEGACY_OUTPUT: ClassVar[Mapping[str, str]] = {"version": "format"}

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    format: str = "gemm"
    backend: str = "auto"
    do_fuse: bool | None = None  # transformers 4.x
    fuse_max_seq_len: int | None = None  # transformers 4.x
    modules_to_fuse: dict[str, Any] | None = None  # transformers 4.x
    exllama_config: dict[str, Any] | None = None  # transformers 4.x
    duo_scaling: bool = True
    nsamples: int = 128
    model_seqlen: int | None = None  # transformers' (inherited from GPTQConfig): calibration window
    version: InitVar[str | None] = None

    def __post_init__(self, version: str | None) -> None:
        check_legacy_format(self, "version", version, "gemm")
        super().__post_init__()

    def _validate(self) -> None:
        check_int(self, "bits", choices=INT_BITS)
        check_group_size(self)
        for name in ("zero_point", "duo_scaling"):
            check_bool(self, name)
        check_str(self, "backend", lower=True)
        if self.backend == "autoawq":
            set_field(self, "backend", "auto")
        if self.backend == "llm-awq":
            set_field(self, "backend", "auto")
            set_field(self, "format", "llm-awq")
        check_choice(self, "backend", AWQ_BACKENDS)
        check_choice(self, "format", AWQ_FORMATS, lower=True)
        check_bool(self, "do_fuse", optional=True)
        check_int(self, "fuse_max_seq_len", optional=True, minimum=1)
        if self.do_fuse and self.fuse_max_seq_len is None:
            raise ValueError("AwqConfig.do_fuse=True needs fuse_max_seq_len; set it to the longest sequence to fuse for")
        for name in ("modules_to_fuse", "exllama_config"):
            check_json_dict(self, name)
        check_exllama_config(self)
        check_int(self, "nsamples", minimum=1)
        check_int(self, "model_seqlen", optional=True, minimum=2)


@registered
@dataclass(frozen=True, kw_only=True)
class BitsAndBytesConfig(QuantConfig):
    """bitsandbytes LLM.int8 (``load_in_8bit``) or FP4/NF4 (``load_in_4bit``): exactly one is True.

    ``bnb_4bit_compute_dtype``/``bnb_4bit_quant_storage`` accept a ``torch.dtype`` or its name and
    are stored as names (``None`` means transformers' defaults, float32 and uint8). ``to_dict``
    also writes transformers' ``_load_in_4bit``/``_load_in_8bit``, which are accepted on input.

    The last six fields are lowbit's own. ``int8_activations=False`` keeps LLM.int8's weights
    and checkpoint but leaves the activations in floating point: the product is with the
    dequantized weight ``CB * SCB / 127``, so ``llm_int8_threshold`` has no effect (on
    SmolLM2-135M the int8 activations cost 1.4 % of perplexity, the int8 weights 0.1 %:
    docs/quality.md). ``rounding="gptq"`` keeps the format (the same row scales or block absmax,
    the same kernels, a checkpoint transformers + bitsandbytes loads) but picks each code with
    GPTQ's error feedback instead of the nearest one, from the layers' Hessians on calibration
    text (``nsamples`` windows of ``model_seqlen`` tokens, None: 512; ``damp_percent`` of the
    mean diagonal dampens the Hessian). ``desc_act`` solves the columns in decreasing Hessian
    diagonal (act-order); the grid does not depend on the order, so unlike GPTQ's grouped ints
    it costs nothing at run time, hence on by default (NF4 on SmolLM2: perplexity 1.108 of fp32
    with it, 1.137 without). ``"nearest"`` is bitsandbytes' own rounding and needs no data.
    """

    quant_method: ClassVar[str] = "bitsandbytes"
    _ALIASES: ClassVar[Mapping[str, str]] = {"_load_in_8bit": "load_in_8bit", "_load_in_4bit": "load_in_4bit"}
    _LEGACY_OUTPUT: ClassVar[Mapping[str, str]] = {"_load_in_8bit": "load_in_8bit", "_load_in_4bit": "load_in_4bit"}

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: tuple[str, ...] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: str | None = None
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: str | None = None
    int8_activations: bool = True
    rounding: str = "nearest"
    desc_act: bool = True
    damp_percent: float = 0.01
    nsamples: int = 128
    model_seqlen: int | None = None

    def _validate(self) -> None:
        for name in ("load_in_8bit", "load_in_4bit", "llm_int8_enable_fp32_cpu_offload",
                     "llm_int8_has_fp16_weight", "bnb_4bit_use_double_quant", "int8_activations", "desc_act"):
            check_bool(self, name)
        if self.load_in_8bit == self.load_in_4bit:
            raise ValueError(
                f"BitsAndBytesConfig.load_in_8bit={self.load_in_8bit} and load_in_4bit={self.load_in_4bit}: "
                "exactly one of them must be True"
            )
        check_float(self, "llm_int8_threshold", lambda x: x >= 0, "llm_int8_threshold >= 0")
        check_str_tuple(self, "llm_int8_skip_modules")
        check_dtype_name(self, "bnb_4bit_compute_dtype", BNB_COMPUTE_DTYPES)
        check_choice(self, "bnb_4bit_quant_type", BNB_QUANT_TYPES)
        check_dtype_name(self, "bnb_4bit_quant_storage", BNB_STORAGE_DTYPES)
        check_choice(self, "rounding", BNB_ROUNDINGS)
        check_float(self, "damp_percent", lambda x: 0 < x < 1, "0 < damp_percent < 1")
        check_int(self, "nsamples", minimum=1)
        check_int(self, "model_seqlen", optional=True, minimum=2)

    def label(self) -> str:
        """Short description, e.g. ``bnb nf4 double-quant`` or ``bnb int8 t6.0``."""
        rounded = " gptq-rounded" if self.rounding == "gptq" else ""
        if self.load_in_8bit:
            compute = f"t{self.llm_int8_threshold:g}" if self.int8_activations else "weight-only"
            return f"bnb int8 {compute}{rounded}"
        return f"bnb {self.bnb_4bit_quant_type}" + (" double-quant" if self.bnb_4bit_use_double_quant else "") + rounded


@registered
@dataclass(frozen=True, kw_only=True)
class AqlmConfig(QuantConfig):
    """AQLM additive quantization: ``num_codebooks`` codebooks of ``2**nbits_per_codebook`` vectors,
    each of ``out_group_size x in_group_size`` weights.

    The first five fields are transformers'. The rest are lowbit's own search settings (see
    :func:`lowbit.methods.aqlm.aqlm_quantize`): calibration windows (``nsamples`` of
    ``model_seqlen`` tokens, None: 512), ``beam_size``, ``max_iterations`` and
    ``relative_tolerance`` of the code/codebook alternation, ``kmeans_iterations`` of the
    initialisation, ``codebook_steps`` of conjugate gradient per codebook update, the Hessian's
    ``damp_percent``, ``seed``, and ``true_sequential`` (as GPTQ's). ``finetune_steps`` Adam steps
    (0: none) then tune each block's codebooks and scales, codes fixed, so that the quantized
    block's outputs match the full-precision block's on the calibration windows
    (``finetune_lr``, ``finetune_batch_size`` windows a step; :func:`lowbit.methods.aqlm_tune.finetune_block`).
    The learning rate's default, 1e-3, is for few steps: on SmolLM2's first block (2x8, 32 windows
    of 512 tokens) 20 steps cut the block's output error by 18 % at 1e-3 and by 12 % at 1e-4.
    """

    quant_method: ClassVar[str] = "aqlm"

    in_group_size: int = 8
    out_group_size: int = 1
    num_codebooks: int = 1
    nbits_per_codebook: int = 16
    linear_weights_not_to_quantize: tuple[str, ...] | None = None
    nsamples: int = 128
    model_seqlen: int | None = None
    beam_size: int = 4
    max_iterations: int = 8
    relative_tolerance: float = 0.02
    kmeans_iterations: int = 5
    codebook_steps: int = 10
    damp_percent: float = 0.01
    seed: int = 0
    true_sequential: bool = True
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 4

    def _validate(self) -> None:
        for name in ("in_group_size", "out_group_size", "num_codebooks", "nsamples", "beam_size", "max_iterations",
                     "finetune_batch_size"):
            check_int(self, name, minimum=1)
        check_int(self, "finetune_steps", minimum=0)
        check_float(self, "finetune_lr", lambda x: 0 < x < 1, "0 < finetune_lr < 1")
        check_int(self, "nbits_per_codebook", minimum=1, maximum=16)
        check_str_tuple(self, "linear_weights_not_to_quantize")
        check_int(self, "model_seqlen", optional=True, minimum=2)
        for name in ("kmeans_iterations", "codebook_steps", "seed"):
            check_int(self, name, minimum=0)
        check_float(self, "relative_tolerance", lambda x: 0 <= x < 1, "0 <= relative_tolerance < 1")
        check_float(self, "damp_percent", lambda x: 0 < x < 1, "0 < damp_percent < 1")
        check_bool(self, "true_sequential")

    def label(self) -> str:
        """Short description, e.g. ``aqlm 2x8 g8``."""
        og = f"x{self.out_group_size}" if self.out_group_size != 1 else ""
        return f"aqlm {self.num_codebooks}x{self.nbits_per_codebook} g{self.in_group_size}{og}"


@registered
@dataclass(frozen=True, kw_only=True)
class RtnConfig(QuantConfig):
    """lowbit's round-to-nearest baseline: grouped integer weights, no calibration data."""

    quant_method: ClassVar[str] = "rtn"

    bits: int = 4
    group_size: int = 128
    sym: bool = True

    def _validate(self) -> None:
        check_int(self, "bits", choices=INT_BITS)
        check_group_size(self)
        check_bool(self, "sym")
