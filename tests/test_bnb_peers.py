"""bitsandbytes and transformers as peers (skipped unless ``pip install -e '.[peers]'``): lowbit's
NF4/FP4 code tables, 4-bit codes, double quant and int8 rows equal bitsandbytes' on the same input,
and checkpoints interchange with transformers + bitsandbytes both ways."""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit import BitsAndBytesConfig
from lowbit.checkpoint.safetensors_io import SINGLE_FILE
from lowbit.formats.blockwise4 import code_table, dynamic_map, quantize_4bit
from lowbit.formats.int8_outlier import Int8Linear, quantize_rows
from lowbit.kernels import reference

from test_bnb import DTYPES, QUANT_TYPES, ROUNDED, SHAPES, _dequant, _w

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (pip install -e '.[peers]')")


def _assert_nested_codes_agree(ours, theirs, values):
    """Double quant codes the centred absmax with the 8-bit dynamic map. lowbit takes the nearest
    code (ties to the lower); bitsandbytes' CPU library picks a neighbour of it for a small
    fraction of values. Where they differ, lowbit's code must be strictly nearer to the value."""
    code = dynamic_map()
    differ = ours != theirs
    assert differ.float().mean() <= 0.01
    assert ((values[differ] - code[ours[differ].long()]).abs() < (values[differ] - code[theirs[differ].long()]).abs()).all()


@needs_bnb
def test_tables_equal_bitsandbytes():
    import bitsandbytes.functional as BF

    assert torch.equal(dynamic_map(), BF.create_dynamic_map())
    for quant_type in QUANT_TYPES:
        assert torch.equal(code_table(quant_type), BF.get_4bit_type(quant_type, device="cpu"))


@needs_bnb
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_4bit_codes_bit_identical_to_bitsandbytes(shape, quant_type, dtype, blocksize):
    import bitsandbytes.functional as BF

    w = _w(shape, dtype, seed=blocksize)
    w[0, :3] = torch.tensor([0.0, 1e-6, -1e-6])  # zeros and tiny values: FP4's two zero codes
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    q = quantize_4bit(w, quant_type, blocksize)
    assert torch.equal(q.weight, packed) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(_dequant(q, shape, blocksize).to(dtype), _bnb_dequantize(packed, state))


def _bnb_dequantize(packed, state):
    """bitsandbytes' dequantize of its own 4-bit codes, in the codes' dtype, from its pure-PyTorch
    definition where that imports. Its native CPU kernel (0.50.2) misreads blocks that straddle
    rows: on an AMD EPYC with AVX512, rows of 48 in blocks of 64 came out up to 0.09 off (rows
    holding whole blocks were exact), while the pure-PyTorch path decodes the same codes as its
    quantizer wrote them."""
    import bitsandbytes.functional as BF

    try:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code
    except ImportError:
        return BF.dequantize_4bit(packed, state)
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), state.absmax, code, state.blocksize,
                                    state.shape, state.dtype)


@needs_bnb
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_double_quant_matches_bitsandbytes(quant_type):
    import bitsandbytes.functional as BF

    w = _w((512, 576), seed=9)  # 4608 blocks -> 18 nested blocks
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    q = quantize_4bit(w, quant_type, 64, double_quant=True)
    assert torch.equal(q.weight, packed)
    assert torch.equal(q.nested_offset, state.offset) and torch.equal(q.nested_absmax, state.state2.absmax)
    assert torch.equal(q.nested_quant_map, state.state2.code)
    plain = quantize_4bit(w, quant_type, 64).absmax
    centred = (plain - plain.mean()) / q.nested_absmax.repeat_interleave(256)[: plain.numel()]
    _assert_nested_codes_agree(q.absmax, state.absmax, centred)
    # bitsandbytes' dequantization of its own state equals lowbit's reference on those tensors
    ours = reference.dequantize_blockwise4(packed, state.absmax, state.code, 64, (512, 576),
                                           state.state2.absmax, state.state2.code, state.offset)
    assert torch.equal(ours, BF.dequantize_4bit(packed, state))


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_rows_bit_identical_to_bitsandbytes(dtype):
    import bitsandbytes.functional as BF

    w = _w((96, 80), dtype)
    cb, scb, _ = BF.int8_vectorwise_quant(w)
    ours_cb, ours_scb = quantize_rows(w)
    assert torch.equal(ours_cb, cb) and torch.equal(ours_scb, scb)


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_linear_codes_equal_bitsandbytes_linear8bitlt(dtype):
    """bitsandbytes rounds the weight to float16 before quantizing, whatever the model's dtype."""
    import bitsandbytes as bnb

    w = _w((96, 80), dtype, seed=11)
    ref = bnb.nn.Linear8bitLt(80, 96, bias=False, has_fp16_weights=False)
    ref.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    ref.weight._quantize("cpu")
    ours = Int8Linear.from_linear(w, None)
    assert torch.equal(ours.weight, ref.weight.data) and torch.equal(ours.SCB, ref.weight.SCB)


TRANSFORMERS_CONFIGS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(TRANSFORMERS_CONFIGS))
def test_checkpoints_interchange_with_transformers_bitsandbytes(name, dtype, tiny_model_dir, tmp_path):
    """Quantizing the same fp16 model gives the same tensors as transformers + bitsandbytes; each
    tool loads the other's checkpoint."""
    from transformers import AutoModelForCausalLM
    from transformers import BitsAndBytesConfig as HfBitsAndBytesConfig

    kw = TRANSFORMERS_CONFIGS[name]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype,
                                              quantization_config=HfBitsAndBytesConfig(**kw))
    hf.save_pretrained(tmp_path / "hf")
    ours = lowbit.from_pretrained(tiny_model_dir, dtype=dtype, quantization_config=BitsAndBytesConfig(**kw))
    lowbit.save_quantized(ours, tmp_path / "ours")
    theirs_t, ours_t = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "ours" / SINGLE_FILE)
    assert set(theirs_t) == set(ours_t)
    codes_differing = codes_total = 0
    for key, t in theirs_t.items():
        assert ours_t[key].dtype == t.dtype and ours_t[key].shape == t.shape, key
        if key.endswith("weight.absmax") and t.dtype == torch.uint8:  # double-quant codes, see above
            code, differ = dynamic_map(), ours_t[key] != t
            codes_differing, codes_total = codes_differing + int(differ.sum()), codes_total + t.numel()
            assert ((code[ours_t[key].long()] - code[t.long()]).abs() <= 0.015).all(), key  # a neighbouring code
        else:
            assert torch.equal(ours_t[key], t), key
    assert codes_differing <= 0.01 * codes_total

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    from_hf = lowbit.from_pretrained(tmp_path / "hf", dtype=dtype)
    hf_from_ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=dtype)
    # transformers loaded our checkpoint with bitsandbytes modules, and the same weights
    hf_up = hf_from_ours.model.layers[0].mlp.up_proj
    assert type(hf_up).__module__.startswith("bitsandbytes")
    prefix = "model.layers.0.mlp.up_proj."
    reloaded = {k: t for k, t in hf_from_ours.state_dict().items() if k.startswith(prefix)}
    assert reloaded and all(torch.equal(t, ours_t[k]) for k, t in reloaded.items())
    with torch.no_grad():
        y_hf, y_from_hf = hf(ids).logits.float(), from_hf(ids).logits.float()
        y_ours, y_hf_from_ours = ours(ids).logits.float(), hf_from_ours(ids).logits.float()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    # bitsandbytes' int8 path casts fp32 inputs to fp16 before quantizing them (it warns so), and
    # lowbit quantizes the fp32 values, so row scales and codes can differ. Its 4-bit matmuls agreed to 2e-3
    # on one host and to 7.2e-3 on another (an AMD EPYC with AVX512, where its native CPU kernels
    # run) with the same weights, asserted equal above; a misread layout is off by far more.
    tol = 1.5e-2
    assert rel(y_from_hf, y_hf) < tol and rel(y_hf_from_ours, y_ours) < tol


@needs_bnb
@pytest.mark.parametrize("name", ["int8", "nf4-dq"])
def test_gptq_rounded_checkpoint_loads_in_transformers_bitsandbytes(name, tiny_model_dir, tmp_path):
    """GPTQ rounding changes codes only: transformers + bitsandbytes load the checkpoint as theirs."""
    from transformers import AutoModelForCausalLM

    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = BitsAndBytesConfig(**ROUNDED[name], rounding="gptq")
    ours = lowbit.from_pretrained(tiny_model_dir, dtype=torch.float16, quantization_config=cfg, calib=calib,
                                  progress=False)
    lowbit.save_quantized(ours, tmp_path / "ours")
    ours_t = load_file(tmp_path / "ours" / SINGLE_FILE)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float16)
    prefix = "model.layers.0.mlp.up_proj."
    assert type(hf.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    reloaded = {k: t for k, t in hf.state_dict().items() if k.startswith(prefix)}
    assert reloaded and all(torch.equal(t, ours_t[k]) for k, t in reloaded.items())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), hf(ids).logits.float()
    assert ((a - b).norm() / b.norm()).item() < 1.5e-2  # the interchange test's bound (see there)
