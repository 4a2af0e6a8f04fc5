"""bitsandbytes-style quantization: NF4/FP4 blockwise codes, double quant, LLM.int8 and the
bitsandbytes checkpoint layout. Interop with bitsandbytes + transformers: ``test_bnb_peers.py``."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import BitsAndBytesConfig
from lowbit.checkpoint.safetensors_io import SINGLE_FILE
from lowbit.formats.blockwise4 import (
    Blockwise4Linear,
    code_table,
    dynamic_map,
    nearest_code,
    quantize_4bit,
)
from lowbit.formats.int8_outlier import Int8Linear, int_mm, quantize_rows
from lowbit.formats.packing import pack_nibbles, unpack_nibbles
from lowbit.kernels import reference

from conftest import correlated_layer, tiny_llama_model

QUANT_TYPES = ["nf4", "fp4"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(64, 48), (33, 17), (7, 5), (160, 576)]  # full blocks, odd numel, one partial block, many blocks


def _w(shape, dtype=torch.float32, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def _bytes(t):
    """The tensor's bytes (packed bits in a float dtype may hold NaN patterns, which never compare equal)."""
    return t.reshape(-1).view(torch.uint8)


def _dequant(q, shape, blocksize=64):
    return reference.dequantize_blockwise4(q.weight, q.absmax, q.quant_map, blocksize, shape,
                                           q.nested_absmax, q.nested_quant_map, q.nested_offset)


# --- code tables and packing ---------------------------------------------------------------

def test_code_tables():
    nf4 = code_table("nf4")
    assert nf4.shape == (16,) and torch.equal(nf4, nf4.sort().values)
    assert nf4[0] == -1 and nf4[7] == 0 and nf4[15] == 1
    fp4 = code_table("fp4")
    assert fp4[3] == 1 and fp4[11] == -1 and fp4[0] == 0 and fp4[8] == 0  # 0b1000 is a second zero
    assert torch.equal(fp4[9:], -fp4[1:8])  # the sign bit negates
    with pytest.raises(ValueError, match="unknown 4-bit quant_type 'int4'"):
        code_table("int4")


def test_dynamic_map_shape_and_range():
    m = dynamic_map()
    assert m.shape == (256,) and torch.equal(m, m.sort().values)
    assert m.max() == 1 and m.min() > -1 and (m == 0).sum() == 1
    assert m[m > 0].min() < 1e-6  # the exponent reaches 1e-6


def test_pack_nibbles_worked_example_and_round_trip():
    assert pack_nibbles(torch.tensor([1, 2, 3])).tolist() == [0x12, 0x30]
    assert pack_nibbles(torch.tensor([1, 2, 3]), pad=7).tolist() == [0x12, 0x37]
    codes = torch.randint(0, 16, (101,), generator=torch.Generator().manual_seed(1))
    packed = pack_nibbles(codes)
    assert torch.equal(unpack_nibbles(packed, 101), codes)
    assert torch.equal(pack_nibbles(unpack_nibbles(packed, 101)), packed)  # pack -> unpack -> pack


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_nearest_code_is_the_nearest(quant_type):
    table = code_table(quant_type)
    x = torch.rand(5000, generator=torch.Generator().manual_seed(2)) * 2 - 1
    got = nearest_code(x, table)
    best = (x.unsqueeze(1) - table.unsqueeze(0)).abs().min(dim=1).values
    assert torch.equal((x - table[got]).abs(), best)


# --- 4-bit quantization ---------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_4bit_error_bound_and_requantize_round_trip(shape, quant_type, double_quant):
    w = _w(shape)
    q = quantize_4bit(w, quant_type, 64, double_quant)
    n = shape[0] * shape[1]
    assert q.weight.shape == ((n + 1) // 2, 1) and q.weight.dtype == torch.uint8
    assert q.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    d = _dequant(q, shape)
    table = code_table(quant_type)
    half_gap = (table.sort().values.diff().max() / 2).item()
    absmax = reference.dequantize_blockwise8(q.absmax, q.nested_absmax, q.nested_quant_map, 256) + q.nested_offset \
        if double_quant else q.absmax
    bound = absmax.repeat_interleave(64)[:n].reshape(shape) * half_gap
    if double_quant:  # the block scale itself is off by up to half an 8-bit step
        bound = bound + (w.abs().max() * 0.02)
    assert ((d - w).abs() <= bound + 1e-7).all()
    if not double_quant:  # every block's absmax is a code of +-1: re-quantizing is exact
        again = quantize_4bit(d, quant_type, 64)
        assert torch.equal(_dequant(again, shape), d)
        if quant_type == "nf4":  # (FP4 has two codes for zero; a re-quantized zero takes the first)
            assert torch.equal(again.weight, q.weight)


@pytest.mark.parametrize("storage", [torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32])
def test_quant_storage_is_a_view_of_the_same_bytes(storage):
    w = _w((64, 32))
    plain = quantize_4bit(w, "nf4", 64)
    q = quantize_4bit(w, "nf4", 64, quant_storage=storage)
    assert q.weight.dtype == storage and q.weight.shape == (1024 // storage.itemsize, 1)
    assert torch.equal(q.weight.view(torch.uint8).reshape(-1, 1), plain.weight)
    assert torch.equal(_dequant(q, (64, 32)), _dequant(plain, (64, 32)))


def test_4bit_bad_geometry():
    with pytest.raises(ValueError, match="blocksize=48 is not supported"):
        quantize_4bit(_w((8, 8)), "nf4", 48)
    with pytest.raises(ValueError, match="not a whole number of torch.float32"):
        quantize_4bit(_w((3, 3)), "nf4", 64, quant_storage=torch.float32)


def test_blockwise4_linear_forward_matches_its_dequantized_weight():
    w, b = _w((40, 96)), _w((40,), seed=3)
    m = Blockwise4Linear.from_linear(w, b, quant_type="nf4", double_quant=True)
    m.kernel = "reference"  # the CPU kernel's bf16 product: tests/test_cpu_blockwise4.py
    x = _w((3, 5, 96), seed=4) * 20
    want = torch.nn.functional.linear(x, m.dequantize(), b)
    torch.testing.assert_close(m(x), want, rtol=1e-6, atol=1e-6)
    m16 = Blockwise4Linear.from_linear(w, b, quant_type="nf4", compute_dtype=torch.bfloat16)
    m16.kernel = "reference"
    y = m16(x)
    assert y.dtype == torch.float32  # output in the input's dtype, matmul in bf16
    assert ((y - want).norm() / want.norm()) < 5e-3


# --- LLM.int8 ---------------------------------------------------------------------------------

def test_quantize_rows():
    w = _w((20, 33))
    cb, scb = quantize_rows(w)
    assert cb.dtype == torch.int8 and scb.dtype == torch.float32
    assert torch.equal(scb, w.abs().amax(dim=1)) and (cb.abs().amax(dim=1) == 127).all()
    assert ((reference.dequantize_int8_rows(cb, scb) - w).abs() <= scb.unsqueeze(1) / 254 + 1e-7).all()
    zero_row = torch.zeros(2, 8)
    cb0, scb0 = quantize_rows(zero_row)
    assert not cb0.any() and not scb0.any()


def _outlier_input(m=12, k=96, seed=5):
    x = _w((m, k), seed=seed) * 20  # |x| ~ 1
    x[:, [3, 50]] *= 30  # two outlier feature columns, as LLM.int8 describes
    return x


def test_int8_outlier_decomposition_beats_plain_int8():
    w = _w((64, 96))
    m = Int8Linear.from_linear(w, None, threshold=6.0)
    x = _outlier_input()
    exact = x @ w.t()
    with_outliers = m(x)
    m.threshold = 0.0
    without = m(x)
    err = lambda y: ((y - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(with_outliers) < 0.01
    assert err(with_outliers) < err(without) / 2


@pytest.mark.parametrize("k", [80, 2500])  # one exact fp32 chunk, and three
@pytest.mark.parametrize("rows", [1, 3, 16, 127])
def test_int8_matmuls_agree_exactly(rows, k):
    """The reference's chunked fp32 integer matmul and ``torch._int_mm`` give the same int32 sums,
    so the same outputs; worst-case codes (all +-127) exercise the fp32 exactness bound."""
    a = torch.full((rows, k), 127, dtype=torch.int8)
    b = torch.full((48, k), -127, dtype=torch.int8)
    b[:, ::3] = 127
    assert torch.equal(reference.int_matmul_exact(a, b), int_mm(a, b))
    assert torch.equal(reference.int_matmul_exact(a, b), (a.long() @ b.long().t()).to(torch.int32))
    w, bias = _w((48, k)), _w((48,), seed=6)
    m = Int8Linear.from_linear(w, bias, threshold=6.0)
    x = _outlier_input(m=rows, k=k)
    m.kernel = "reference"
    y_ref = m(x)
    y_int_mm = reference.matmul_int8_outlier(x, m.weight, m.SCB, m.threshold, m.bias, int_matmul=int_mm)
    assert torch.equal(y_int_mm, y_ref) and y_ref.shape == (rows, 48)


def test_int8_threshold_must_be_non_negative():
    with pytest.raises(ValueError, match="llm_int8_threshold=-1"):
        Int8Linear(8, 8, threshold=-1)


# --- GPTQ rounding (rounding="gptq": the same grid, codes by error feedback) -------------------

ROUNDED = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
}


def _layer(n=48, k=128, rows=512, seed=0):
    """A linear (fp16-representable weights) and its correlated inputs (conftest.correlated_layer)."""
    w, x = correlated_layer(n, k, rows, seed)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w.half().float())
    return lin, x


def _quantize_layer(kw, lin, H):
    from lowbit.methods.bnb import BnbQuantizer
    from lowbit.methods.gptq import HessianStats

    stats = HessianStats(H.shape[0])
    stats.H, stats.nsamples = H, 10 * H.shape[0]
    return BnbQuantizer(BitsAndBytesConfig(**kw)).quantize_layer("layer", lin, stats)


def _grid(mod):
    """The tensors besides the codes: row scales, or block absmax (and its double quant)."""
    names = ("SCB",) if isinstance(mod, Int8Linear) else ("absmax", "nested_absmax", "nested_offset")
    return [t for n in names if (t := getattr(mod, n)) is not None]


# measured on these data (seeds 0-2, every format): 0.25-0.29 of the nearest rounding's output
# error in act-order, 0.51-0.62 in column order
ERROR_BOUND = {True: 0.4, False: 0.75}


@pytest.mark.parametrize("desc_act", [True, False], ids=["act-order", "column-order"])
@pytest.mark.parametrize("name", list(ROUNDED))
def test_gptq_rounding_keeps_the_grid_and_cuts_the_output_error(name, desc_act):
    lin, x = _layer()
    H = 2 * x.t() @ x / x.shape[0]
    nearest = _quantize_layer(ROUNDED[name], lin, H)
    rounded = _quantize_layer({**ROUNDED[name], "rounding": "gptq", "desc_act": desc_act}, lin, H)
    assert type(rounded) is type(nearest) and rounded.weight.dtype == nearest.weight.dtype
    assert all(torch.equal(a, b) for a, b in zip(_grid(rounded), _grid(nearest)))
    assert not torch.equal(rounded.weight, nearest.weight)
    if isinstance(rounded, Int8Linear):
        assert rounded.weight.abs().max() <= 127  # the grid's range: -128 is never written
    w = lin.weight.detach()
    err = lambda m: ((x @ (w - m.dequantize()).t()) ** 2).sum().item()  # noqa: E731
    assert err(rounded) < ERROR_BOUND[desc_act] * err(nearest)


@pytest.mark.parametrize("name", ["int8", "nf4", "fp4"])
def test_gptq_rounding_with_uncorrelated_inputs_is_the_nearest_code(name):
    """With H = I no column's error reaches another: every code is the nearest, bit for bit."""
    lin, _ = _layer()
    kw = ROUNDED[name]
    eye = torch.eye(lin.in_features)
    nearest = _quantize_layer(kw, lin, eye)
    assert torch.equal(_quantize_layer({**kw, "rounding": "gptq"}, lin, eye).weight, nearest.weight)


def test_gptq_rounding_needs_calibration_and_round_trips(tmp_path):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", rounding="gptq", damp_percent=0.05)
    with pytest.raises(ValueError, match="bitsandbytes needs calibration data"):
        lowbit.quantize(tiny_llama_model(), cfg)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    model = lowbit.quantize(tiny_llama_model(), cfg, calib, progress=False)
    nearest = lowbit.quantize(tiny_llama_model(), cfg.replace(rounding="nearest"))
    up, up_nearest = model.model.layers[1].mlp.up_proj, nearest.model.layers[1].mlp.up_proj
    assert torch.equal(up.absmax, up_nearest.absmax) and not torch.equal(up.weight, up_nearest.weight)
    lowbit.save_quantized(model, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["rounding"] == "gptq" and saved["damp_percent"] == 0.05
    loaded = lowbit.from_pretrained(tmp_path / "q")  # loading needs no calibration data
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# --- LLM.int8 weights with floating-point activations (int8_activations=False) ---------------

def test_weight_only_int8_is_the_product_with_the_dequantized_weight(tmp_path, monkeypatch):
    """Same codes and checkpoint as LLM.int8; the forward multiplies the dequantized weight, and
    the setting comes back from the saved config (and through fusion)."""
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")  # the fp32 product (cpu-int8's is bf16: test_cpu_int8)
    cfg = BitsAndBytesConfig(load_in_8bit=True, int8_activations=False)
    model = lowbit.quantize(tiny_llama_model(), cfg)
    plain = lowbit.quantize(tiny_llama_model(), BitsAndBytesConfig(load_in_8bit=True))
    up = model.model.layers[0].mlp.up_proj
    assert not up.int8_activations and plain.model.layers[0].mlp.up_proj.int8_activations
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    x = torch.randn(3, 5, up.in_features, generator=torch.Generator().manual_seed(2)) * 4  # outliers above 6
    with torch.no_grad():
        got = up(x)
        want = x @ reference.dequantize_int8_rows(up.weight, up.SCB).t()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain.model.layers[0].mlp.up_proj(x), want, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    lowbit.save_quantized(model, tmp_path / "q")
    loaded = lowbit.from_pretrained(tmp_path / "q")
    assert not loaded.model.layers[0].mlp.up_proj.int8_activations
    fused = lowbit.from_pretrained(tmp_path / "q", fuse=True)
    with torch.no_grad():
        before = model(ids).logits
        assert torch.equal(loaded(ids).logits, before)
        assert torch.allclose(fused(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_fusing_int8_layers_with_different_activations_is_refused():
    from lowbit.formats.concat import concat_outputs

    gen = torch.Generator().manual_seed(3)
    a = Int8Linear.from_linear(torch.randn(8, 16, generator=gen), None)
    b = Int8Linear.from_linear(torch.randn(8, 16, generator=gen), None, int8_activations=False)
    with pytest.raises(ValueError, match="int8_activations"):
        concat_outputs([a, b], ["q_proj", "k_proj"])


# --- models, save and load ------------------------------------------------------------------

CONFIGS = {
    "nf4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-bf16storage": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_quant_storage="bfloat16"),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_save_load_round_trip(name, tmp_path):
    cfg = CONFIGS[name]
    model = lowbit.quantize(tiny_llama_model(), cfg)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, Int8Linear if cfg.load_in_8bit else Blockwise4Linear)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the output embedding is skipped by default
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    lowbit.save_quantized(model, tmp_path / "q")
    tensors = load_file(tmp_path / "q" / SINGLE_FILE)
    p = "model.layers.0.mlp.up_proj."
    if cfg.load_in_8bit:
        assert tensors[p + "weight"].dtype == torch.int8 and tensors[p + "SCB"].shape == (128,)
        assert tensors[p + "weight_format"].item() == 0
    else:
        state = json.loads(bytes(tensors[f"{p}weight.quant_state.bitsandbytes__{cfg.bnb_4bit_quant_type}"].tolist()))
        assert state["shape"] == [128, 64] and state["blocksize"] == 64 and state["dtype"] == "float32"
        assert ("nested_offset" in state) == cfg.bnb_4bit_use_double_quant
        assert not any(k.startswith(p) and k.split(p)[1] in ("absmax", "nested_offset") for k in tensors)
    loaded = lowbit.from_pretrained(tmp_path / "q")
    for a, b in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a[0] == b[0] and a[1].dtype == b[1].dtype and torch.equal(_bytes(a[1]), _bytes(b[1])), a[0]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_skip_modules_replace_the_default_skips():
    cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["mlp"])
    model = lowbit.quantize(tiny_llama_model(), cfg)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)


def test_has_fp16_weight_is_refused():
    with pytest.raises(ValueError, match="llm_int8_has_fp16_weight=True"):
        lowbit.quantize(tiny_llama_model(), BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True))


def test_nan_weight_is_refused():
    model = tiny_llama_model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj: weight contains NaN"):
        lowbit.quantize(model, CONFIGS["nf4-dq"])


def _saved(tmp_path, name="nf4-dq"):
    lowbit.save_quantized(lowbit.quantize(tiny_llama_model(), CONFIGS[name]), tmp_path / "q")
    return tmp_path / "q" / SINGLE_FILE


def _rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _state_key(tensors):
    return next(k for k in tensors if k.startswith("model.layers.0.mlp.up_proj.weight.quant_state"))


def _json_tensor(d):
    return torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)


def _with_state(**changes):
    def edit(tensors):
        key = _state_key(tensors)
        state = json.loads(bytes(tensors[key].tolist())) | changes
        tensors[key] = _json_tensor(state)
    return edit


@pytest.mark.parametrize("edit,msg", [
    (lambda t: t.pop(_state_key(t)), "4-bit weight without its quant_state entry"),
    (_with_state(shape=[64, 128]), r"quant_state shape \[64, 128\] does not match the layer's \[128, 64\]"),
    (_with_state(blocksize=48), "blocksize=48 is not supported"),
    (_with_state(dtype="float99"), "quant_state dtype 'float99' is not a torch dtype"),
    (_with_state(quant_type="fp4"), "quant_type 'fp4' does not match the key's 'nf4'"),
    (lambda t: t.__setitem__(_state_key(t), torch.tensor([255, 0, 1], dtype=torch.uint8)), "is not UTF-8 JSON"),
    (lambda t: t.pop("model.layers.0.mlp.up_proj.weight.nested_absmax"), "must come together"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight.absmax", torch.zeros(7, dtype=torch.uint8)),
     r"up_proj.absmax has shape \(7,\)"),
], ids=["no-state", "shape", "blocksize", "dtype", "quant-type", "not-json", "nested-half", "absmax-shape"])
def test_inconsistent_4bit_checkpoint_is_a_clear_error(tmp_path, edit, msg):
    path = _saved(tmp_path)
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=msg):
        lowbit.from_pretrained(tmp_path / "q")


def test_int8_col_format_is_refused(tmp_path):
    path = _saved(tmp_path, "int8")
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight_format",
                                           torch.tensor(3, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="weight_format is 3; only the row-major int8 layout"):
        lowbit.from_pretrained(tmp_path / "q")
