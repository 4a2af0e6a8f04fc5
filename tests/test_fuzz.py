"""Fuzzing (hypothesis, bounded for CI): the config parser and the checkpoint loader either give
a valid result or raise ValueError/TypeError with a message, never anything else."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.config import CONFIGS, config_from_dict
from lowbit.checkpoint.safetensors_io import load_state_dict

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

FIELD_NAMES = sorted({key for _, cls in CONFIGS.items() for key in cls.input_keys()})
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([2, 3, 4, 8, 16, 32, 64, 128, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["nf4", "fp4", "gptq", "gptq_v2", "gemm", "float16", "bfloat16", "int8", "lm_head"]),
    st.lists(st.text(max_size=6), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def quantization_configs(draw):
    method = draw(st.one_of(st.sampled_from(list(CONFIGS)), st.text(max_size=6), st.integers()))
    keys = draw(st.lists(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6)), max_size=6, unique=True))
    d = {k: draw(VALUES) for k in keys}
    if draw(st.booleans()):
        d["quant_method"] = method
    return d


@FUZZ
@given(quantization_configs())
def test_config_parser_accepts_or_explains(d):
    try:
        cfg = config_from_dict(d)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@FUZZ
@given(st.sampled_from(list(CONFIGS)), st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES, max_size=4))
def test_every_method_with_random_fields(method, fields):
    try:
        cfg = config_from_dict({**fields, "quant_method": method})
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    assert cfg.quant_method == method
    for value in cfg.to_dict().values():
        assert not (isinstance(value, float) and not math.isfinite(value)), cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_dir_module) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "ckpt"
    model = lowbit.from_pretrained(tiny_model_dir_module, quantization_config=lowbit.RtnConfig(bits=4, group_size=32),
                                   progress=False)
    return lowbit.save_quantized(model, out)


def _copy(checkpoint: Path, tmp: Path) -> Path:
    dest = tmp / "c"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(checkpoint, dest)
    return dest


def _load_or_explain(folder: Path) -> None:
    try:
        lowbit.from_pretrained(folder, progress=False)
    except (ValueError, TypeError) as e:
        assert str(e)


@FUZZ
@given(data=st.data())
def test_damaged_safetensors_load_or_explain(checkpoint, tmp_path, data):
    folder = _copy(checkpoint, tmp_path)
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", bytes(raw[:8]))[0]
    how = data.draw(st.sampled_from(["truncate", "flip-header", "flip-data", "length"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip-header":
        for i in data.draw(st.lists(st.integers(8, header - 1), min_size=1, max_size=4)):
            raw[i] = data.draw(st.integers(0, 255))
    elif how == "flip-data":
        for i in data.draw(st.lists(st.integers(header, len(raw) - 1), min_size=1, max_size=8)):
            raw[i] = data.draw(st.integers(0, 255))
    else:
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    path.write_bytes(bytes(raw))
    try:
        load_state_dict(folder)
    except ValueError as e:
        assert str(path.name) in str(e) or "corrupt" in str(e)
        return
    _load_or_explain(folder)  # the bytes parsed: the layout checks must catch bad values or shapes


HEADER_VALUES = st.one_of(st.sampled_from(["I32", "F16", "F32", "U8", "BOOL", "X9"]),
                          st.lists(st.integers(-2, 70), max_size=3), st.integers(-5, 10**6), st.text(max_size=4))


@FUZZ
@given(data=st.data())
def test_forged_headers_load_or_explain(checkpoint, tmp_path, data):
    folder = _copy(checkpoint, tmp_path)
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    for name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = data.draw(HEADER_VALUES)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    try:
        load_state_dict(folder)
    except ValueError as e:
        assert str(e)
        return
    _load_or_explain(folder)
