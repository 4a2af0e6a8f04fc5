"""Pruning baselines: exact sparsity patterns, Wanda's activation weighting, SparseGPT's error."""

from __future__ import annotations

import pytest
import torch

from conftest import byte_tokenizer, tiny_llama_model
from lowbit.compress import PruneConfig, prune, sparsity_of
from lowbit.compress.pruning import (
    HessianStats,
    lowest_mask,
    magnitude_mask,
    sparsegpt_prune,
    wanda_mask,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("per_row", [False, True])
def test_unstructured_mask_has_the_exact_count(per_row):
    score = torch.rand(7, 30, generator=gen())
    mask = lowest_mask(score, 0.5, None, per_row)
    if per_row:
        assert (mask.sum(1) == 15).all()
        kept_min = torch.where(mask, torch.inf, score).min(1).values
        dropped_max = torch.where(mask, score, -torch.inf).max(1).values
        assert (dropped_max <= kept_min).all()
    else:
        assert int(mask.sum()) == 105
        assert score[mask].max() <= score[~mask].min()


def test_two_four_mask_zeroes_two_of_every_four():
    w = torch.randn(6, 16, generator=gen())
    mask = magnitude_mask(w, 0.5, (2, 4))
    groups = mask.reshape(6, 4, 4)
    assert (groups.sum(-1) == 2).all()
    a = w.abs().reshape(6, 4, 4)
    assert (torch.where(groups, a, -1).amax(-1) <= torch.where(groups, torch.inf, a).amin(-1)).all()


def test_wanda_keeps_the_weights_of_loud_inputs():
    w = torch.randn(8, 32, generator=gen())
    norm = torch.ones(32)
    torch.testing.assert_close(wanda_mask(w, norm, 0.5).float(), lowest_mask(w.abs(), 0.5, None, True).float())
    norm[5] = 1e4  # one very loud input feature
    assert not wanda_mask(w, norm, 0.5)[:, 5].any()


def layer_problem(n=16, k=256, tokens=1024, seed=0):
    g = gen(seed)
    scale = 0.2 + 2.8 * torch.rand(k, generator=g)  # uneven input scales, in no particular order
    x = torch.randn(tokens, k, generator=g) * scale
    x[:, 1::2] += 0.8 * x[:, ::2]  # correlated inputs: what the Hessian solve exploits
    w = torch.randn(n, k, generator=g)
    stats = HessianStats(k)
    stats.add_batch(x)
    return w, x, stats.H


@pytest.mark.parametrize("n_m", [None, (2, 4)], ids=["50%", "2:4"])
def test_sparsegpt_output_error_beats_magnitude_and_wanda(n_m):
    w, x, H = layer_problem()
    pruned = sparsegpt_prune(w, H, 0.5, n_m, block_size=64)
    if n_m is None:
        assert int((pruned == 0).sum()) == w.numel() // 2
    else:
        assert ((pruned.reshape(16, -1, 4) == 0).sum(-1) == 2).all()

    def err(v):
        return float(((x @ (v - w).t()) ** 2).sum())

    mag = w.masked_fill(magnitude_mask(w, 0.5, n_m), 0)
    wan = w.masked_fill(wanda_mask(w, x.norm(dim=0), 0.5, n_m), 0)
    assert err(pruned) < err(wan) < err(mag)


def test_sparsegpt_is_deterministic_and_leaves_input_alone():
    w, _, H = layer_problem(seed=1)
    w0 = w.clone()
    assert torch.equal(sparsegpt_prune(w, H, 0.5), sparsegpt_prune(w, H, 0.5))
    assert torch.equal(w, w0)


@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("wanda", "2:4"),
                                            ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")])
def test_prune_a_model(method, pattern):
    model = tiny_llama_model()
    head = model.lm_head.weight.clone()
    calib = torch.randint(0, 256, (4, 32), generator=gen())
    prune(model, PruneConfig(method=method, sparsity=0.5, pattern=pattern), calib=calib, progress=False)
    assert sparsity_of(model) == pytest.approx(0.5, abs=1e-6)
    up = model.model.layers[1].mlp.up_proj.weight
    assert float((up == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert torch.equal(model.lm_head.weight, head)  # the (tied) output embedding is left alone
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_pruning_with_text_calibration_and_the_pruned_model_round_trips(tmp_path):
    model, tok = tiny_llama_model(), byte_tokenizer()
    prune(model, PruneConfig(method="wanda", nsamples=2, model_seqlen=32), tokenizer=tok, progress=False)
    model.save_pretrained(tmp_path / "p")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert sparsity_of(again) == pytest.approx(sparsity_of(model))


@pytest.mark.parametrize("kw,msg", [
    (dict(method="random"), "unknown pruning method"),
    (dict(method="wanda", sparsity=1.0), "between 0 and 1"),
    (dict(method="wanda", pattern="2:4", sparsity=0.6), "zeroes 2/4"),
    (dict(method="wanda", pattern="4:2", sparsity=2.0), "between 0 and 1"),
    (dict(method="wanda", pattern="x:y"), "use 'unstructured' or 'N:M'"),
])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PruneConfig(**kw)


def test_sparsity_defaults_to_the_pattern():
    assert PruneConfig(method="wanda").sparsity == 0.5
    assert PruneConfig(method="wanda", pattern="1:4").sparsity == 0.25


def test_cli_prune(tiny_model_dir, tmp_path, capsys):
    from lowbit.cli import main

    assert main(["prune", str(tiny_model_dir), "--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "2",
                 "--seqlen", "32", "--out", str(tmp_path / "p")]) == 0
    assert "50.0% of the linear weights zero" in capsys.readouterr().out
    import json

    from lowbit.checkpoint.loading import load_plain

    cfg = json.loads((tmp_path / "p" / "config.json").read_text())["lowbit_pruning"]
    assert cfg["method"] == "sparsegpt" and cfg["pattern"] == "2:4" and cfg["measured_sparsity"] == 0.5
    model, tok = load_plain(tmp_path / "p", torch.float32, "cpu")
    assert tok is not None and sparsity_of(model) == 0.5
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--pattern", "2:4", "--sparsity", "0.7",
                 "--out", str(tmp_path / "q")]) == 2
    assert "zeroes 2/4" in capsys.readouterr().err


def test_calibration_methods_need_data_and_nm_needs_divisible_inputs():
    with pytest.raises(ValueError, match="wanda needs calibration data"):
        prune(tiny_llama_model(), PruneConfig(method="wanda"), progress=False)
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        prune(tiny_llama_model(), PruneConfig(method="magnitude", pattern="1:5", sparsity=0.2), progress=False)


def test_solver_and_stats_error_paths():
    from lowbit.compress.pruning import InputNormStats

    w, _, H = layer_problem()
    with pytest.raises(ValueError, match="block_size=30 must be a multiple of M=4"):
        sparsegpt_prune(w, H, 0.5, (2, 4), block_size=30)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weights contain NaN or Inf"):
        sparsegpt_prune(bad, H, 0.5)
    with pytest.raises(ValueError, match="activations contain NaN or Inf"):
        InputNormStats(4).add_batch(torch.tensor([[1.0, float("inf"), 0.0, 2.0]]))
    with pytest.raises(ValueError, match="10 inputs do not split into groups of 4 for an 2:4 pattern"):
        lowest_mask(torch.rand(3, 10), 0.5, (2, 4), per_row=True)
    with pytest.raises(ValueError, match="need 0 < N < M"):
        PruneConfig(method="wanda", pattern="4:4", sparsity=0.99)
    with pytest.raises(ValueError, match="nsamples=0 must be >= 1"):
        PruneConfig(method="wanda", nsamples=0)
