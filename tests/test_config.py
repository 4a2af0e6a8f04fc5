"""Quantization configs: validation, JSON round trips, legacy keys, and transformers compatibility."""

from __future__ import annotations

import dataclasses
import inspect
import json
from enum import Enum

import pytest
import torch

from lowbit.config import (
    CONFIGS,
    AqlmConfig,
    AwqConfig,
    BitsAndBytesConfig,
    GPTQConfig,
    QuantConfig,
    RtnConfig,
    config_from_dict,
)

DEFAULTS = {
    "gptq": GPTQConfig(bits=4),
    "awq": AwqConfig(),
    "bnb4": BitsAndBytesConfig(load_in_4bit=True),
    "bnb8": BitsAndBytesConfig(load_in_8bit=True),
    "aqlm": AqlmConfig(),
    "rtn": RtnConfig(),
}

NON_DEFAULTS = {
    "gptq": GPTQConfig(
        bits=3, tokenizer="gpt2", dataset=["hello", "world"], group_size=-1, damp_percent=0.05, desc_act=True,
        sym=False, true_sequential=False, format="gptq_v2", meta={"quantizer": ["lowbit:0.1.0"]}, backend="triton",
        model_seqlen=512, block_name_to_quantize="model.layers", module_name_preceding_first_block=["model.embed"],
        batch_size=2, pad_token_id=0, max_input_length=1024, cache_block_outputs=False,
        modules_in_block_to_quantize=[["self_attn.q_proj", "self_attn.k_proj"], ["mlp.down_proj"]],
        static_groups=True, use_cuda_fp16=True, use_exllama=False, exllama_config={"version": 2}, nsamples=64,
        block_size=32, modules_to_not_convert=["lm_head"],
    ),
    "awq": AwqConfig(
        bits=8, group_size=64, zero_point=False, format="GEMV", backend="gemv", do_fuse=True, fuse_max_seq_len=512,
        modules_to_fuse={"attention": ["q_proj", "k_proj"], "hidden_size": 64, "use_alibi": False},
        exllama_config={"version": 2, "max_input_len": 2048, "max_batch_size": 8}, duo_scaling=False,
        nsamples=32, modules_to_not_convert=["visual"],
    ),
    "bnb8": BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_threshold=4, llm_int8_skip_modules=["lm_head"],
        llm_int8_enable_fp32_cpu_offload=True, llm_int8_has_fp16_weight=True, rounding="gptq", damp_percent=0.05,
        nsamples=16, model_seqlen=256, desc_act=False, int8_activations=False,
    ),
    "bnb4": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage="torch.float16",
    ),
    "aqlm": AqlmConfig(
        in_group_size=16, out_group_size=2, num_codebooks=2, nbits_per_codebook=8,
        linear_weights_not_to_quantize=["model.embed_tokens.weight", "lm_head.weight"],
    ),
    "rtn": RtnConfig(bits=8, group_size=-1, sym=False, modules_to_not_convert=["mlp"]),
}

ALL = {f"default-{k}": v for k, v in DEFAULTS.items()} | {f"custom-{k}": v for k, v in NON_DEFAULTS.items()}


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", ALL.values(), ids=ALL.keys())
def test_json_round_trip(cfg: QuantConfig):
    d = json.loads(json.dumps(cfg.to_dict()))
    back = config_from_dict(d)
    assert back == cfg and type(back) is type(cfg)
    assert QuantConfig.from_dict(d) == cfg
    assert type(cfg).from_dict(d) == cfg
    assert json.loads(cfg.to_json_string()) == d


def test_to_json_string_is_sorted_and_indented():
    s = RtnConfig().to_json_string()
    assert s.splitlines()[1] == '  "bits": 4,'
    assert list(json.loads(s)) == sorted(json.loads(s))


@pytest.mark.parametrize("cfg", ALL.values(), ids=ALL.keys())
def test_to_dict_has_every_field_and_quant_method(cfg: QuantConfig):
    d = cfg.to_dict()
    assert d["quant_method"] == cfg.quant_method
    assert {f.name for f in dataclasses.fields(cfg)} | {"quant_method"} <= set(d)


def test_registry_holds_every_config():
    assert list(CONFIGS) == ["aqlm", "awq", "bitsandbytes", "gptq", "rtn"]


def test_lists_become_tuples_and_dicts_are_copied():
    meta = {"quantizer": ["x"]}
    cfg = GPTQConfig(bits=4, dataset=["a"], meta=meta, modules_in_block_to_quantize=[["q"], ["k", "v"]])
    meta["quantizer"].append("y")
    assert cfg.dataset == ("a",) and cfg.meta == {"quantizer": ["x"]}
    assert cfg.modules_in_block_to_quantize == (("q",), ("k", "v"))
    assert RtnConfig(modules_to_not_convert=["lm_head"]).modules_to_not_convert == ("lm_head",)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RtnConfig().bits = 8  # type: ignore[misc]


def test_replace_returns_a_validated_copy():
    cfg = RtnConfig(bits=4)
    assert cfg.replace(bits=8) == RtnConfig(bits=8) and cfg.bits == 4
    with pytest.raises(ValueError, match=r"RtnConfig\.bits=5"):
        cfg.replace(bits=5)
    assert AwqConfig(version="gemv").replace(format="gemm").format == "gemm"


def test_gptq_normalizations():
    assert GPTQConfig(bits=4).backend == "auto"
    assert GPTQConfig(bits=4, backend="TRITON").backend == "triton"
    assert GPTQConfig(bits=4, desc_act=True).act_group_aware is False  # as transformers does
    assert BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="half").bnb_4bit_compute_dtype == "float16"
    assert BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4).llm_int8_threshold == 4.0


def test_unserializable_tokenizer_is_a_type_error():
    cfg = GPTQConfig(bits=4, tokenizer=object())
    with pytest.raises(TypeError, match=r"GPTQConfig\.tokenizer"):
        cfg.to_dict()


# --- validation ----------------------------------------------------------------------------

BAD_VALUES = [
    ("gptq-bits", GPTQConfig, {"bits": 5}, r"GPTQConfig\.bits=5 is not supported; use one of 2, 3, 4, 8"),
    ("gptq-group_size", GPTQConfig, {"bits": 4, "group_size": 0}, r"GPTQConfig\.group_size=0 .*-1"),
    ("gptq-damp-0", GPTQConfig, {"bits": 4, "damp_percent": 0}, r"GPTQConfig\.damp_percent=0\.0 .*0 < damp"),
    ("gptq-damp-1", GPTQConfig, {"bits": 4, "damp_percent": 1.0}, r"GPTQConfig\.damp_percent=1\.0"),
    ("gptq-damp-nan", GPTQConfig, {"bits": 4, "damp_percent": float("nan")}, r"GPTQConfig\.damp_percent=nan"),
    ("gptq-format", GPTQConfig, {"bits": 4, "format": "marlin"}, r"GPTQConfig\.format='marlin' .*'gptq_v2'"),
    ("gptq-batch_size", GPTQConfig, {"bits": 4, "batch_size": 0}, r"GPTQConfig\.batch_size=0 .*>= 1"),
    ("gptq-nsamples", GPTQConfig, {"bits": 4, "nsamples": 0}, r"GPTQConfig\.nsamples=0"),
    ("gptq-block_size", GPTQConfig, {"bits": 4, "block_size": -1}, r"GPTQConfig\.block_size=-1"),
    ("gptq-model_seqlen", GPTQConfig, {"bits": 4, "model_seqlen": 0}, r"GPTQConfig\.model_seqlen=0"),
    ("gptq-exllama", GPTQConfig, {"bits": 4, "exllama_config": {"version": 3}}, r"GPTQConfig\.exllama_config=.*'version' 1 or 2"),
    ("gptq-checkpoint_format-conflict", GPTQConfig, {"bits": 4, "format": "gptq_v2", "checkpoint_format": "gptq"},
     r"GPTQConfig\.checkpoint_format='gptq' conflicts with format='gptq_v2'"),
    ("awq-bits", AwqConfig, {"bits": 1}, r"AwqConfig\.bits=1 is not supported; use one of 2, 3, 4, 8"),
    ("awq-group_size", AwqConfig, {"group_size": -2}, r"AwqConfig\.group_size=-2"),
    ("awq-version", AwqConfig, {"version": "marlin"}, r"AwqConfig\.format='marlin' is not supported; use one of 'gemm'"),
    ("awq-format", AwqConfig, {"format": "gptq"}, r"AwqConfig\.format='gptq'"),
    ("awq-backend", AwqConfig, {"backend": "cuda"}, r"AwqConfig\.backend='cuda' is not supported"),
    ("awq-fuse_max_seq_len", AwqConfig, {"fuse_max_seq_len": 0}, r"AwqConfig\.fuse_max_seq_len=0"),
    ("awq-do_fuse", AwqConfig, {"do_fuse": True}, r"AwqConfig\.do_fuse=True needs fuse_max_seq_len"),
    ("awq-nsamples", AwqConfig, {"nsamples": 0}, r"AwqConfig\.nsamples=0"),
    ("bnb-none", BitsAndBytesConfig, {}, r"load_in_8bit=False and load_in_4bit=False: exactly one"),
    ("bnb-both", BitsAndBytesConfig, {"load_in_8bit": True, "load_in_4bit": True}, r"load_in_8bit=True and load_in_4bit=True"),
    ("bnb-threshold", BitsAndBytesConfig, {"load_in_8bit": True, "llm_int8_threshold": -1.0}, r"llm_int8_threshold=-1\.0"),
    ("bnb-threshold-inf", BitsAndBytesConfig, {"load_in_8bit": True, "llm_int8_threshold": float("inf")}, r"llm_int8_threshold=inf"),
    ("bnb-quant_type", BitsAndBytesConfig, {"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, r"bnb_4bit_quant_type='int4' .*'nf4'"),
    ("bnb-compute_dtype", BitsAndBytesConfig, {"load_in_4bit": True, "bnb_4bit_compute_dtype": "int8"}, r"bnb_4bit_compute_dtype='int8' .*'bfloat16'"),
    ("bnb-compute_dtype-typo", BitsAndBytesConfig, {"load_in_4bit": True, "bnb_4bit_compute_dtype": "fp16"}, r"bnb_4bit_compute_dtype='fp16'"),
    ("bnb-storage", BitsAndBytesConfig, {"load_in_4bit": True, "bnb_4bit_quant_storage": torch.int32}, r"bnb_4bit_quant_storage=torch\.int32"),
    ("bnb-rounding", BitsAndBytesConfig, {"load_in_8bit": True, "rounding": "stochastic"}, r"rounding='stochastic' .*'gptq'"),
    ("bnb-damp", BitsAndBytesConfig, {"load_in_8bit": True, "damp_percent": 0.0}, r"damp_percent=0\.0 .*0 < damp_percent < 1"),
    ("bnb-nsamples", BitsAndBytesConfig, {"load_in_4bit": True, "nsamples": 0}, r"BitsAndBytesConfig\.nsamples=0"),
    ("bnb-seqlen", BitsAndBytesConfig, {"load_in_4bit": True, "model_seqlen": 1}, r"BitsAndBytesConfig\.model_seqlen=1"),
    ("aqlm-in_group_size", AqlmConfig, {"in_group_size": 0}, r"AqlmConfig\.in_group_size=0 .*>= 1"),
    ("aqlm-out_group_size", AqlmConfig, {"out_group_size": 0}, r"AqlmConfig\.out_group_size=0"),
    ("aqlm-num_codebooks", AqlmConfig, {"num_codebooks": 0}, r"AqlmConfig\.num_codebooks=0"),
    ("aqlm-nbits-0", AqlmConfig, {"nbits_per_codebook": 0}, r"AqlmConfig\.nbits_per_codebook=0 .*<= 16"),
    ("aqlm-nbits-17", AqlmConfig, {"nbits_per_codebook": 17}, r"AqlmConfig\.nbits_per_codebook=17 .*<= 16"),
    ("rtn-bits", RtnConfig, {"bits": 16}, r"RtnConfig\.bits=16 is not supported; use one of 2, 3, 4, 8"),
    ("rtn-group_size", RtnConfig, {"group_size": 0}, r"RtnConfig\.group_size=0"),
]


@pytest.mark.parametrize("cls,kwargs,match", [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_values_raise_value_error(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


BAD_TYPES = [
    ("gptq-bits-str", GPTQConfig, {"bits": "4"}, r"GPTQConfig\.bits must be an int"),
    ("gptq-bits-bool", GPTQConfig, {"bits": True}, r"GPTQConfig\.bits must be an int, not bool"),
    ("gptq-group_size-float", GPTQConfig, {"bits": 4, "group_size": 128.0}, r"GPTQConfig\.group_size must be an int"),
    ("gptq-sym-int", GPTQConfig, {"bits": 4, "sym": 1}, r"GPTQConfig\.sym must be a bool, not int"),
    ("gptq-use_exllama", GPTQConfig, {"bits": 4, "use_exllama": "yes"}, r"GPTQConfig\.use_exllama must be a bool or None"),
    ("gptq-dataset", GPTQConfig, {"bits": 4, "dataset": [1, 2]}, r"GPTQConfig\.dataset must be a list of str"),
    ("gptq-damp-bool", GPTQConfig, {"bits": 4, "damp_percent": True}, r"GPTQConfig\.damp_percent must be a float"),
    ("gptq-meta", GPTQConfig, {"bits": 4, "meta": ["x"]}, r"GPTQConfig\.meta must be a dict or None"),
    ("gptq-meta-value", GPTQConfig, {"bits": 4, "meta": {"x": object()}}, r"GPTQConfig\.meta\['x'\] holds a object"),
    ("gptq-blocks", GPTQConfig, {"bits": 4, "modules_in_block_to_quantize": ["q_proj"]}, r"modules_in_block_to_quantize must be a list of lists"),
    ("gptq-checkpoint_format", GPTQConfig, {"bits": 4, "checkpoint_format": 2}, r"GPTQConfig\.checkpoint_format must be a str"),
    ("awq-zero_point", AwqConfig, {"zero_point": "true"}, r"AwqConfig\.zero_point must be a bool"),
    ("awq-modules_to_fuse", AwqConfig, {"modules_to_fuse": "all"}, r"AwqConfig\.modules_to_fuse must be a dict"),
    ("bnb-desc_act", BitsAndBytesConfig, {"load_in_4bit": True, "desc_act": 1}, r"BitsAndBytesConfig\.desc_act must be a bool"),
    ("bnb-int8_activations", BitsAndBytesConfig, {"load_in_8bit": True, "int8_activations": "no"},
     r"BitsAndBytesConfig\.int8_activations must be a bool"),
    ("bnb-load_in_4bit-int", BitsAndBytesConfig, {"load_in_4bit": 1}, r"BitsAndBytesConfig\.load_in_4bit must be a bool"),
    ("bnb-skip-str", BitsAndBytesConfig, {"load_in_8bit": True, "llm_int8_skip_modules": "lm_head"}, r"llm_int8_skip_modules must be a list of str"),
    ("bnb-dtype-obj", BitsAndBytesConfig, {"load_in_4bit": True, "bnb_4bit_compute_dtype": 16}, r"bnb_4bit_compute_dtype must be a torch\.dtype"),
    ("aqlm-int", AqlmConfig, {"num_codebooks": 1.0}, r"AqlmConfig\.num_codebooks must be an int"),
    ("aqlm-skip", AqlmConfig, {"linear_weights_not_to_quantize": "lm_head.weight"}, r"linear_weights_not_to_quantize must be a list of str"),
    ("rtn-sym", RtnConfig, {"sym": None}, r"RtnConfig\.sym must be a bool"),
    ("rtn-skip", RtnConfig, {"modules_to_not_convert": "lm_head"}, r"RtnConfig\.modules_to_not_convert must be a list of str"),
]


@pytest.mark.parametrize("cls,kwargs,match", [c[1:] for c in BAD_TYPES], ids=[c[0] for c in BAD_TYPES])
def test_bad_types_raise_type_error(cls, kwargs, match):
    with pytest.raises(TypeError, match=match):
        cls(**kwargs)


def test_gptq_bits_is_required():
    with pytest.raises(TypeError, match="bits"):
        GPTQConfig()  # type: ignore[call-arg]


# --- dispatch errors -----------------------------------------------------------------------

def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown GPTQConfig keys 'yyy', 'zzz'; known keys: .*block_size"):
        config_from_dict({"quant_method": "gptq", "bits": 4, "yyy": "int32", "zzz": 1})


def test_gptqmodel_pack_dtype_other_than_int32_is_refused():
    assert config_from_dict({"quant_method": "gptq", "bits": 4, "pack_dtype": "int32"}).pack_dtype == "int32"
    with pytest.raises(ValueError, match=r"GPTQConfig.pack_dtype='int16' is not supported; use one of 'int32'"):
        config_from_dict({"quant_method": "gptq", "bits": 4, "pack_dtype": "int16"})


def test_gptqmodel_method_and_lm_head_keys():
    """GPTQModel 7.x writes "method" and "lm_head"; an unquantized head loads, a quantized one is refused."""
    cfg = config_from_dict({"quant_method": "gptq", "bits": 4, "method": "gptq", "lm_head": False})
    assert cfg == GPTQConfig(bits=4) and "method" not in cfg.to_dict() and "lm_head" not in cfg.to_dict()
    assert {"method", "lm_head"} <= set(GPTQConfig.input_keys())
    with pytest.raises(ValueError, match=r"lm_head=True \(a quantized output head\) is not supported"):
        config_from_dict({"quant_method": "gptq", "bits": 4, "lm_head": True})
    with pytest.raises(ValueError, match=r"method='awq' \(GPTQModel's method name\) is not 'gptq'"):
        config_from_dict({"quant_method": "gptq", "bits": 4, "method": "awq"})


def test_unknown_quant_method_names_it_and_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown quant_method 'hqq'; known: aqlm, awq, bitsandbytes, gptq, rtn"):
        config_from_dict({"quant_method": "hqq"})


def test_missing_quant_method():
    with pytest.raises(ValueError, match=r"quantization_config has no 'quant_method'"):
        config_from_dict({"bits": 4})


@pytest.mark.parametrize("bad", [None, [("quant_method", "rtn")], '{"quant_method": "rtn"}'], ids=["none", "list", "str"])
def test_non_dict_is_a_type_error(bad):
    with pytest.raises(TypeError, match="must be a dict"):
        config_from_dict(bad)


def test_non_str_quant_method_is_a_type_error():
    with pytest.raises(TypeError, match="'quant_method' must be a str"):
        config_from_dict({"quant_method": 4})


def test_subclass_from_dict_checks_quant_method():
    assert RtnConfig.from_dict({"bits": 8}) == RtnConfig(bits=8)
    with pytest.raises(ValueError, match=r"RtnConfig has quant_method 'rtn', but the dict says 'gptq'"):
        RtnConfig.from_dict({"quant_method": "gptq", "bits": 8})


# --- legacy keys ---------------------------------------------------------------------------

def test_gptq_checkpoint_format_is_read_into_format_and_written_back():
    cfg = config_from_dict({"quant_method": "gptq", "bits": 4, "checkpoint_format": "GPTQ_V2"})
    assert cfg.format == "gptq_v2"
    assert cfg.to_dict()["checkpoint_format"] == cfg.to_dict()["format"] == "gptq_v2"
    assert GPTQConfig(bits=4, checkpoint_format="gptq_v2") == cfg


def test_awq_version_is_case_insensitive_and_written_back():
    cfg = config_from_dict({"quant_method": "awq", "version": "GEMM", "w_bit": 4, "q_group_size": 64, "zero_point": True})
    assert cfg == AwqConfig(group_size=64)
    assert cfg.to_dict()["version"] == "gemm"
    assert AwqConfig(version="GEMV_FAST").format == "gemv_fast"


def test_autogptq_synonyms_and_metadata_keys():
    d = {"bits": 4, "group_size": -1, "damp_percent": 0.01, "desc_act": True, "static_groups": False, "sym": True,
         "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq"}
    cfg = config_from_dict(d)
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.act_group_aware) == (4, -1, True, False)
    assert config_from_dict({"quant_method": "gptq", "w_bit": 8, "q_group_size": 32}) == GPTQConfig(bits=8, group_size=32)


def test_alias_conflict_is_an_error():
    with pytest.raises(ValueError, match=r"GPTQConfig: w_bit=8 conflicts with bits=4; give one of them"):
        config_from_dict({"quant_method": "gptq", "bits": 4, "w_bit": 8})
    with pytest.raises(ValueError, match=r"_load_in_4bit=False conflicts with load_in_4bit=True"):
        config_from_dict({"quant_method": "bitsandbytes", "load_in_4bit": True, "_load_in_4bit": False})


def test_bnb_private_load_keys():
    cfg = config_from_dict({"quant_method": "bitsandbytes", "_load_in_4bit": True, "_load_in_8bit": False})
    assert cfg == BitsAndBytesConfig(load_in_4bit=True)
    d = cfg.to_dict()
    assert (d["_load_in_4bit"], d["load_in_4bit"], d["_load_in_8bit"], d["load_in_8bit"]) == (True, True, False, False)


def test_transformers_4x_gptq_dict_loads():
    d = {"quant_method": "gptq", "bits": 4, "group_size": 128, "damp_percent": 0.1, "desc_act": False, "sym": True,
         "true_sequential": True, "use_cuda_fp16": False, "use_exllama": True, "exllama_config": {"version": 1},
         "disable_exllama": False, "max_input_length": None, "model_seqlen": None, "checkpoint_format": "gptq",
         "meta": None, "backend": None, "cache_block_outputs": True, "modules_in_block_to_quantize": None}
    cfg = config_from_dict(d)
    assert cfg.use_exllama is True and cfg.exllama_config == {"version": 1} and cfg.backend == "auto"


def test_transformers_4x_awq_dict_loads():
    d = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
         "backend": "autoawq", "do_fuse": False, "fuse_max_seq_len": None, "modules_to_fuse": None,
         "modules_to_not_convert": None, "exllama_config": None}
    assert config_from_dict(d) == AwqConfig(do_fuse=False)
    assert AwqConfig(backend="llm-awq") == AwqConfig(format="llm-awq")


def test_awq_ignores_the_gptq_keys_transformers_5_writes():
    d = AwqConfig().to_dict() | {"desc_act": False, "damp_percent": 0.1, "tokenizer": None, "sym": True}
    assert config_from_dict(d) == AwqConfig()
    assert "desc_act" not in AwqConfig().to_dict()


def test_enum_values_are_read_as_plain_strings():
    class Method(str, Enum):
        AWQ = "awq"

    class Format(str, Enum):
        GEMV = "gemv"

    cfg = config_from_dict({"quant_method": Method.AWQ, "format": Format.GEMV})
    assert cfg == AwqConfig(format="gemv") and type(cfg.format) is str


# --- transformers compatibility ------------------------------------------------------------

# (lowbit class, transformers class name, kwargs accepted by both) -- non-defaults stay within
# what transformers 5.23 validates (e.g. its GPTQ dataset names; no modules_in_block_to_quantize,
# which makes it look up the `optimum` package).
TRANSFORMERS_CASES = {
    "gptq-default": (GPTQConfig, "GPTQConfig", {"bits": 4}),
    "gptq-custom": (GPTQConfig, "GPTQConfig", {
        "bits": 8, "dataset": "c4", "group_size": 32, "damp_percent": 0.05, "desc_act": True, "sym": False,
        "true_sequential": False, "format": "gptq_v2", "meta": {"quantizer": ["lowbit:0.1.0"]}, "backend": "torch",
        "model_seqlen": 256, "block_name_to_quantize": "model.layers", "batch_size": 2, "pad_token_id": 0,
        "max_input_length": 512, "cache_block_outputs": False, "module_name_preceding_first_block": ["model.embed"],
    }),
    "awq-default": (AwqConfig, "AwqConfig", {}),
    "awq-custom": (AwqConfig, "AwqConfig", {
        "bits": 4, "group_size": 64, "zero_point": False, "backend": "gemv", "modules_to_not_convert": ["visual"],
        "format": "gemv",
    }),
    "bnb-4bit": (BitsAndBytesConfig, "BitsAndBytesConfig", {"load_in_4bit": True}),
    "bnb-4bit-custom": (BitsAndBytesConfig, "BitsAndBytesConfig", {
        "load_in_4bit": True, "bnb_4bit_compute_dtype": torch.bfloat16, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": "uint8",
    }),
    "bnb-8bit": (BitsAndBytesConfig, "BitsAndBytesConfig", {
        "load_in_8bit": True, "llm_int8_threshold": 4.0, "llm_int8_skip_modules": ["lm_head"],
        "llm_int8_enable_fp32_cpu_offload": True, "llm_int8_has_fp16_weight": True,
    }),
    "bnb-4bit-gptq-rounded": (BitsAndBytesConfig, "BitsAndBytesConfig", {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "rounding": "gptq", "nsamples": 16,
    }),
    "aqlm-default": (AqlmConfig, "AqlmConfig", {}),
    "aqlm-custom": (AqlmConfig, "AqlmConfig", {
        "in_group_size": 16, "num_codebooks": 2, "nbits_per_codebook": 8, "linear_weights_not_to_quantize": ["lm_head.weight"],
    }),
}

# transformers fills these ``None`` defaults in; lowbit keeps the None.
TRANSFORMERS_FILLS = {"bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8", "linear_weights_not_to_quantize": []}


def _transformers_cls(name: str):
    qc = pytest.importorskip("transformers.utils.quantization_config")
    return getattr(qc, name)


def _transformers_json(cfg) -> dict:
    """What transformers writes into config.json (the JSON round trip makes enums plain str)."""
    return json.loads(cfg.to_json_string(use_diff=False))


def _assert_shared_equal(ours: dict, theirs: dict) -> None:
    shared = set(ours) & set(theirs)
    assert {"quant_method"} < shared
    for key in sorted(shared):
        mine = TRANSFORMERS_FILLS.get(key, mine) if (mine := ours[key]) is None else mine
        assert mine == theirs[key], key


@pytest.mark.parametrize("name", ["GPTQConfig", "AwqConfig", "BitsAndBytesConfig", "AqlmConfig"])
def test_every_transformers_parameter_is_a_field_with_its_default(name):
    ours = CONFIGS.get({"GPTQConfig": "gptq", "AwqConfig": "awq", "BitsAndBytesConfig": "bitsandbytes",
                        "AqlmConfig": "aqlm"}[name])
    our_fields = {f.name: f for f in dataclasses.fields(ours)}
    for p in inspect.signature(_transformers_cls(name).__init__).parameters.values():
        if p.name == "self" or p.kind is p.VAR_KEYWORD:
            continue
        assert p.name in our_fields, p.name
        if p.default is p.empty:
            assert our_fields[p.name].default is dataclasses.MISSING, p.name
            continue
        default = p.default.value if isinstance(p.default, Enum) else p.default
        if default is None or isinstance(default, (bool, int, float, str)):
            assert our_fields[p.name].default == default, p.name


@pytest.mark.parametrize("case", TRANSFORMERS_CASES.values(), ids=TRANSFORMERS_CASES.keys())
def test_transformers_reads_what_lowbit_writes(case):
    ours_cls, name, kwargs = case
    ours = ours_cls(**kwargs)
    theirs = _transformers_cls(name).from_dict(json.loads(ours.to_json_string()))
    _assert_shared_equal(ours.to_dict(), _transformers_json(theirs))


@pytest.mark.parametrize("case", TRANSFORMERS_CASES.values(), ids=TRANSFORMERS_CASES.keys())
def test_lowbit_reads_what_transformers_writes(case):
    ours_cls, name, kwargs = case
    theirs = _transformers_json(_transformers_cls(name)(**kwargs))
    ours = config_from_dict(theirs)
    assert type(ours) is ours_cls
    _assert_shared_equal(ours.to_dict(), theirs)
    assert config_from_dict(ours.to_dict()) == ours
