"""Distillation baseline: the student's cut, its cache and checkpoint, its losses, and training."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import byte_tokenizer, calib_ids, tiny_llama_model
from lowbit.compress import DistillConfig, compress, distill, save_distilled
from lowbit.compress.distill import (
    cut_student,
    embedding_loss,
    logit_kl,
    mean_pool,
    student_layer_indices,
)


@pytest.mark.parametrize(("teacher", "student", "want"), [
    (30, 15, [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]),
    (6, 3, [0, 3, 5]),
    (4, 2, [0, 3]),
    (5, 1, [0]),
    (7, 6, [0, 1, 2, 4, 5, 6]),
], ids=["30to15", "6to3", "4to2", "5to1", "7to6"])
def test_student_layers_are_evenly_spaced_first_and_last_kept(teacher, student, want):
    got = student_layer_indices(teacher, student)
    assert len(got) == student and len(set(got)) == student and got == sorted(got)
    if student > 1:
        assert got[0] == 0 and got[-1] == teacher - 1
    assert got == want


@pytest.mark.parametrize("student", [0, 4, 9])
def test_student_must_be_shallower_than_the_teacher(student):
    with pytest.raises(ValueError, match="between 1 and 3"):
        student_layer_indices(4, student)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("student_layers", 0, "student_layers=0"),
    ("steps", 0, "steps=0"),
    ("batch_size", 0, "batch_size=0"),
    ("nsamples", -1, "nsamples=-1"),
    ("model_seqlen", 1, "model_seqlen=1"),
    ("learning_rate", float("nan"), "learning_rate=nan"),
    ("learning_rate", 0.0, "learning_rate=0.0"),
    ("warmup_steps", 100, "warmup_steps=100"),
    ("temperature", -1.0, "temperature=-1.0"),
])
def test_config_errors_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**{field: value})


def test_losses_are_zero_only_at_the_teacher():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 256, generator=g)
    assert logit_kl(t, t, 2.0).abs() < 1e-5
    assert logit_kl(t + 0.5 * torch.randn(t.shape, generator=g), t, 1.0) > 1e-3
    e = torch.randn(3, 16, generator=g)
    assert embedding_loss(e, e).abs() < 1e-6
    assert embedding_loss(e, -e) > 2.0
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    h = torch.randn(2, 3, 4, generator=g)
    assert torch.allclose(mean_pool(h, mask), torch.stack([h[0, :2].mean(0), h[1, 0]]))


def test_cut_student_renumbers_the_cache_and_saves_as_a_shallower_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama_model(layers=4)
    teacher_blocks = [copy.deepcopy(b.state_dict()) for b in model.model.layers]
    cut_student(model, [0, 3])
    assert model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    for b, i in zip(model.model.layers, [0, 3]):
        assert all(torch.equal(v, teacher_blocks[i][k]) for k, v in b.state_dict().items())
    prompt = calib_ids(1, 6)
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    model.save_pretrained(tmp_path / "s")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert back.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.equal(back(prompt).logits, model(prompt).logits)


def _kl_to(teacher, student, ids):
    with torch.no_grad():
        return float(logit_kl(student(ids).logits, teacher(ids).logits, 1.0))


def test_distilled_causal_lm_is_closer_to_its_teacher_than_the_cut_alone():
    teacher = tiny_llama_model(layers=4)
    cut = copy.deepcopy(teacher)
    cut_student(cut, student_layer_indices(4, 2))
    student = copy.deepcopy(teacher)
    losses: list[float] = []
    cfg = DistillConfig(steps=60, batch_size=8, learning_rate=3e-3, warmup_steps=2)
    distill(student, cfg, calib_ids(32, 32, seed=1), progress=False, losses=losses)
    held_out = calib_ids(8, 32, seed=2)
    before, after = _kl_to(teacher, cut, held_out), _kl_to(teacher, student, held_out)
    assert student.config.num_hidden_layers == 2
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    assert after < 0.8 * before, (before, after)


def test_distilled_encoder_matches_pooled_embeddings_better():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for p in teacher.encoder.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)  # the default init leaves every block near the identity
    cut = copy.deepcopy(teacher)
    cut_student(cut, [0, 3])
    student = copy.deepcopy(teacher)
    distill(student, DistillConfig(steps=30, batch_size=4, learning_rate=3e-3, warmup_steps=2),
            calib_ids(32, 24, seed=1), progress=False)
    ids = calib_ids(8, 24, seed=2)
    mask = torch.ones_like(ids)

    def loss(m):
        with torch.no_grad():
            return float(embedding_loss(mean_pool(m(ids).last_hidden_state, mask),
                                        mean_pool(teacher(ids).last_hidden_state, mask)))

    assert student.config.num_hidden_layers == 2
    assert loss(student) < 0.7 * loss(cut)


def test_a_quantized_model_is_not_a_teacher():
    import lowbit

    model = lowbit.quantize(tiny_llama_model(layers=4), lowbit.RtnConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(ValueError, match="model is quantized"):
        distill(model, DistillConfig(steps=2, warmup_steps=0), calib_ids(4, 16), progress=False)


def test_same_seed_same_student():
    cfg = DistillConfig(steps=4, batch_size=2, warmup_steps=1)
    a, b = tiny_llama_model(layers=4), tiny_llama_model(layers=4)
    distill(a, cfg, calib_ids(8, 16), progress=False)
    distill(b, cfg, calib_ids(8, 16), progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_compress_routes_distillation_and_text_needs_a_tokenizer():
    model = tiny_llama_model(layers=4)
    losses: list[float] = []
    compress(model, DistillConfig(steps=2, warmup_steps=0), calib_ids(4, 16), progress=False, losses=losses)
    assert model.config.num_hidden_layers == 2 and len(losses) == 2
    with pytest.raises(ValueError, match="distillation needs calibration data"):
        distill(tiny_llama_model(layers=4), DistillConfig(steps=2, warmup_steps=0), None, progress=False)


def test_save_distilled_records_the_run(tmp_path):
    model = tiny_llama_model(layers=4)
    cfg = DistillConfig(steps=3, warmup_steps=0)
    losses: list[float] = []
    distill(model, cfg, calib_ids(4, 16), progress=False, losses=losses)
    out = save_distilled(model, tmp_path / "student", cfg, byte_tokenizer(), losses)
    note = json.loads((out / "config.json").read_text())["lowbit_distillation"]
    assert note["steps"] == 3 and note["loss"] == [round(v, 5) for v in losses]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_cli_distill(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lowbit.cli import main

    src = tmp_path / "teacher"
    tiny_llama_model(layers=4).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    text = tmp_path / "train.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    rc = main(["distill", str(src), "--out", str(tmp_path / "s"), "--steps", "3", "--calib", str(text),
               "--nsamples", "8", "--seqlen", "32", "--layers", "3"])
    assert rc == 0
    assert "saved a 3-layer student" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.num_hidden_layers == 3
    assert main(["distill", str(src), "--out", str(tmp_path / "t"), "--steps", "0"]) == 2
    assert "steps=0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
