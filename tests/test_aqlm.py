"""AQLM: code storage, the reference kernel, the additive-quantization solver, the quantizer on
tiny models, the AQLM checkpoint layout, and interop with the ``aqlm`` package + transformers."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import AqlmConfig
from lowbit.checkpoint.safetensors_io import SINGLE_FILE
from lowbit.formats.codebook import AqlmLinear, check_codes, check_geometry, code_dtype, pack_codes
from lowbit.kernels import exact_kernels, reference
from lowbit.methods.aqlm import aqlm_quantize
from lowbit.methods.gptq import HessianStats, gptq_quantize

from conftest import calib_ids, tiny_llama_model

HAS_AQLM = importlib.util.find_spec("aqlm") is not None


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- code storage ---------------------------------------------------------------------------

@pytest.mark.parametrize("nbits", [1, 4, 7, 8, 9, 12, 16])
def test_pack_unpack_round_trip(nbits):
    idx = torch.randint(0, 1 << nbits, (37, 5, 2), generator=_gen(nbits))
    idx[0, 0] = torch.tensor([0, (1 << nbits) - 1])  # both ends of the range
    packed = pack_codes(idx, nbits)
    assert packed.dtype == code_dtype(nbits) == (torch.int8 if nbits <= 8 else torch.int16)
    assert int(packed.min()) >= -(1 << (nbits - 1)) and int(packed.max()) < 1 << (nbits - 1)
    unpacked = reference.unpack_codes(packed, nbits)
    assert torch.equal(unpacked, idx)
    assert torch.equal(pack_codes(unpacked, nbits), packed)


def test_codes_as_aqlm_stores_them():
    """AQLM's pack_int_data: indices from 2**(nbits-1) up are stored minus 2**nbits."""
    assert pack_codes(torch.tensor([0, 127, 128, 255]), 8).tolist() == [0, 127, -128, -1]
    assert pack_codes(torch.tensor([32767, 32768, 65535]), 16).tolist() == [32767, -32768, -1]


def test_bad_codes_and_geometry():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 256\)"):
        pack_codes(torch.tensor([256]), 8)
    with pytest.raises(ValueError, match=r"outside the 16 entries of 4-bit codebooks"):
        check_codes(torch.tensor([16], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match=r"outside the 16 entries"):
        check_codes(torch.tensor([-9], dtype=torch.int8), 4)
    check_codes(torch.tensor([-8, 15], dtype=torch.int8), 4)  # signed and unsigned storage both read
    with pytest.raises(ValueError, match="nbits_per_codebook=17 is not supported"):
        check_geometry(64, 64, in_group_size=8, out_group_size=1, num_codebooks=1, nbits_per_codebook=17)
    with pytest.raises(ValueError, match="in_group_size=7 does not divide in_features=64"):
        check_geometry(64, 64, in_group_size=7, out_group_size=1, num_codebooks=1, nbits_per_codebook=8)
    with pytest.raises(ValueError, match="out_group_size=3 does not divide out_features=64"):
        check_geometry(64, 64, in_group_size=8, out_group_size=3, num_codebooks=1, nbits_per_codebook=8)


# --- reference kernel -----------------------------------------------------------------------

def _dequantize_by_loops(idx, books, scales):
    """The format's definition written out element by element."""
    n_codebooks, _, og, ig = books.shape
    go, gi, _ = idx.shape
    w = torch.zeros(go * og, gi * ig)
    for o in range(go):
        for i in range(gi):
            block = sum(books[c, idx[o, i, c]].float() for c in range(n_codebooks))
            w[o * og:(o + 1) * og, i * ig:(i + 1) * ig] = block * scales[o].float()
    return w


@pytest.mark.parametrize("n,k,og,ig,c,nbits", [(12, 24, 1, 8, 2, 8), (10, 12, 2, 4, 1, 5), (9, 16, 3, 16, 3, 4)])
def test_reference_dequantize_matches_definition(n, k, og, ig, c, nbits):
    gen = _gen(n)
    idx = torch.randint(0, 1 << nbits, (n // og, k // ig, c), generator=gen)
    books = torch.randn(c, 1 << nbits, og, ig, generator=gen).half()
    scales = (torch.rand(n // og, generator=gen) + 0.5).half()
    mod = AqlmLinear.from_quantized(idx, books, scales, None)
    torch.testing.assert_close(mod.dequantize(), _dequantize_by_loops(idx, books, scales), rtol=1e-6, atol=1e-6)
    x = torch.randn(3, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    want = x @ mod.dequantize().t() + bias
    torch.testing.assert_close(reference.matmul_codebook(x, *_args(mod), bias), want, rtol=1e-5, atol=1e-5)


def _args(m):
    return m.codes, m.codebooks, m.scales


def test_bits_per_weight():
    mod = AqlmLinear(4096, 4096, num_codebooks=2, nbits_per_codebook=8, device="meta")
    # codes: 2 x 8 bits per 8 weights; codebooks 2*256*8 fp16 and 4096 fp16 scales on 16M weights
    assert mod.bits_per_weight() == pytest.approx(2 + (2 * 256 * 8 + 4096) * 16 / 4096**2)


# --- weighted k-means (the initialisation) -----------------------------------------------------

def test_nearest_centroid_matches_brute_force():
    from lowbit.methods.kmeans import nearest_centroid

    gen = _gen(11)
    points = torch.randn(5, 37, 8, generator=gen)  # 5 positions x 37 points
    weights = torch.rand(5, 8, generator=gen) + 0.1
    centroids = torch.randn(300, 8, generator=gen)
    got = nearest_centroid(weights[:, None, :] * points, weights, centroids)
    dist = (weights[:, None, None, :] * (points[:, :, None, :] - centroids[None, None]) ** 2).sum(-1)  # [5, 37, 300]
    assert torch.equal(got, dist.argmin(-1))


@pytest.mark.parametrize("shape", [(7, 1), (33, 256), (3, 4, 300), (2, 65536)])
def test_min_last_equals_torch_min_with_ties(shape):
    from lowbit.methods.kmeans import min_last

    x = torch.randn(*shape, generator=_gen(12))
    x[..., shape[-1] // 2] = x[..., -1] = -50.0  # a tie at the minimum: the first index wins
    x[..., 0] = torch.where(torch.arange(x[..., 0].numel()).reshape(x[..., 0].shape) % 2 == 0, -50.0, 1e30)
    values, index = min_last(x)
    want_values, want_index = x.min(dim=-1)
    assert torch.equal(values, want_values) and torch.equal(index, want_index)
    assert index.dtype == torch.int64 and (index == 0).any()


def test_weighted_kmeans_lowers_the_weighted_distortion_and_is_exact_when_small():
    from lowbit.methods.kmeans import weighted_kmeans

    gen = _gen(12)
    points = torch.randn(4, 200, 8, generator=gen)
    weights = torch.rand(4, 8, generator=gen) + 0.1

    def distortion(c, a):
        return float((weights[:, None, :] * (points - c[a]) ** 2).sum())
    start = weighted_kmeans(points, weights, 64, 0, _gen(0))
    fitted = weighted_kmeans(points, weights, 64, 10, _gen(0))
    assert distortion(*fitted) < 0.9 * distortion(*start)
    c, a = weighted_kmeans(points[:, :10], weights, 64, 5, _gen(0))  # 40 points, 64 centroids
    assert torch.equal(c[a], points[:, :10])


# --- the solver -----------------------------------------------------------------------------

def _layer(n=96, k=128, seed=0):
    gen = _gen(seed)
    W = torch.randn(n, k, generator=gen) * 0.02
    X = torch.randn(2048, k, generator=gen) @ (torch.randn(k, k, generator=gen) * 0.1 + torch.eye(k))
    stats = HessianStats(k)
    stats.add_batch(X)
    return W, stats.H


def _output_error(W, H, What):
    E = W - What
    return float(((E @ H) * E).sum() / ((W @ H) * W).sum())


def _aqlm_weight(r, nbits):
    return reference.dequantize_codebook(pack_codes(r.codes, nbits), r.codebooks, r.scales.reshape(-1, 1, 1, 1))


def test_aqlm_2bit_beats_gptq_2bit_on_the_output_error():
    W, H = _layer()
    r = aqlm_quantize(W, H, num_codebooks=2, nbits=8, in_group_size=8)
    assert r.codes.shape == (96, 16, 2) and r.codebooks.shape == (2, 256, 1, 8) and r.scales.shape == (96,)
    assert 0 <= int(r.codes.min()) and int(r.codes.max()) < 256
    aqlm_err = _output_error(W, H, _aqlm_weight(r, 8))
    g = gptq_quantize(W, H, bits=2, group_size=32, sym=False)
    gi = g.g_idx.long()
    gptq_err = _output_error(W, H, (g.q.float() - g.zeros[gi].t().float()) * g.scales[gi].t())
    assert aqlm_err < 0.5 * gptq_err, (aqlm_err, gptq_err)  # same 2 bits per weight (plus codebooks)
    assert r.relative_error == pytest.approx(aqlm_err, rel=0.1)  # reported on the damped Hessian


def test_alternation_improves_on_the_kmeans_start():
    W, H = _layer(seed=1)
    start = aqlm_quantize(W, H, num_codebooks=2, nbits=6, in_group_size=8, max_iterations=1, codebook_steps=0,
                          beam_size=1)
    full = aqlm_quantize(W, H, num_codebooks=2, nbits=6, in_group_size=8, relative_tolerance=0.0)
    assert full.iterations == 8
    assert full.relative_error < 0.9 * start.relative_error


def test_beam_search_is_at_least_as_good_as_greedy():
    W, H = _layer(seed=2)
    greedy = aqlm_quantize(W, H, num_codebooks=2, nbits=6, in_group_size=8, beam_size=1, max_iterations=3,
                           relative_tolerance=0.0)
    beam = aqlm_quantize(W, H, num_codebooks=2, nbits=6, in_group_size=8, beam_size=8, max_iterations=3,
                         relative_tolerance=0.0)
    assert beam.relative_error <= greedy.relative_error * 1.02


@pytest.mark.parametrize("og,c", [(1, 2), (2, 1)])
def test_code_sweep_with_lazy_updates_equals_the_eager_sweep(og, c):
    """A block of positions carries its E H changes to later columns in one product; position by
    position (block 1, an eager update) the sweep must choose the same codes, and lower the error."""
    from lowbit.methods import aqlm as A
    from lowbit.methods.aqlm_search import update_codes

    W, H = _layer(n=48, k=256, seed=5)  # 32 input groups: two blocks of 16 and a partial third with 12
    H.diagonal().add_(0.01 * float(H.diagonal().mean()))
    sweeps = {}
    for block in (1, 12):
        layer = A._Layer(W, H, og, 8)
        A._initialize(layer, c, 6, 2, _gen(0))
        start, before = layer.codes.clone(), layer.error()
        update_codes(layer, beam_size=4, block=block)
        sweeps[block] = layer.codes.clone()
        assert layer.error() < before
        assert (layer.codes != start).any(dim=-1).float().mean() > 0.05  # the sweep changed codes across blocks
    assert torch.equal(sweeps[1], sweeps[12])


def test_codebooks_stay_bounded():
    """Two codebooks have a flat direction (shift one, unshift the other); it must not drift."""
    W, H = _layer(seed=3)
    r = aqlm_quantize(W, H, num_codebooks=2, nbits=8, in_group_size=8, max_iterations=4, relative_tolerance=0.0)
    assert float(r.codebooks.abs().max()) < 20  # the scaled weights have unit RMS


def test_output_groups_and_deterministic_seed():
    W, H = _layer(n=64, k=64, seed=4)
    a = aqlm_quantize(W, H, num_codebooks=1, nbits=8, in_group_size=4, out_group_size=2, seed=3)
    b = aqlm_quantize(W, H, num_codebooks=1, nbits=8, in_group_size=4, out_group_size=2, seed=3)
    assert a.codes.shape == (32, 16, 1) and a.codebooks.shape == (1, 256, 2, 4)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks)
    assert _output_error(W, H, _aqlm_weight(a, 8)) < 0.2


def test_one_codebook_larger_than_the_layer_is_exact():
    """More codewords than groups: every group gets its own codeword (lossless, and many bits)."""
    W, H = _layer(n=16, k=32, seed=5)
    r = aqlm_quantize(W, H, num_codebooks=1, nbits=7, in_group_size=8)
    assert r.relative_error < 1e-10


def test_solver_bad_input():
    W, H = _layer(n=8, k=16)
    with pytest.raises(ValueError, match="in_group_size=5 does not divide in_features=16"):
        aqlm_quantize(W, H, num_codebooks=1, nbits=4, in_group_size=5)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weights contain NaN or Inf"):
        aqlm_quantize(W, H, num_codebooks=1, nbits=4, in_group_size=8)
    W[0, 0] = 0
    H[1, 1] = float("inf")
    with pytest.raises(ValueError, match="Hessian contains NaN or Inf"):
        aqlm_quantize(W, H, num_codebooks=1, nbits=4, in_group_size=8)


# --- the quantizer on tiny models -------------------------------------------------------------

FAST = dict(nsamples=4, max_iterations=2, kmeans_iterations=2, codebook_steps=4)


def _quantized_tiny(cfg):
    model = tiny_llama_model()
    return lowbit.quantize(model, cfg, calib_ids(), progress=False)


def test_quantize_save_load_round_trip(tmp_path):
    from lowbit.formats.base import modules_of

    cfg = AqlmConfig(num_codebooks=2, nbits_per_codebook=6, **FAST)
    model = _quantized_tiny(cfg)
    mods = modules_of(model, AqlmLinear)
    assert len(mods) == 14  # 7 linears x 2 blocks; the tied head stays
    saved = lowbit.quantized_config(model)
    assert "lm_head.weight" in saved.linear_weights_not_to_quantize and "lm_head" in saved.linear_weights_not_to_quantize
    x = torch.randint(0, 256, (1, 16), generator=_gen(0))
    want = model(x).logits
    lowbit.save_quantized(model, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert meta["quant_method"] == "aqlm" and meta["num_codebooks"] == 2 and meta["nbits_per_codebook"] == 6
    tensors = load_file(tmp_path / "q" / SINGLE_FILE)
    key = "model.layers.0.mlp.down_proj"
    assert tensors[f"{key}.codes"].dtype == torch.int8 and tensors[f"{key}.codes"].shape == (64, 16, 2)
    assert tensors[f"{key}.codebooks"].shape == (2, 64, 1, 8) and tensors[f"{key}.codebooks"].dtype == torch.float16
    assert tensors[f"{key}.scales"].shape == (64, 1, 1, 1)
    loaded = lowbit.from_pretrained(tmp_path / "q")
    assert torch.equal(loaded(x).logits, want)


def test_quantized_model_tracks_the_original():
    model = tiny_llama_model()
    x = torch.randint(0, 256, (2, 24), generator=_gen(1))
    want = model(x).logits
    got = _quantized_tiny(AqlmConfig(num_codebooks=2, nbits_per_codebook=8, **FAST))(x).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.5, rel  # 2 bits per weight on random weights: close, not equal


def test_block_finetuning_lowers_the_block_error_and_keeps_the_codes():
    """Adam on the codebooks and scales of one quantized block, codes fixed: the block's error
    against the full-precision outputs falls; nothing else in the block changes."""
    from lowbit.methods.aqlm_tune import finetune_block
    from lowbit.methods.calibration import _run_block, capture_block_inputs

    fp = tiny_llama_model()
    block = fp.model.layers[0]
    with torch.no_grad():
        states, kwargs = capture_block_inputs(fp, block, calib_ids(8, 32), torch.device("cpu"))
        targets = _run_block(block, states, kwargs)
    quantized = _quantized_tiny(AqlmConfig(num_codebooks=1, nbits_per_codebook=4, **FAST)).model.layers[0]
    codes = {n: m.codes.clone() for n, m in quantized.named_modules() if isinstance(m, AqlmLinear)}
    books = {n: m.codebooks.clone() for n, m in quantized.named_modules() if isinstance(m, AqlmLinear)}
    norm = quantized.input_layernorm.weight.clone()
    before, after = finetune_block(quantized, states, kwargs, targets, steps=20, lr=1e-3, batch_size=4)
    assert 0 < after < 0.95 * before
    with torch.no_grad():
        outs = _run_block(quantized, states, kwargs)
    err = sum(((o - t) ** 2).sum() for o, t in zip(outs, targets)) / sum((t ** 2).sum() for t in targets)
    assert float(err) == pytest.approx(after, rel=1e-2)  # the tuned values are the block's now (fp16-rounded)
    for n, m in quantized.named_modules():
        if isinstance(m, AqlmLinear):
            assert torch.equal(m.codes, codes[n]) and not torch.equal(m.codebooks, books[n])
            assert m.codebooks.dtype == torch.float16 and "forward" not in m.__dict__
    assert torch.equal(quantized.input_layernorm.weight, norm)
    assert all(p.requires_grad for p in quantized.parameters())  # flags restored
    kept = {n: m.codebooks.clone() for n, m in quantized.named_modules() if isinstance(m, AqlmLinear)}
    assert all(math.isnan(v) for v in finetune_block(quantized, states, kwargs, targets, steps=0, lr=1e-3,
                                                     batch_size=4))  # not run
    assert all(torch.equal(m.codebooks, kept[n]) for n, m in quantized.named_modules() if isinstance(m, AqlmLinear))


def test_finetuning_through_the_quantizer():
    cfg = AqlmConfig(num_codebooks=1, nbits_per_codebook=4, finetune_steps=10, finetune_lr=1e-3, **FAST)
    tuned, plain = _quantized_tiny(cfg), _quantized_tiny(AqlmConfig(num_codebooks=1, nbits_per_codebook=4, **FAST))
    key = "model.layers.1.mlp.down_proj"
    assert not torch.equal(tuned.get_submodule(key).codebooks, plain.get_submodule(key).codebooks)
    assert lowbit.quantized_config(tuned).finetune_steps == 10
    with pytest.raises(ValueError, match=r"AqlmConfig\.finetune_steps=-1"):
        AqlmConfig(finetune_steps=-1)
    with pytest.raises(ValueError, match=r"AqlmConfig\.finetune_lr=0"):
        AqlmConfig(finetune_lr=0.0)


def test_quantizer_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: in_group_size=48 does not divide"):
        _quantized_tiny(AqlmConfig(in_group_size=48, **FAST))  # 64 inputs; MLP down has 128
    model = tiny_llama_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: weight contains NaN"):
        lowbit.quantize(model, AqlmConfig(**FAST), calib_ids(), progress=False)


def test_linear_weights_not_to_quantize_are_skipped():
    from lowbit.formats.base import modules_of

    cfg = AqlmConfig(num_codebooks=1, nbits_per_codebook=6, linear_weights_not_to_quantize=["model.layers.0.mlp.up_proj.weight"],
                     **FAST)
    model = _quantized_tiny(cfg)
    names = set(modules_of(model, AqlmLinear))
    assert "model.layers.0.mlp.up_proj" not in names and "model.layers.1.mlp.up_proj" in names
    assert "model.layers.0.mlp.up_proj.weight" in lowbit.quantized_config(model).linear_weights_not_to_quantize


# --- checkpoint layout --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_2x6(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aqlm") / "q"
    lowbit.save_quantized(_quantized_tiny(AqlmConfig(num_codebooks=2, nbits_per_codebook=6, **FAST)), folder)
    return folder


def _rewrite(folder, edit):
    path = folder / SINGLE_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_codes_out_of_range_are_refused(saved_2x6, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(saved_2x6, bad)
    key = "model.layers.1.self_attn.v_proj.codes"

    def corrupt(t):
        t[key][0, 0, 0] = 100  # 6-bit codes hold -32..63
    _rewrite(bad, corrupt)
    with pytest.raises(ValueError, match=rf"{key}: codes range over \[.*100\], outside the 64 entries"):
        lowbit.from_pretrained(bad)


def test_wrong_code_dtype_is_refused(saved_2x6, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(saved_2x6, bad)
    key = "model.layers.0.mlp.gate_proj.codes"
    _rewrite(bad, lambda t: t.__setitem__(key, t[key].to(torch.int16)))
    with pytest.raises(ValueError, match=rf"{key} has dtype torch.int16; 6-bit codebooks store codes as torch.int8"):
        lowbit.from_pretrained(bad)


def test_fp32_codebooks_load_without_rounding(saved_2x6, tmp_path):
    import shutil

    folder = tmp_path / "fp32"
    shutil.copytree(saved_2x6, folder)

    def widen(t):
        for k in list(t):
            if k.endswith((".codebooks", ".scales")):
                t[k] = t[k].float() * (1 + 1e-4)  # values fp16 cannot hold
    _rewrite(folder, widen)
    model = lowbit.from_pretrained(folder)
    mod = model.model.layers[0].self_attn.q_proj
    assert mod.codebooks.dtype == torch.float32
    want = load_file(folder / SINGLE_FILE)["model.layers.0.self_attn.q_proj.codebooks"]
    assert torch.equal(mod.codebooks, want)


# --- interop with the aqlm package (transformers' AQLM loader) -----------------------------------

def _hf_aqlm_model(cfg_dict):
    """A tiny Llama whose linears are aqlm.QuantizedLinear, as transformers builds it, with random
    codes over the whole index range."""
    from transformers import AqlmConfig as HfAqlmConfig
    from transformers.integrations.aqlm import replace_with_aqlm_linear

    model = tiny_llama_model()
    hf_cfg = HfAqlmConfig(**cfg_dict)
    fp_state = model.state_dict()
    replace_with_aqlm_linear(model, modules_to_not_convert=hf_cfg.linear_weights_not_to_quantize,
                             quantization_config=hf_cfg)
    gen = _gen(7)
    nbits = cfg_dict["nbits_per_codebook"]
    for name, mod in model.named_modules():
        if type(mod).__name__ != "QuantizedLinear":
            continue
        idx = torch.randint(0, 1 << nbits, mod.codes.shape, generator=gen)
        mod.codes = torch.nn.Parameter(pack_codes(idx, nbits), requires_grad=False)
        mod.codebooks = torch.nn.Parameter(torch.randn(mod.codebooks.shape, generator=gen), requires_grad=False)
        mod.scales = torch.nn.Parameter(torch.rand(mod.scales.shape, generator=gen) * 0.05, requires_grad=False)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_meta:
            p_new = fp_state[name]
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, torch.nn.Parameter(p_new, requires_grad=False))
    model.config.quantization_config = hf_cfg
    return model.half()


@pytest.mark.skipif(not HAS_AQLM, reason="aqlm not installed (pip install 'lowbit[peers]')")
def test_checkpoint_written_by_transformers_and_aqlm_loads_with_same_weights(tmp_path):
    from aqlm.utils import _dequantize_weight, unpack_int_data

    cfg = {"in_group_size": 8, "out_group_size": 1, "num_codebooks": 2, "nbits_per_codebook": 6,
           "linear_weights_not_to_quantize": ["model.embed_tokens.weight", "lm_head.weight", "lm_head"]}
    peer = _hf_aqlm_model(cfg)
    peer.save_pretrained(tmp_path / "peer")
    ours = lowbit.from_pretrained(tmp_path / "peer", dtype=torch.float16)
    for name, mod in peer.named_modules():
        if type(mod).__name__ != "QuantizedLinear":
            continue
        theirs = _dequantize_weight(unpack_int_data(mod.codes, 6), mod.codebooks.float(), mod.scales.float())
        torch.testing.assert_close(ours.get_submodule(name).dequantize(), theirs, rtol=1e-6, atol=1e-6)
    x = torch.randint(0, 256, (1, 12), generator=_gen(3))
    with torch.no_grad(), exact_kernels():  # fp32 products, as the peer's (12 rows would take bf16 ones)
        want = peer.float()(x).logits
        got = ours.float()(x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_AQLM, reason="aqlm not installed (pip install 'lowbit[peers]')")
def test_our_checkpoint_loads_in_transformers_with_aqlm(saved_2x6):
    from transformers import AutoModelForCausalLM

    ours = lowbit.from_pretrained(saved_2x6)
    theirs = AutoModelForCausalLM.from_pretrained(saved_2x6, dtype=torch.float32)
    assert type(theirs.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert type(theirs.lm_head).__name__ == "Linear"
    x = torch.randint(0, 256, (1, 12), generator=_gen(4))
    with torch.no_grad(), exact_kernels():  # fp32 products, as the peer's (12 rows would take bf16 ones)
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, rtol=1e-3, atol=1e-3)


def test_convert_refuses_aqlm_into_grouped_ints_unless_requantized(saved_2x6, tmp_path):
    from lowbit.convert import convert

    with pytest.raises(ValueError, match=r"aqlm weights \(AqlmLinear\) are not grouped integers"):
        convert(saved_2x6, tmp_path / "g", "gptq")
    assert not (tmp_path / "g").exists()
    cfg = convert(saved_2x6, tmp_path / "r", "rtn", requantize=True, progress=False)
    assert cfg.quant_method == "rtn" and (tmp_path / "r" / "config.json").is_file()
